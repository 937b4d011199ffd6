# Two entry points that work on a fresh machine (Python 3.11, no GPU): `make run` and `make test`.
# torch 2.13.0 is installed first, on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/calculator.yaml
ARGS ?=

.PHONY: setup run test test-all clean

$(BIN)/tiderl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/tiderl

run: setup
	$(BIN)/tiderl train $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) runs
