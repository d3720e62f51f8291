# Everything sets itself up: a fresh machine needs only python3, pip and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# These machines have no internet: keep MLflow's telemetry quiet everywhere we run it.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned dependencies

run: $(STAMP)  ## run the main job on the embedded default (SQLite store under mlruns/)
	$(BIN)/regression-model-template run training

lint: $(STAMP)  ## ruff and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## lint, type-check, then the whole test suite (server tests included)
	$(BIN)/pytest

bench: $(STAMP)  ## benchmarks against raw MLflow and loguru; writes benchmarks/RESULTS.md
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
