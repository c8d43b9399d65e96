# The two commands of the README. Both set up .venv first (idempotent; seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-upstream compare compare-quick compare-ablations compare-scratch compare-demo compare-blur compare-adv compare-wsod clean

setup:
	VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q -n auto tests

# the whole suite on upstream Detectron2 built with its C++ ops, in .venv-upstream (docs/BENCHMARKS.md):
# make test-upstream DETECTRON2_SRC=path/to/a/detectron2/clone   (default: main from GitHub)
test-upstream:
	bash tools/check_upstream.sh

# LGD's comparison protocols on the built-in data (tools/compare.py, docs/PROTOCOLS.md). The main
# protocol is LGD's regime: a classification-pretrained R-18 body (trained once, first), FrozenBN,
# value clipping at 1.0, 800 iterations, LGD's schedule scaled. Rows baseline, LGD, LGD with the
# class-preserving self-teacher, 5 seeds: results/compare_pretrained_long.*
compare: setup
	$(PY) tools/compare.py

# baseline and LGD, 2 seeds: results/compare_pretrained_long_quick.*
compare-quick: setup
	$(PY) tools/compare.py --quick

# LGD with lambda 0, without backbone freeze, with the teacher guard; FGFI; a RetinaNet pair;
# 3 seeds: results/compare_pretrained_long_ablations.*
compare-ablations: setup
	$(PY) tools/compare.py --ablations

# the same rows from scratch (800 iterations) and on the 400-iteration `make demo` recipe, 3 seeds
compare-scratch: setup
	$(PY) tools/compare.py --protocol scratch --rows baseline lgd lgd_class lgd_lambda0 --seeds 1 2 3

compare-demo: setup
	$(PY) tools/compare.py --protocol demo --rows baseline lgd lgd_class lgd_lambda0 --seeds 1 2 3

# blur robustness as fine-tuning of one trained baseline: original / + blur augmentation /
# conventional KD / self-guided KD and the self-teacher ablations, 2 seeds: results/blur.*
compare-blur: setup
	$(PY) tools/compare_blur.py

# UDFA: a trained demo baseline fine-tuned with standard / adversarial training / UDFA (teacher,
# self-only, auxiliary BN), 2 seeds, clean and attacked AP: results/adv.*
compare-adv: setup
	$(PY) tools/compare_adv.py

# weakly supervised detection from image tags: OICR baseline, SLV and SLV-SD (threshold and
# adaptive pseudo boxes) and the OICR + regression control, 5 seeds, mAP50 on val and CorLoc on
# train: results/wsod.*
compare-wsod: setup
	$(PY) tools/compare_wsod.py

clean:
	rm -rf output
