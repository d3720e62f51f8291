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
    for name in ("metrics sqlite", "injection", "lifecycle", "logging", "alerts", "cold start"):
        assert f"| {name}" in table
