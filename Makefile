# Streamlearn: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch, installed before the package so nothing pulls a CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help install demo test test-unit test-integration lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv and install streamlearn with its dev tools

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $@

demo: install  ## start broker, trainer, server and a drifting demo stream (Ctrl-C stops all)
	$(VENV)/bin/streamlearn up --demo

test: install  ## run the whole suite (unit + integration against a real broker)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install  ## unit tests only
	$(PY) -m pytest tests --ignore=tests/integration $(PYTEST_ARGS)

test-integration: install  ## integration tests only
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: install  ## ruff check, ruff format --check, mypy
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy

format: install  ## apply ruff's formatting and autofixes
	$(VENV)/bin/ruff format service tests bench
	$(VENV)/bin/ruff check --fix service tests bench

bench: install  ## run the benchmarks and rewrite docs/benchmarks.md (installs River to compare with)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run_all.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
