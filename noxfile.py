"""The test suite on every supported Python, and the package as its users install it.

``make test-all`` (what CI runs) runs ``make lint``, then nox's default sessions:

- ``tests-3.11``, ``tests-3.12``, ``tests-3.13``: each interpreter gets its own virtual
  environment under ``.nox/`` with the pinned dependencies (``-c constraints.txt -e '.[dev]'``)
  and runs pytest there;
- ``installed``: builds the wheel and the sdist, installs the wheel with the pins into a clean
  environment without extras, and uses it from an empty folder as a user would.

Environments are made and filled by uv (``venv_backend="uv"``). Lint (ruff, mypy --strict,
deptry) does not depend on the interpreter and runs once, in ``.venv``, before this.

An interpreter that is not installed is skipped, except on CI (``CI`` set), where it is an
error: ``make test-all`` puts pyenv's installs first on ``PATH`` so that nox finds them.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import nox

#: The interpreters ``requires-python`` claims; keep in step with pyproject.toml.
PYTHONS = ["3.11", "3.12", "3.13"]

#: What the wheel must carry besides the modules (the profiles and the licence).
WHEEL_DATA = [
    "regression_model_template/py.typed",
    "regression_model_template/profiles/local.yaml",
    "regression_model_template/profiles/server.yaml",
    "regression_model_template-{version}.dist-info/licenses/LICENSE",
]

#: No internet on these machines: keep MLflow's telemetry quiet, as the Makefile does.
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

nox.options.sessions = ["tests", "installed"]
nox.options.default_venv_backend = "uv"
# These machines reach no download site for Python builds: use the interpreters that are here.
nox.options.download_python = "never"
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
# Where Python may not cache bytecode as it goes, uv compiles it at install (see the Makefile).
if os.environ.get("PYTHONDONTWRITEBYTECODE"):
    os.environ.setdefault("UV_COMPILE_BYTECODE", "1")
nox.options.error_on_missing_interpreters = "CI" in os.environ


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install the pinned dependencies, then run the whole suite (extra arguments go to pytest)."""
    session.env.update(QUIET)
    session.install("-c", "constraints.txt", "-e", ".[dev]")
    # The whole suite in two passes: what `make test` runs, on parallel workers as there; then
    # the slow tests (real servers, PostgreSQL, jobs under load), one at a time as they were
    # measured. Extra arguments go to both; a pass they leave empty is then not an error.
    empty_ok = [0, 5] if session.posargs else [0]
    quick = ["-m", "not slow", "--numprocesses", "4", "--dist", "worksteal"]
    session.run("pytest", *quick, *session.posargs, success_codes=empty_ok)
    session.run("pytest", "-m", "slow", *session.posargs, success_codes=empty_ok)


@nox.session(python=PYTHONS[0])
def installed(session: nox.Session) -> None:
    """Build the wheel and the sdist; install the wheel, no extras; run the package from it."""
    session.env.update(QUIET)
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("uv", "build", "--quiet", "--out-dir", str(dist))
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as archive:
        missing = {name.format(version=version) for name in WHEEL_DATA} - set(archive.namelist())
    if missing:
        session.error(f"the wheel lacks {sorted(missing)}")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
    if missing := {"LICENSE", "containers/local.yaml", "containers/server.yaml"} - names:
        session.error(f"the sdist lacks {sorted(missing)}")

    session.install("-c", "constraints.txt", str(wheel))
    empty = dist.parent / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    session.chdir(empty)
    # Imported from the environment, not from this checkout.
    session.run("python", "-c", "import regression_model_template as p; print(p.__file__)")
    command = "regression-model-template"
    session.run(command, "--version")
    session.run(command, "run", "training")
    session.run(command, "run", "evaluation")
    shown = session.run(
        command,
        *("config", "show", "--profile", "server"),
        env={"MLFLOW_TRACKING_URI": "http://ci:not-a-secret@127.0.0.1:5000"},
        silent=True,
    )
    print(shown)
    if not isinstance(shown, str) or "server.yaml" not in shown or "not-a-secret" in shown:
        session.error("config show --profile server: no bundled profile, or the secret shown")
    session.run(command, "check")
    session.run(command, "recover")
    # Without the s3 extra there is no boto3 (MLflow does not bring it): an S3 destination is
    # refused at the call, exit 2, naming the extra, before anything starts.
    session.run("python", "-c", "import importlib.util as u; assert not u.find_spec('boto3')")
    said = session.run(
        command, *("server", "--artifacts-destination", "s3://bucket/x", "--folder", "srv"),
        success_codes=[2], silent=True,
    )  # fmt: skip
    print(said)
    if not isinstance(said, str) or "pip install 'regression-model-template[s3]'" not in said:
        session.error("server --artifacts-destination s3://...: the s3 extra is not named")
    session.run("uv", "pip", "check")
