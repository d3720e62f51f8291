"""Smoke test of the benchmarks: they run and every value lands (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmarks_run_and_write_the_table(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

    # run.py raises (non-zero exit) when a value or a log line is missing from the store
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    table = output.read_text()
    for name in ("metrics sqlite", "heartbeat", "job overhead", "injection", "lifecycle",
                 "logging", "alerts", "cold start"):  # fmt: skip
        assert f"| {name}" in table


@pytest.mark.slow
def test_only_some_groups_print_their_rows_and_write_no_table(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    script = str(ROOT / "benchmarks" / "run.py")

    result = subprocess.run(
        [sys.executable, script, "--quick", "--only", "injection"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    unknown = subprocess.run(
        [sys.executable, script, "--only", "injection,nope"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("injection: @inject overhead per call |")
    assert len(result.stdout.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no table written (nor any store left behind)
    assert unknown.returncode == 2
    assert "unknown group(s) nope" in unknown.stderr
