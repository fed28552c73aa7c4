"""The privacy state a server process keeps in memory (server/optout.py) against the real
PostgreSQL: what it hears by NOTIFY, what its re-read confirms, and in which order."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from features.postgres import PgStore
from server.optout import OptOutRegistry


def _user() -> str:
    return "registry-" + uuid.uuid4().hex[:8]


async def _within(condition: Callable[[], bool], bound_s: float) -> float | None:
    """Seconds until ``condition`` held, polled every 10 ms; None if not within ``bound_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > bound_s:
            return None
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def registry(pg: PgStore) -> AsyncIterator[tuple[OptOutRegistry, asyncio.Event]]:
    """A started registry re-reading every second, and an event set after each re-read."""
    optouts = OptOutRegistry(pg, refresh_s=1.0, max_staleness_s=30.0)
    reread = asyncio.Event()
    refresh = optouts.refresh

    async def observed() -> None:
        await refresh()
        reread.set()

    optouts.refresh = observed  # type: ignore[method-assign]
    await optouts.start()
    yield optouts, reread
    await optouts.close()


async def test_a_lost_listen_connection_is_listened_again(
    registry: tuple[OptOutRegistry, asyncio.Event], pg: PgStore, pg_url: str
) -> None:
    optouts, reread = registry
    first, second = _user(), _user()
    await pg.update_settings(first, personalization_enabled=False, data_sharing_consent=None)
    assert await _within(lambda: not optouts.personalization_allowed(first), 0.5) is not None

    owner = await asyncpg.connect(pg_url)
    try:
        terminated = await owner.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        )
    finally:
        await owner.close()
    assert terminated == 1
    # the next re-read listens again; right after it an opt-out is heard by NOTIFY, long
    # before the re-read after that
    reread.clear()
    await asyncio.wait_for(reread.wait(), 5)
    await pg.update_settings(second, personalization_enabled=False, data_sharing_consent=None)
    heard = await _within(lambda: not optouts.personalization_allowed(second), 0.5)
    assert heard is not None, "the opt-out was not heard within 0.5 s: nothing listens"
