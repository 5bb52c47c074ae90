PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: setup demo test test-slow bench calibrate

# torch is pinned to the local 2.13.0 CPU wheel; every other dependency is taken with --no-deps-safe ranges.
setup:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"

demo: setup
	$(PY) -m fusion demo

test: setup
	$(PY) -m pytest -q -x --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m bench.run

calibrate: setup
	$(PY) -m fusion calibrate
