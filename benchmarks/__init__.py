"""Benchmarks: the services against raw MLflow and loguru, as ratios measured in the same run.

One module per group of benchmarks (``--only`` names the groups); :mod:`benchmarks.common` holds
what they share; ``python benchmarks/run.py`` (``make bench``) runs them and writes RESULTS.md.
"""

import os

# These machines have no internet; MLflow reads these when it is first imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
