"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dist import GlooPool

# Service fixtures live in services.py; registering them here (once) makes them truly
# session-scoped. Imported into each test module instead, every module got its own "session"
# instance: a second moto server the session's Ray workers never heard of.
from services import ray_session, s3_server  # noqa: F401


@pytest.fixture(scope="session")
def gloo_pool() -> Iterator[GlooPool]:
    """Two gloo ranks shared by every distributed test; shut down at the end of the session."""
    pool = GlooPool(world_size=2)
    try:
        yield pool
    finally:
        pool.close()
