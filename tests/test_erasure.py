"""Erasure against the jobs' timeline: whatever the order of train, erasure, build,
precompute, cleanup and reload, no snapshot made from data read before a user's erasure
serves that user personally, and nothing Redis kept from before it is used again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from features.errors import StoreUnavailable
from features.postgres import PgStore, TrainingPairs
from features.schema import Interaction, user_digest
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking import snapshot
from server.api import privrank_pb2 as pb
from tests.conftest import Client

PERSONAL = {pb.SOURCE_LIVE, pb.SOURCE_CACHED, pb.SOURCE_RECENT}


async def _trained_scope(ctx: JobContext, client: Client, seed: int) -> str:
    """A small scope of its own, through the nightly jobs and loaded by the server. Its users
    are ``<scope>-u0``..: erasing them leaves other tests' users alone."""
    scope = f"erase{uuid.uuid4().hex[:6]}"
    await ctx.pg.insert_event_batches(
        [dataclasses.replace(e, user_id=f"{scope}-{e.user_id}") for e in batch]
        for batch in generate(users=80, items=50, events=2500, scope=scope, seed=seed)
    )
    await run_job(ctx, "nightly", [scope])
    await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    return scope


async def _sources(client: Client, scope: str, user: str) -> tuple[int, int]:
    """The sources of Recommend and of RankCandidates (ten items) for ``user``."""
    recommended = await client.ranking.Recommend(
        pb.RecommendRequest(user_id=user, scope=scope, limit=5), metadata=client.svc
    )
    ranked = await client.ranking.RankCandidates(
        pb.RankCandidatesRequest(
            user_id=user, scope=scope, candidate_item_ids=[f"i{n}" for n in range(10)]
        ),
        metadata=client.svc,
    )
    return recommended.source, ranked.source


async def _erase(client: Client, user: str) -> None:
    await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )


async def _assert_not_personal(ctx: JobContext, client: Client, scope: str, user: str) -> None:
    """The erased ``user`` is served nothing personal, no ranking of them is cached for the
    current snapshot, and no snapshot published since the erasure holds them."""
    recommend, rank = await _sources(client, scope, user)
    assert recommend not in PERSONAL, pb.Source.Name(recommend)
    assert rank not in PERSONAL, pb.Source.Name(rank)
    current = snapshot.current_version(ctx.config.snapshot_dir, scope)
    assert current is not None
    assert await ctx.cache.get(scope, current, user) is None
    erased_at = client.app.optouts.erased_at(user)
    assert erased_at is not None
    for path in (ctx.config.snapshot_dir / scope).iterdir():
        if path.is_dir() and not path.name.startswith("."):
            snap = snapshot.load(path)
            if snap.created_at > erased_at:
                assert snap.user_position(user) is None, f"{path.name} holds the erased user"


def _erasing_during_read(client: Client, pg: PgStore, user: str) -> Callable[..., object]:
    """``pg.training_pairs`` that erases ``user`` once the pairs are read: the erasure lands
    while train runs, after its read and before its model is written."""
    read = pg.training_pairs

    async def training_pairs(scope: str, **kw: object) -> TrainingPairs:
        pairs = await read(scope, **kw)  # type: ignore[arg-type]
        await _erase(client, user)
        return pairs

    return training_pairs


# a timeline after nightly: "erase" is an erasure, "train~erase" a train with an erasure
# landing after its read (before its model is written), "reload" Admin.Reload, others jobs
TIMELINES = {
    "rebuilt from the old model": ["erase", "build", "precompute", "cleanup", "reload"],
    "erased while train runs": ["train~erase", "build", "reload", "precompute", "cleanup"],
    "served, then rebuilt": ["erase", "reload", "build", "reload", "precompute", "cleanup"],
    "retrained between builds": ["erase", "build", "reload", "train", "build", "reload"],
}


@pytest.mark.parametrize("timeline", TIMELINES)
async def test_no_snapshot_of_data_read_before_an_erasure_serves_the_user(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch, timeline: str
) -> None:
    scope = await _trained_scope(seeded, client, seed=list(TIMELINES).index(timeline))
    user = f"{scope}-u7"
    assert set(await _sources(client, scope, user)) <= PERSONAL  # personal until erased
    erased = False
    for step in TIMELINES[timeline]:
        if step == "erase":
            await _erase(client, user)
        elif step == "reload":
            await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
        elif step == "train~erase":
            with monkeypatch.context() as patch:
                patch.setattr(
                    seeded.pg, "training_pairs", _erasing_during_read(client, seeded.pg, user)
                )
                await run_job(seeded, "train", [scope])
        else:
            await run_job(seeded, step, [scope])
        erased = erased or "erase" in step
        if erased:
            await _assert_not_personal(seeded, client, scope, user)


