"""Shared pytest fixtures, the ``slow`` marker's rule and the session's leftover check."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fixtures.dist import GlooPool
from fixtures.leftovers import Leftovers

# Service fixtures live in fixtures/services.py; registering them here (once) makes them truly
# session-scoped. Imported into each test module instead, every module got its own "session"
# instance: a second moto server the session's Ray workers never heard of.
from fixtures.services import mlflow_server, ray_head, ray_session, ray_two_nodes, s3_server  # noqa: F401
from fixtures.stac_server import stac_api  # noqa: F401

# A test that uses one of these starts Ray (or a server Ray workers read): it is slow.
SLOW_FIXTURES = {"ray_session", "ray_head", "ray_two_nodes", "s3_server", "mlflow_server"}


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


_leftovers: Leftovers | None = None


def pytest_sessionstart(session) -> None:
    """Mark the session's processes and list the temp folders before anything starts."""
    global _leftovers
    _leftovers = Leftovers.start()


@pytest.fixture(scope="session", autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the run when the session leaves a temp folder or a running process behind.

    Autouse and session-scoped, so it is set up before and torn down after every other
    session fixture: Ray, moto and the gloo ranks are stopped by then.
    """
    global _leftovers
    if _leftovers is None:  # sessionstart ran before this conftest was loaded
        _leftovers = Leftovers.start()
    yield
    found = _leftovers.finish()
    if found:
        pytest.fail("the test session left these behind (every test removes what it creates):\n  "
                    + "\n  ".join(found), pytrace=False)
