"""Cold start: the command line's ``--help`` and the package's import vs ``import mlflow``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, row


def run(context: Context) -> list[Row]:
    return bench_cold_start(context.sizes)


def bench_cold_start(sizes: Sizes) -> list[Row]:
    cli = str(Path(sys.executable).with_name("regression-model-template"))
    commands = {
        "pass": [sys.executable, "-c", "pass"],
        "import mlflow": [sys.executable, "-c", "import mlflow"],
        "import package": [sys.executable, "-c", "import regression_model_template"],
        "--help": [cli, "--help"],
    }
    times = {}
    for name, command in commands.items():
        runs = []
        for _ in range(max(sizes.repeats, 3)):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        times[name] = median(runs)
    base = times["import mlflow"]
    return [
        row("cold start: --help vs import mlflow", times["--help"], "s", base, 0.25, "<= 0.25x"),
        row("cold start: import package vs mlflow", times["import package"], "s", base, None, ""),
        row("cold start: python -c pass", times["pass"], "s", None, None, "(reference)"),
    ]
