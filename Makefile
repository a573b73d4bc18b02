# proxyd: `make run` starts the daemon on the embedded default configuration,
# `make test` runs the whole suite. Both set up the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs what running needs, `make test` (and lint, typecheck)
# the test tools too; either may come first. The dev install holds the run install.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test lint typecheck check bench bench-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/proxyd serve $(ARGS)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check proxyd tests bench
	$(BIN)/ruff format --check proxyd tests bench
	$(BIN)/lint-imports

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

check: lint typecheck test

# The benchmark (docs/performance.md): `make bench` runs the full one (~40 min),
# `make bench-smoke` the same code path with tiny sizes (CI, < 2 min).
# BENCH_ARGS passes flags on, e.g. BENCH_ARGS="--update-docs" or "--only cold_pull".
$(BENCH_STAMP): $(DEV_STAMP) bench/requirements.txt bench/requirements-optional.txt
	$(BIN)/pip install -q -r bench/requirements.txt
	grep -v '^#' bench/requirements-optional.txt | while read -r pkg; do \
	  [ -z "$$pkg" ] || $(BIN)/pip install -q "$$pkg" || echo "bench: $$pkg did not install; its rows are skipped"; \
	done
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-smoke: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
