# Everything sets itself up: a fresh machine needs only python3, pip and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# These machines have no internet: keep MLflow's telemetry quiet everywhere we run it.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: install run test test-all lint docs bench server clean

# pip only puts uv (pinned in constraints.txt) into the new venv; uv installs the rest, pip
# included, from the same pins: the first `make run` on a fresh clone takes ~30 s, not ~2 min.
# uv does not compile bytecode (Python caches it on first import, for just what is used); where
# PYTHONDONTWRITEBYTECODE forbids that cache, every process would compile MLflow again (+3-6 s
# each), so uv compiles the whole venv at install instead (~20 s, once).
UV_COMPILE := $(if $(PYTHONDONTWRITEBYTECODE),--compile-bytecode)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet --disable-pip-version-check \
		-c constraints.txt uv
	$(BIN)/uv pip install --quiet $(UV_COMPILE) --python $(BIN)/python -c constraints.txt \
		-e '.[dev]' pip
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the pinned dependencies

run: $(STAMP)  ## run the main job on the embedded default (SQLite store under mlruns/)
	$(BIN)/regression-model-template run training

lint: $(STAMP)  ## ruff, mypy --strict, deptry (every imported module is a declared dependency)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/deptry src

# The day-to-day suite: everything but the tests marked slow (real servers, PostgreSQL, the
# benchmarks), on parallel workers. worksteal hands each worker a run of neighbouring tests (a
# module's shared fixtures are then built once or twice, not once per worker) and rebalances.
QUICK_TESTS := -m "not slow" --numprocesses 4 --dist worksteal

test: lint  ## lint, type-check, then the suite without the slow tests, on 4 workers (test-all runs all)
	$(BIN)/pytest $(QUICK_TESTS)

# pyenv's Python 3 installs go first on PATH, so that nox finds python3.11, python3.12, ... (not
# pyenv's shims, which fail for a version that is not selected). nox skips a version that is not
# installed, except on CI (CI set), where that fails the run.
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
PYENV_BINS = $(subst $(eval) ,:,$(wildcard $(PYENV_ROOT)/versions/3.*/bin))

test-all: lint  ## lint once, then the whole suite (slow tests too) on every supported Python present (3.11-3.13): CI runs this
	PATH="$(PYENV_BINS)$(if $(PYENV_BINS),:)$$PATH" $(BIN)/nox $(NOX_ARGS)

# pdoc follows a package's __all__, which leaves out the modules of jobs/: name them too.
DOCS := docs/api
DOC_MODULES := regression_model_template \
	$(subst /,.,$(patsubst src/%.py,%,$(wildcard src/regression_model_template/jobs/[!_]*.py)))

docs: $(STAMP)  ## HTML API reference from the docstrings, into docs/api/ (open docs/api/index.html)
	rm -rf $(DOCS)
	$(BIN)/python -m pdoc --docformat google --output-directory $(DOCS) $(DOC_MODULES)

bench: $(STAMP)  ## benchmarks against raw MLflow and loguru; writes benchmarks/RESULTS.md
	$(BIN)/python benchmarks/run.py

# The team's tracking stack, in the foreground until Ctrl-C: PostgreSQL (its cluster in
# $(SERVER_DIR)/postgres, or under PostgreSQL's data root when the postgres user cannot reach that folder;
# created on first use and kept) and mlflow server on $(HOST):$(PORT). Another HOST than loopback
# serves a network: HTTPS and basic auth (the admin from MLFLOW_TRACKING_USERNAME/PASSWORD).
# REPLICAS above 1 runs that many mlflow servers behind haproxy on $(HOST):$(PORT).
HOST ?= 127.0.0.1
PORT ?= 5000
SERVER_DIR ?= .server
WORKERS ?= 2
REPLICAS ?= 1

server: $(STAMP)  ## PostgreSQL + mlflow server on $(HOST):$(PORT) (make server PORT=5001); Ctrl-C stops both
	$(BIN)/regression-model-template server --host $(HOST) --port $(PORT) --folder $(SERVER_DIR) \
		--workers $(WORKERS) --replicas $(REPLICAS)

clean:
	rm -rf $(VENV) .nox .mypy_cache .pytest_cache .ruff_cache $(DOCS) build dist
