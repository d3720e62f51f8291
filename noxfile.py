"""The test suite on every supported Python: ``make test-all`` runs ``nox`` after ``make lint``.

Each interpreter gets its own virtual environment under ``.nox/`` with the pinned dependencies
(``-c constraints.txt -e '.[dev]'``) and runs pytest there. Lint (ruff, mypy --strict) does not
depend on the interpreter and runs once, in ``.venv``, before this (``make lint``).

An interpreter that is not installed is skipped, except on CI (``CI`` set), where it is an
error: ``make test-all`` puts pyenv's installs first on ``PATH`` so that nox finds them.
"""

from __future__ import annotations

import os

import nox

#: The interpreters ``requires-python`` claims; keep in step with pyproject.toml.
PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
# These machines reach no download site for Python builds: use the interpreters that are here.
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = "CI" in os.environ


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install the pinned dependencies, then run the whole suite (extra arguments go to pytest)."""
    # No internet on these machines: keep MLflow's telemetry quiet, as the Makefile does.
    session.env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    session.install("--disable-pip-version-check", "-c", "constraints.txt", "-e", ".[dev]")
    # The whole suite in two passes: what `make test` runs, on parallel workers as there; then
    # the slow tests (real servers, PostgreSQL, jobs under load), one at a time as they were
    # measured. Extra arguments go to both; a pass they leave empty is then not an error.
    empty_ok = [0, 5] if session.posargs else [0]
    quick = ["-m", "not slow", "--numprocesses", "4", "--dist", "worksteal"]
    session.run("pytest", *quick, *session.posargs, success_codes=empty_ok)
    session.run("pytest", "-m", "slow", *session.posargs, success_codes=empty_ok)
