VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo lint baselines-setup
setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

## Run the whole test suite (slow end-to-end tests included), as CI does; the GPTQ baseline test needs
## llm-compressor in its own environment (baselines-setup, about a minute the first time).
test: setup baselines-setup
	$(PY) -m pytest -q

## Only the fast tests (skips tests marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## The whole path on SmolLM2-135M: fetch, compress, perplexity, serve, ask, stop (~5 min on 2 AVX-512 cores, ~7 on 2 AVX2 cores).
demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .

## llm-compressor in its own environment, for the GPTQ rows of benchmarks/quality.py.
baselines-setup: .venv-baselines/.setup-stamp

.venv-baselines/.setup-stamp: $(VENV)/.setup-stamp scripts/setup_baselines.sh
	VENV=$(VENV) BASELINES_VENV=.venv-baselines bash scripts/setup_baselines.sh
	touch $@
