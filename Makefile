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

.PHONY: setup extras demo test test-slow lint
setup: $(VENV)/.installed

# the optional extras whose features the README claims, so that their tests run (CI installs them):
# faiss-cpu (memtrain index) and DeepSpeed (recipes/accelerate/deepspeed_zero2.yaml). DeepSpeed is a
# source package whose build imports torch: no build isolation, and no compiled ops (JIT on use).
$(VENV)/.extras: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[faiss]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.14'
	touch $@

extras: $(VENV)/.extras

demo: setup
	$(VENV)/bin/memtrain demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check trainer tests scripts
