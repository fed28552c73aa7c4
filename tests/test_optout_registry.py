"""The privacy state a server process keeps in memory (server/optout.py) against the real
PostgreSQL: what it hears by NOTIFY, what its re-read confirms, and in which order."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from features.postgres import PgStore
from jobs.steps import JobContext
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from server.optout import OptOutRegistry
from tests.serving import Running, serving


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


async def test_a_state_older_than_the_one_recorded_is_ignored(
    registry: tuple[OptOutRegistry, asyncio.Event], pg: PgStore
) -> None:
    optouts, _ = registry
    user = _user()
    optouts.apply(user, False, 10)
    optouts.apply(user, True, 9)  # an opt-in that took effect before the opt-out
    assert not optouts.personalization_allowed(user)
    optouts.apply(user, True, 11)
    optouts.apply(user, False, 10)
    assert optouts.personalization_allowed(user)

    # revisions as PostgreSQL draws them, and kept across a re-read
    user = _user()
    on = await pg.update_settings(user, personalization_enabled=True, data_sharing_consent=None)
    off = await pg.update_settings(user, personalization_enabled=False, data_sharing_consent=None)
    assert await _within(lambda: not optouts.personalization_allowed(user), 0.5) is not None
    await optouts.refresh()
    optouts.apply(user, on.personalization_enabled, on.revision)  # the first update resumes last
    assert not optouts.personalization_allowed(user)
    assert off.revision > on.revision


async def test_concurrent_toggles_leave_memory_as_the_database_says(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext, pg: PgStore
) -> None:
    """Six concurrent UpdateSettings a user, 25 users at once, no re-read to mend anything:
    once the NOTIFYs are in, every user is personalized in memory exactly when the database
    says so."""
    quiet = dataclasses.replace(
        config,
        optout_refresh_s=3600.0,
        optout_max_staleness_s=7200.0,
        max_active_rpcs=256,  # every toggle at once, none refused: replies, commits and
        max_queued_rpcs=2048,  # NOTIFYs interleave as they would on a busy server
        max_queue_wait_s=60.0,
        max_pending_rpcs=0,
        store_timeout_s=30.0,  # the pool's 8 connections serve them all in turn
    )
    async with serving(quiet, pg_url, redis_url) as running:
        settings = rpc.SettingsStub(running.channel)
        optouts = running.app.optouts
        users = [_user() for _ in range(400)]

        async def toggle(user: str, enabled: bool) -> None:
            await settings.UpdateSettings(
                pb.UpdateSettingsRequest(user_id=user, personalization_enabled=enabled),
                metadata=running.service,
                timeout=10,
            )

        for start in range(0, len(users), 25):
            batch = users[start : start + 25]
            await asyncio.gather(*(toggle(u, n % 2 == 0) for u in batch for n in range(6)))
        stored = {u: (await pg.get_settings(u)).personalization_enabled for u in users}
        assert 0 < sum(stored.values()) < len(users)

        def agree() -> bool:
            return all(optouts.personalization_allowed(u) == stored[u] for u in users)

        if await _within(agree, 2.0) is None:
            wrong = [u for u in users if optouts.personalization_allowed(u) != stored[u]]
            raise AssertionError(f"{len(wrong)} users' state in memory is not the database's")


async def _recommend(running: Running) -> pb.RankedItems:
    reply: pb.RankedItems = await rpc.RankingStub(running.channel).Recommend(
        pb.RecommendRequest(user_id="u1", limit=5), metadata=running.service, timeout=5
    )
    return reply


async def _set_flags(running: Running, enabled: bool) -> bool:
    flags = await rpc.AdminStub(running.channel).SetFlags(
        pb.SetFlagsRequest(personalization_enabled=enabled), metadata=running.admin, timeout=5
    )
    return bool(flags.personalization_enabled)


async def test_the_global_switch_holds_in_every_process_and_across_a_restart(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext, pg: PgStore
) -> None:
    try:
        async with (
            serving(config, pg_url, redis_url) as first,
            serving(config, pg_url, redis_url) as second,
        ):
            assert (await _recommend(second)).source != pb.SOURCE_POPULAR
            assert not await _set_flags(first, False)
            assert (await _recommend(first)).source == pb.SOURCE_POPULAR  # at once here
            started = time.monotonic()
            while (await _recommend(second)).source != pb.SOURCE_POPULAR:
                assert time.monotonic() - started < 1.0, "the other process still personalizes"
                await asyncio.sleep(0.01)
        async with serving(config, pg_url, redis_url) as restarted:
            assert (await _recommend(restarted)).source == pb.SOURCE_POPULAR
            info = await rpc.AdminStub(restarted.channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=restarted.admin, timeout=5
            )
            assert not info.personalization_enabled
            assert await _set_flags(restarted, True)
            assert (await _recommend(restarted)).source != pb.SOURCE_POPULAR
    finally:
        await pg.set_personalization(True)


async def test_the_environment_forces_personalization_off_in_its_process_only(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext, pg: PgStore
) -> None:
    forced = dataclasses.replace(config, personalization_enabled=False)
    async with serving(forced, pg_url, redis_url) as off, serving(config, pg_url, redis_url) as on:
        assert not await _set_flags(off, True)  # stored, but this process stays off
        assert (await _recommend(off)).source == pb.SOURCE_POPULAR
        assert (await _recommend(on)).source != pb.SOURCE_POPULAR
        assert (await pg.personalization_switch())[0]
