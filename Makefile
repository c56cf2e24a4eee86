# `make demo` and `make test` do all the set-up themselves (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all model
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m tiny_model.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest
	$(PY) -m pytest --model-runner v2

test-all: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -m ""
	$(PY) -m pytest --model-runner v2 -m ""

model: setup
	$(PY) -m tiny_model.train --out models/multiverse-tiny
	$(PY) -m tiny_model.evaluate models/multiverse-tiny --out models/multiverse-tiny/eval.json --card
