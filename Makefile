# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch first (a plain `pip install torch` pulls a multi-GB CUDA build); torchvision (timm's
# dependency) pinned to the matching release so the resolver never swaps torch out.
TORCH := torch==2.13.0 torchvision==0.28.0
export DS_BUILD_OPS := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
WORK ?= work

.PHONY: venv demo test test-fast layers lint bench bench-gpu clean mutate

$(BIN)/dsl: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $(BIN)/dsl

venv: $(BIN)/dsl

demo: venv
	$(BIN)/dsl demo --work $(WORK)

# The layer contracts and ruff (docstrings included) first: a wrong-way import fails in
# seconds, naming the line.
layers: venv
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q tests

# Everything that starts no Ray, DeepSpeed or MLflow: under 2 minutes.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: layers
	$(BIN)/ruff check .

# Mutation testing (README, "Mutation testing"): mutmut mutates the critical modules listed in
# pyproject.toml's [tool.mutmut] and runs, against each mutant, the fast tests that call the
# mutated function; then the kill rate per module. Not part of `make test`. A fresh run each
# time (mutmut keeps old verdicts for unchanged code even when the tests changed).
MUTATE_JOBS ?= $(shell nproc)
mutate: venv
	rm -rf mutants
	DSL_TEST_RANK_TIMEOUT_S=60 $(BIN)/mutmut run --max-children $(MUTATE_JOBS)
	$(BIN)/python scripts/mutation_report.py $(if $(MUTATE_FAIL_UNDER),--fail-under $(MUTATE_FAIL_UNDER))

bench: venv
	$(BIN)/python benchmarks/bench_ingest.py

# Pairs/s per GPU of the training step vs a bare torch loop (ResNet-50, 128 px, bf16); without
# CUDA a smoke run on a tiny model. BENCH_GPU_ARGS passes options (--compile, --zero-stage 0 ...).
bench-gpu: venv
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

clean:
	rm -rf $(WORK) .pytest_cache mutants
