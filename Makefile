# The two commands of the README. Both set up .venv first (idempotent; seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test compare compare-blur clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q tests

# baseline, FGFI (teacher first) and LGD on the built-in data, 2 seeds each: results/compare.*
compare: setup
	$(PY) tools/compare.py

# blur robustness: original / + blur augmentation / conventional KD / self-guided KD, 2 seeds:
# results/blur.*
compare-blur: setup
	$(PY) tools/compare_blur.py

clean:
	rm -rf output
