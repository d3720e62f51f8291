"""The README's Python examples run as written: the docs cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regression_model_template.testing import clean_environ

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> dict[str, str]:
    """README code blocks, keyed by the file named on their first line (``# path``)."""
    blocks = {}
    for index, code in enumerate(BLOCK.findall(README.read_text())):
        first = code.splitlines()[0]
        name = first[2:].strip() if first.startswith("# ") else f"example_{index}.py"
        blocks[name] = code
    return blocks


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # the tree under test first, before whatever copy of the package the interpreter installed
    env = clean_environ(PYTHONPATH=os.pathsep.join([str(cwd), str(ROOT / "src")]))
    for name in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(name, None)  # alerts go to the console
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_services_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_blocks()["example_0.py"])

    result = _run([sys.executable, str(script)], tmp_path)

    assert result.returncode == 0, result.stderr
    assert "[regression_model_template] Training: done" in result.stdout
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()


@pytest.mark.slow
def test_your_own_job_and_its_test_run(tmp_path: Path) -> None:
    blocks = _blocks()
    for name in ("my_project/jobs.py", "my_project/__main__.py", "conftest.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(blocks[name])
    (tmp_path / "my_project" / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_scoring.py").write_text(blocks["tests/test_scoring.py"])

    job = _run([sys.executable, "-m", "my_project"], tmp_path)
    tests = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)

    assert job.returncode == 0, job.stderr
    assert "[regression_model_template] scoring: done" in job.stdout
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout
