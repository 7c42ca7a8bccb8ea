# Fresh-machine set-up: a .venv with torch 2.13.0 (CPU build from the local wheel) and memtrain.
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE ?= 1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: setup demo test test-slow lint
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/memtrain demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check trainer tests scripts
