# The two commands of the README. Both set up .venv first (idempotent; seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test compare compare-quick compare-blur compare-adv compare-wsod clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q tests

# the comparison protocol on the built-in data (tools/compare.py): FGFI teacher, baseline, FGFI,
# LGD, LGD without P2, 3 seeds each, AP curves and the self-teacher oracle: results/compare.*
compare: setup
	$(PY) tools/compare.py

# its quick subset: baseline and LGD, 2 seeds: results/compare_quick.*
compare-quick: setup
	$(PY) tools/compare.py --quick

# blur robustness as fine-tuning of one trained baseline: original / + blur augmentation /
# conventional KD / self-guided KD and the self-teacher ablations, 2 seeds: results/blur.*
compare-blur: setup
	$(PY) tools/compare_blur.py

# UDFA: a trained demo baseline fine-tuned with standard / adversarial training / UDFA (teacher,
# self-only, auxiliary BN), 2 seeds, clean and attacked AP: results/adv.*
compare-adv: setup
	$(PY) tools/compare_adv.py

# weakly supervised detection from image tags: OICR baseline, SLV and SLV-SD (threshold and
# adaptive pseudo boxes), 3 seeds, mAP50 on val and CorLoc on train: results/wsod.*
compare-wsod: setup
	$(PY) tools/compare_wsod.py

clean:
	rm -rf output
