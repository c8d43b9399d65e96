# The two commands of the README. Both set up .venv first (idempotent; seconds when done).
PY := .venv/bin/python

.PHONY: setup demo test clean

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf output
