"""Fixtures shared by the registry tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def temp(tmp_path, monkeypatch) -> Path:
    """Where ``tempfile.mkdtemp`` (hence a model download) puts its folders during the test."""
    root = tmp_path / "temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root
