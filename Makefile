# Two commands on a fresh machine: `make simulate` and `make test`. Both build .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
# empty: torch from pip's configured index; set to a wheel index (e.g. PyTorch's CPU one)
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: simulate test test-slow lint bench protos install clean mutation docker-check gpu-check

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
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

# Outside CI. Dev tools pinned in requirements-dev.txt, never in the runtime requirements.
# The GPU paths, each run once on CUDA (<= 5 min on one GPU); without CUDA it says so, exit 0.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

mutation: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) scripts/mutation.py $(MODULES)

# Dockerfiles with hadolint; compose resolved without an engine (Debian: apt-get install
# docker-compose). No Docker engine is needed for either.
docker-check: $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/hadolint docker/Dockerfile.server docker/Dockerfile.client
	cd docker && FEDFT_UID=1000 FEDFT_GID=1000 docker-compose -f compose.yaml config --quiet

clean:
	rm -rf $(VENV) runs