async def test_an_erased_user_back_with_new_events_is_not_ranked_from_the_old_vector(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Erased while train runs, then back with new events before precompute: precompute
    caches no ranking of the snapshot's (pre-erasure) vector, and none is served."""
    scope = await _trained_scope(seeded, client, seed=11)
    user = f"{scope}-u9"
    with monkeypatch.context() as patch:
        patch.setattr(seeded.pg, "training_pairs", _erasing_during_read(client, seeded.pg, user))
        await run_job(seeded, "train", [scope])
    await run_job(seeded, "build", [scope])
    await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    await client.ranking.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                pb.Event(user_id=user, item_id=f"i{n}", scope=scope, event_type=pb.CLICK)
                for n in (1, 2)
            ]
        ),
        metadata=client.svc,
    )
    await run_job(seeded, "precompute", [scope])
    current = snapshot.load_current(seeded.config.snapshot_dir, scope)
    assert current.user_position(user) is None
    assert await seeded.cache.get(scope, current.version, user) is None
    recommend, rank = await _sources(client, scope, user)
    assert recommend not in {pb.SOURCE_LIVE, pb.SOURCE_CACHED}
    assert rank != pb.SOURCE_LIVE


async def test_a_rebuild_keeps_the_version_until_an_erasure_changes_its_users(
    client: Client, seeded: JobContext
) -> None:
    """A re-run of build, or of train and build over the same data (a retried nightly),
    publishes nothing new, so no server swaps and the cached rankings stay in use; one after
    an erasure leaves the user out: a new version."""
    scope = await _trained_scope(seeded, client, seed=12)
    version = snapshot.current_version(seeded.config.snapshot_dir, scope)
    await run_job(seeded, "build", [scope])
    assert snapshot.current_version(seeded.config.snapshot_dir, scope) == version
    await run_job(seeded, "train", [scope])  # a retried nightly over the same data
    await run_job(seeded, "build", [scope])
    assert snapshot.current_version(seeded.config.snapshot_dir, scope) == version
    await _erase(client, f"{scope}-u5")
    await run_job(seeded, "build", [scope])
    rebuilt = snapshot.load_current(seeded.config.snapshot_dir, scope)
    assert rebuilt.version != version
    assert rebuilt.user_position(f"{scope}-u5") is None


async def test_an_erasure_redis_could_not_purge_is_refused_and_its_recent_items_unused(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails the purge: DeleteUserData answers UNAVAILABLE (retry it), and the user's
    recent items left behind are not ranked from, even once a snapshot of data read after
    the erasure would rank the user personally; those the user sends afterwards are."""
    scope = await _trained_scope(seeded, client, seed=13)
    user = "newcomer-erased"

    async def click(*items: str) -> None:
        await client.ranking.RecordEvents(
            pb.RecordEventsRequest(
                events=[
                    pb.Event(user_id=user, item_id=i, scope=scope, event_type=pb.CLICK)
                    for i in items
                ]
            ),
            metadata=client.svc,
        )

    async def recommend() -> pb.RankedItems:
        return await client.ranking.Recommend(
            pb.RecommendRequest(user_id=user, scope=scope, limit=5), metadata=client.svc
        )

    await click("i3", "i5")
    assert (await recommend()).source == pb.SOURCE_RECENT

    async def unreachable(_user_id: str) -> int:
        raise StoreUnavailable("Redis: connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(client.app.cache, "delete_user", unreachable)
        with pytest.raises(aio.AioRpcError) as refused:
            await _erase(client, user)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry DeleteUserData" in (refused.value.details() or "")
    assert await seeded.cache.recent(scope, user) == ["i5", "i3"]  # left behind

    await run_job(seeded, "train", [scope])  # reads data after the erasure
    await run_job(seeded, "build", [scope])
    await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    assert (await recommend()).source == pb.SOURCE_POPULAR

    await click("i8")  # back after the erasure: only this counts
    answer = await recommend()
    assert answer.source == pb.SOURCE_RECENT
    snap = client.app.ranker.scope(scope).snapshot
    (pos,) = snap.item_positions(["i8"])
    scores = snap.item_unit @ snap.item_unit[pos]
    scores[pos] = -np.inf
    best = sorted(range(snap.n_items), key=lambda i: (-scores[i], i))[:5]
    assert [i.item_id for i in answer.items] == [str(snap.item_ids[i]) for i in best]

    await _erase(client, user)  # the retry purges what was left
    exported = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=client.svc
    )
    assert exported.cached_rankings == 0


async def test_a_repeated_erasure_counts_nothing_removed(
    client: Client, seeded: JobContext
) -> None:
    """The receipt's ``snapshot`` counts the loaded snapshots the erasure masked the user in:
    once masked, a repeat (nothing new to remove) counts zeros throughout."""
    scope = await _trained_scope(seeded, client, seed=14)
    user = f"{scope}-u3"
    first = await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )
    assert first.removed["events"] > 0
    assert first.removed["snapshot"] == 1
    again = await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )
    assert dict(again.removed) == dict.fromkeys(first.removed, 0)


async def test_events_recorded_while_their_user_is_erased_leave_nothing_in_redis(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An erasure that completes between RecordEvents storing the events and writing their
    items to Redis (its purge ran before that write): the re-check after the write deletes
    them, so the user's export counts nothing cached."""
    user = f"erased-mid-record-{uuid.uuid4().hex[:6]}"
    insert = client.app.pg.insert_events

    async def insert_then_erase(events: Sequence[Interaction]) -> int:
        accepted = await insert(events)
        await _erase(client, user)
        return accepted

    monkeypatch.setattr(client.app.pg, "insert_events", insert_then_erase)
    event = pb.Event(user_id=user, item_id="i1", event_type=pb.CLICK)
    await client.ranking.RecordEvents(pb.RecordEventsRequest(events=[event]), metadata=client.svc)
    monkeypatch.undo()
    assert await client.app.cache.count_user(user) == 0
    export = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=client.svc
    )
    assert export.cached_rankings == 0


