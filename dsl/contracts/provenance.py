"""Which code made an artefact: recorded in manifests, MLflow runs and model versions."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import dsl


@functools.cache
def code_version() -> str:
    """``<package version>+<git short hash>`` inside a checkout, else the package version."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    return f"{dsl.__version__}+{rev}" if rev else dsl.__version__
