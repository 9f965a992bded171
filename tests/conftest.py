"""Shared pytest fixtures and the ``slow`` marker's rule."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures.dist import GlooPool

# Service fixtures live in fixtures/services.py; registering them here (once) makes them truly
# session-scoped. Imported into each test module instead, every module got its own "session"
# instance: a second moto server the session's Ray workers never heard of.
from fixtures.services import ray_head, ray_session, s3_server  # noqa: F401

# A test that uses one of these starts Ray (or a server Ray workers read): it is slow.
SLOW_FIXTURES = {"ray_session", "ray_head", "s3_server"}


@pytest.fixture(scope="session")
def gloo_pool() -> Iterator[GlooPool]:
    """Two gloo ranks shared by every distributed test; shut down at the end of the session."""
    pool = GlooPool(world_size=2)
    try:
        yield pool
    finally:
        pool.close()


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that starts Ray as ``slow``, so ``make test-fast`` never starts one.

    Tests that start DeepSpeed or MLflow without these fixtures carry the mark themselves
    (``pytestmark`` in their module).
    """
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
