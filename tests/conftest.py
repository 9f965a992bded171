"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dist import GlooPool


@pytest.fixture(scope="session")
def gloo_pool() -> Iterator[GlooPool]:
    """Two gloo ranks shared by every distributed test; shut down at the end of the session."""
    pool = GlooPool(world_size=2)
    try:
        yield pool
    finally:
        pool.close()