class _PausedAfter:
    """delete_user's connection, held after its statement starting with ``prefix`` (a heavy
    user's delete takes a while) until ``resume`` is set; ``deleting`` is set then."""

    def __init__(
        self, conn: Any, prefix: str, deleting: asyncio.Event, resume: asyncio.Event
    ) -> None:
        self._conn, self._prefix, self._deleting, self._resume = conn, prefix, deleting, resume

    async def execute(self, sql: str, *args: Any) -> str:
        status: str = await self._conn.execute(sql, *args)
        if sql.startswith(self._prefix):
            self._deleting.set()
            await self._resume.wait()
        return status


async def test_an_erasure_still_committing_when_train_reads_is_masked_or_left_out(
    seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteUserData's transaction has begun but not committed when train takes data_as_of
    and reads, so the read may still see the user's events: the snapshot built from it must
    leave the user out, or be one the server masks them in (erased_at >= data_as_of). The
    erasure was stamped with its transaction's start, before data_as_of: neither held."""
    pg = seeded.pg
    scope = "race" + uuid.uuid4().hex[:6]
    await pg.insert_event_batches(
        [dataclasses.replace(e, user_id=f"{scope}-{e.user_id}") for e in batch]
        for batch in generate(users=40, items=30, events=1500, scope=scope, seed=5)
    )
    user = f"{scope}-u3"
    deleting, resume, read = asyncio.Event(), asyncio.Event(), asyncio.Event()
    scoped, training_pairs = pg._user_scoped, pg.training_pairs

    @contextlib.asynccontextmanager
    async def paused(user_id: str) -> AsyncIterator[Any]:
        async with scoped(user_id) as conn:
            yield _PausedAfter(conn, "DELETE FROM events", deleting, resume)

    async def reading(scope: str, **kw: Any) -> TrainingPairs:
        pairs = await training_pairs(scope, **kw)
        read.set()
        return pairs

    monkeypatch.setattr(pg, "_user_scoped", paused)
    monkeypatch.setattr(pg, "training_pairs", reading)
    erasure = asyncio.ensure_future(pg.delete_user(user))
    await deleting.wait()
    job = asyncio.ensure_future(run_job(seeded, "train", [scope]))
    with contextlib.suppress(TimeoutError):  # a train that waits for the erasure reads later
        await asyncio.wait_for(read.wait(), 3)
    resume.set()
    assert (await erasure)["events"] > 0
    await job
    monkeypatch.undo()
    snap = snapshot.load_current(seeded.config.snapshot_dir, scope)
    erased_at = (await pg.erasures(since=datetime(1970, 1, 1, tzinfo=UTC)))[user_digest(user)]
    assert snap.user_position(user) is None or erased_at >= snap.data_as_of


async def test_features_a_refresh_computed_while_the_user_was_erased_do_not_come_back(
    seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """refresh-features reads a user's events while their erasure is still committing, then
    waits on the row the erasure deletes and writes it again: the erased user's aggregates
    would be back in user_features. The refresh deletes them once it commits."""
    pg = seeded.pg
    scope = "refresh" + uuid.uuid4().hex[:6]
    await pg.insert_event_batches(
        [dataclasses.replace(e, user_id=f"{scope}-{e.user_id}") for e in batch]
        for batch in generate(users=20, items=20, events=600, scope=scope, seed=6)
    )
    now = datetime.now(UTC)
    await pg.refresh_features(scope, now=now)
    user = f"{scope}-u3"
    assert user in (await pg.user_features(scope))[0].tolist()
    deleting, resume = asyncio.Event(), asyncio.Event()
    scoped = pg._user_scoped

    @contextlib.asynccontextmanager
    async def paused(user_id: str) -> AsyncIterator[Any]:
        async with scoped(user_id) as conn:
            yield _PausedAfter(conn, "DELETE FROM user_features", deleting, resume)

    monkeypatch.setattr(pg, "_user_scoped", paused)
    erasure = asyncio.ensure_future(pg.delete_user(user))
    await deleting.wait()
    refresh = asyncio.ensure_future(pg.refresh_features(scope, now=now))
    await asyncio.sleep(0.5)  # reading, then waiting on the user's row
    resume.set()
    await erasure
    await refresh
    monkeypatch.undo()
    assert user not in (await pg.user_features(scope))[0].tolist()
