"""Contract tests of the stores against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import postgres
from features.breaker import CircuitBreaker
from features.cache import PipelinedConnection, RankCache, pack_ranking, unpack_ranking
from features.errors import JobLocked, StoreUnavailable
from features.postgres import _MIGRATION_LOCK_KEY, FEEDBACK_SQL, PgStore
from features.schema import FEATURE_NAMES, Interaction, make_interaction, user_digest
from tests.conftest import fresh_database

ALTER_EVENTS = "ALTER TABLE events ADD COLUMN test_only integer"


def _scope() -> str:
    return "t" + uuid.uuid4().hex[:8]


def _event(
    scope: str,
    user: str,
    item: str,
    kind: str = "view",
    *,
    days_ago: float = 1.0,
    session: str = "s1",
    at: datetime | None = None,
):
    return make_interaction(
        scope=scope,
        user_id=user,
        item_id=item,
        event_type=kind,
        value=1.0,
        occurred_at=at or datetime.now(UTC) - timedelta(days=days_ago),
        session_id=session,
        device_category="mobile",
        country="DE",
        utc_offset_minutes=60,
    )


async def test_migrate_is_idempotent(owner_pg: PgStore) -> None:
    assert await owner_pg.migrate() == []


async def test_the_feedback_count_reads_its_index(pg_url: str, owner_pg: PgStore) -> None:
    """Admin.GetMetrics' per-variant count can be answered from events_feedback (the planner
    takes it on a big table; with sequential scans off it must take it on any)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        sql = FEEDBACK_SQL.replace("$1", "'s'").replace("$2", "now()")
        plan = "\n".join(row[0] for row in await conn.fetch("EXPLAIN " + sql))
    finally:
        await conn.close()
    # an index-only scan, or a bitmap scan where the table's pages are not all-visible yet
    assert "events_feedback" in plan
    assert "Seq Scan" not in plan


@pytest.fixture
async def before_0005(server_pg_url: str) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database of its own, migrated as it was before 0005 (the feedback index), and an
    admin connection to it."""
    async with fresh_database(server_pg_url) as url:
        owner = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
        await owner.migrate()
        await owner.close()
        admin = await asyncpg.connect(url)
        await admin.execute("DROP INDEX events_feedback")
        await admin.execute("DELETE FROM schema_migrations WHERE version = '0005_feedback_index'")
        try:
            yield url, admin
        finally:
            await admin.close()


async def _index_valid(admin: asyncpg.Connection, name: str) -> bool | None:
    """None if the index does not exist."""
    valid: bool | None = await admin.fetchval(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = $1",
        name,
    )
    return valid


async def _waiting_index_build(admin: asyncpg.Connection) -> int:
    """The pid of the backend whose CREATE INDEX CONCURRENTLY waits on a lock (polls up to 10 s)."""
    for _ in range(200):
        pid: int | None = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock'"
        )
        if pid is not None:
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError("no index build started")


@asynccontextmanager
async def _open_write_on_events(url: str) -> AsyncIterator[asyncpg.transaction.Transaction]:
    """A transaction holding a writer's lock on events: a concurrent index build waits for it."""
    writer = await asyncpg.connect(url)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
        yield tx
    finally:
        await writer.close()  # rolls back what is still open


async def test_the_feedback_index_builds_while_events_are_written(
    before_0005: tuple[str, asyncpg.Connection],
) -> None:
    """0005 waits for a write in progress instead of blocking writes behind it, and a second
    process migrating meanwhile takes its turn: had it blocked in pg_advisory_lock, its
    snapshot would hold up the build while the build's session holds the lock (a deadlock
    PostgreSQL breaks by failing one of them)."""
    url, admin = before_0005
    first = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
    second = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
    try:
        async with _open_write_on_events(url) as write:
            building = asyncio.create_task(first.migrate())
            await _waiting_index_build(admin)
            waiting = asyncio.create_task(second.migrate())
            await asyncio.sleep(0.5)  # the second is waiting for the migration lock
            async with admin.transaction():  # the build holds no lock that blocks writers
                await admin.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE NOWAIT")
            await write.commit()
            results = await asyncio.wait_for(asyncio.gather(building, waiting), 30)
    finally:
        await first.close()
        await second.close()
    assert results == [["0005_feedback_index"], []]
    assert await _index_valid(admin, "events_feedback") is True


async def test_an_interrupted_index_build_is_redone(
    before_0005: tuple[str, asyncpg.Connection],
) -> None:
    """A build killed mid-way leaves an invalid index, which IF NOT EXISTS alone would keep
    for good: the next migration drops it and builds it again."""
    url, admin = before_0005
    owner = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
    try:
        async with _open_write_on_events(url):
            building = asyncio.create_task(owner.migrate())
            pid = await _waiting_index_build(admin)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(StoreUnavailable):
                await building
        assert await _index_valid(admin, "events_feedback") is False
        assert await owner.migrate() == ["0005_feedback_index"]
    finally:
        await owner.close()
    assert await _index_valid(admin, "events_feedback") is True


async def test_a_migration_waits_its_turn_then_gives_up(owner_pg: PgStore, pg_url: str) -> None:
    holder = await asyncpg.connect(pg_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        with pytest.raises(JobLocked, match=r"migrating the schema for over 0\.5 s"):
            await owner_pg.migrate(lock_wait_s=0.5)
        await holder.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
        assert await owner_pg.migrate() == []
    finally:
        await holder.close()


async def test_a_migration_waiting_on_a_long_read_does_not_hold_up_writers(
    server_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ALTER TABLE queued behind a reader blocks every writer of the table behind it: a
    migration gives up its wait soon, tries again a few times, then says why it failed."""
    pending = [*postgres._migration_scripts(), ("9999_alter_events", ALTER_EVENTS)]
    async with fresh_database(server_pg_url) as url:
        owner = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
        writer = None
        reader = await asyncpg.connect(url)
        try:
            await owner.migrate()
            writer = await PgStore.connect(url, timeout_s=10)
            monkeypatch.setattr(postgres, "_migration_scripts", lambda: pending)
            async with reader.transaction():  # a job's long read of events
                await reader.fetchval("SELECT count(*) FROM events")
                migrating = asyncio.create_task(owner.migrate(table_lock_wait_s=0.5, attempts=2))
                await asyncio.sleep(0.2)  # the ALTER is waiting for its lock
                started = time.monotonic()
                await asyncio.wait_for(writer.insert_events([_event("w", "a", "x")]), 5)
                assert time.monotonic() - started < 1.0
                with pytest.raises(JobLocked, match="9999_alter_events: a table it changes"):
                    await migrating
            assert await owner.migrate() == ["9999_alter_events"]
        finally:
            await reader.close()
            await owner.close()
            if writer is not None:
                await writer.close()


async def test_events_round_trip_into_training_pairs(pg: PgStore) -> None:
    scope = _scope()
    stored = await pg.insert_events(
        [
            _event(scope, "a", "x", "view"),
            _event(scope, "a", "x", "purchase"),
            _event(scope, "a", "y", "impression"),
            _event(scope, "b", "y", "dismiss"),
        ]
    )
    assert stored == 4
    pairs = await pg.training_pairs(scope)
    got = {
        (u, i): s for u, i, s in zip(pairs.user_ids, pairs.item_ids, pairs.strength, strict=True)
    }
    # impressions are not interactions; a dismissal is "seen" with zero strength
    assert got == {("a", "x"): pytest.approx(5.0), ("b", "y"): 0.0}
    assert scope in await pg.scopes()


async def test_events_of_an_erased_user_from_before_the_erasure_are_not_stored(
    pg: PgStore, pg_url: str
) -> None:
    """Late (an import of yesterday's file) or racing (an erasure committed while the import's
    transaction ran, which its delete could not see): the user's events that occurred before
    the erasure are not kept; those after it are new data and are."""
    scope, tag = _scope(), uuid.uuid4().hex[:8]
    late, racing, other = (f"{n}-{tag}" for n in ("late", "racing", "other"))
    await pg.delete_user(late)
    after_it = datetime.now(UTC) + timedelta(seconds=1)
    assert (
        await pg.insert_events(
            [
                _event(scope, late, "x"),
                _event(scope, late, "y", at=after_it),
                _event(scope, other, "x"),
            ]
        )
        == 2
    )

    async def erase() -> None:
        eraser = await PgStore.connect(pg_url, timeout_s=5)
        try:
            await eraser.delete_user(racing)
        finally:
            await eraser.close()

    def erase_between_batches() -> Iterator[list[Interaction]]:
        yield [_event(scope, racing, "x"), _event(scope, other, "y")]
        # committed while the import's transaction is open (on a thread: the generator is
        # iterated on the event loop, which waits for it meanwhile)
        erasing = threading.Thread(target=asyncio.run, args=(erase(),))
        erasing.start()
        erasing.join()
        yield [_event(scope, other, "z")]

    assert await pg.insert_event_batches(erase_between_batches()) == 2
    pairs = await pg.training_pairs(scope)
    assert sorted(zip(pairs.user_ids, pairs.item_ids, strict=True)) == [
        (late, "y"),
        (other, "x"),
        (other, "y"),
        (other, "z"),
    ]


async def test_item_stats_before_a_cutoff_leave_the_cutoff_and_later_out(pg: PgStore) -> None:
    scope = _scope()
    cutoff = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    await pg.insert_events(
        [
            _event(scope, "a", "old", "view", at=cutoff - timedelta(days=1)),
            _event(scope, "b", "old", "impression", at=cutoff - timedelta(hours=1)),
            _event(scope, "c", "old", "purchase", at=cutoff),  # held out: at the cutoff
            _event(scope, "a", "edge", "click", at=cutoff),  # first seen at the cutoff
            _event(scope, "a", "new", "view", at=cutoff + timedelta(hours=1)),
        ]
    )
    before = await pg.item_stats(scope, before=cutoff)
    assert before.item_ids.tolist() == ["old"]
    # the view (weight 1) and the impression (0) count, the purchase at the cutoff does not
    assert (float(before.popularity[0]), float(before.engagement[0])) == (1.0, 0.5)
    assert float(before.first_seen[0]) == (cutoff - timedelta(days=1)).timestamp()
    # as of a time, the window ends at it inclusively
    at = await pg.item_stats(scope, now=cutoff)
    assert dict(zip(at.item_ids.tolist(), at.popularity.tolist(), strict=True)) == {
        "old": 5.0,
        "edge": 1.0,
        "new": 0.0,
    }
    with pytest.raises(ValueError, match="one of now= and before="):
        await pg.item_stats(scope)


async def test_a_failing_batch_keeps_nothing(pg: PgStore) -> None:
    scope = _scope()

    def batches():
        yield [_event(scope, "a", "x")]
        raise ValueError("bad line")

    with pytest.raises(ValueError, match="bad line"):
        await pg.insert_event_batches(batches())
    assert len((await pg.training_pairs(scope)).user_ids) == 0
    assert scope not in await pg.scopes()


async def test_refresh_features_aggregates_in_sql(pg: PgStore) -> None:
    scope = _scope()
    await pg.insert_events(
        [
            _event(scope, "a", "x", "impression", session="s1"),
            _event(scope, "a", "x", "click", session="s1"),
            _event(scope, "a", "y", "impression", session="s2", days_ago=10),
            _event(scope, "a", "y", "impression", session="s2", days_ago=10),
        ]
    )
    assert await pg.refresh_features(scope, now=datetime.now(UTC)) == 1
    ids, matrix = await pg.user_features(scope)
    assert list(ids) == ["a"]
    row = dict(zip(("engagement", "ctr", "s7", "s30"), matrix[0][:4], strict=False))
    assert row["ctr"] == pytest.approx(1 / 3)
    assert row["s7"] == 1
    assert row["s30"] == 2


async def test_time_of_day_features_ignore_the_databases_time_zone(server_pg_url: str) -> None:
    """Local hours are UTC plus the event's offset, as serving computes a request's segment,
    whatever TimeZone the database or server defaults to."""
    at = datetime(2026, 12, 1, 14, 30, tzinfo=UTC)  # 15:30 at the events' UTC+1
    async with fresh_database(server_pg_url) as url:
        admin = await asyncpg.connect(url)
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
        finally:
            await admin.close()
        owner = await PgStore.connect(url, timeout_s=10, role=None, max_size=1)
        await owner.migrate()
        await owner.close()
        store = await PgStore.connect(url, timeout_s=10)
        try:
            scope = _scope()
            await store.insert_events([_event(scope, "a", "x", "click", at=at)] * 3)
            await store.refresh_features(scope, now=at + timedelta(hours=1))
            _, matrix = await store.user_features(scope)
            segments = await store.segment_popularity(scope, now=at + timedelta(hours=1))
        finally:
            await store.close()
    assert matrix[0][FEATURE_NAMES.index("preferred_hour")] == 15
    assert {daypart for daypart, _, _, _ in segments} == {15 // 6}


async def test_settings_default_update_and_optout_set(pg: PgStore) -> None:
    user = "user-" + uuid.uuid4().hex[:8]
    default = await pg.get_settings(user)
    assert default.personalization_enabled
    assert not default.data_sharing_consent
    changed = await pg.update_settings(
        user, personalization_enabled=False, data_sharing_consent=None
    )
    assert not changed.personalization_enabled
    assert not changed.data_sharing_consent
    assert (await pg.opted_out_users())[user] == changed.revision
    kept = await pg.update_settings(user, personalization_enabled=None, data_sharing_consent=True)
    assert not kept.personalization_enabled
    assert kept.data_sharing_consent


async def test_settings_changes_and_erasures_are_notified(pg: PgStore) -> None:
    user = "user-" + uuid.uuid4().hex[:8]
    heard: asyncio.Queue[tuple[str, int, str]] = asyncio.Queue()
    listener = await pg.listen_settings(lambda *message: heard.put_nowait(message))

    async def next_about(subject: str) -> tuple[str, int, str]:
        while (got := await asyncio.wait_for(heard.get(), 5))[2] != subject:
            pass
        return got

    try:
        off = await pg.update_settings(
            user, personalization_enabled=False, data_sharing_consent=None
        )
        assert await next_about(user) == ("0", off.revision, user)
        on = await pg.update_settings(user, personalization_enabled=True, data_sharing_consent=None)
        assert on.revision > off.revision
        assert await next_about(user) == ("1", on.revision, user)
        await pg.delete_user(user)
        kind, revision, _ = await next_about(user)
        assert (kind, revision > on.revision) == ("1", True)
        # an erasure is announced by hash only, never by the ID
        assert await next_about(user_digest(user)) == ("E", 0, user_digest(user))
    finally:
        await listener.stop()


@pytest.mark.usefixtures("pg")  # migrated, its service role made
async def test_a_listen_the_server_never_answers_gives_up_in_time(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LISTEN has no timeout of its own: a server that accepts the connection, then hangs,
    must cost the opt-out registry the store timeout, not its refresh loop forever; the
    connection is not left open."""
    store = await PgStore.connect(pg_url, timeout_s=0.3)
    opened: list[asyncpg.Connection] = []
    connect = asyncpg.connect

    async def connected(*args: object, **kwargs: object) -> asyncpg.Connection:
        opened.append(await connect(*args, **kwargs))
        return opened[-1]

    async def hangs(*args: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(postgres.asyncpg, "connect", connected)
    monkeypatch.setattr(asyncpg.Connection, "add_listener", hangs)
    try:
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await asyncio.wait_for(store.listen_settings(lambda *message: None), 10)
        assert len(opened) == 1
        assert opened[0].is_closed()
    finally:
        await store.close()


async def test_delete_user_removes_every_row(pg: PgStore) -> None:
    scope, user = _scope(), "user-" + uuid.uuid4().hex[:8]
    await pg.insert_events([_event(scope, user, "x"), _event(scope, user, "y")])
    await pg.refresh_features(scope, now=datetime.now(UTC))
    await pg.update_settings(user, personalization_enabled=True, data_sharing_consent=True)
    async with pg.replacing_ranks(scope, "v1") as ranks:
        await ranks.add([(user, ["x"], [1.0])])
    removed = await pg.delete_user(user)
    assert removed == {"events": 2, "user_features": 1, "ranks": 1, "user_settings": 1}
    assert await pg.delete_user(user) == {
        "events": 0,
        "user_features": 0,
        "ranks": 0,
        "user_settings": 0,
    }
    exported = await pg.export_user(user)
    assert exported == {"features": [], "event_counts": [], "ranks": 0}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=9),
        max_size=12,
    )
)
def test_copy_text_elements_are_each_ids_utf8_after_its_length(ids: list[str]) -> None:
    # the ranks COPY's ID encoder, ASCII read off the array and the rest through UTF-8,
    # against Python's own encoding, ID by ID
    blob, sizes = postgres._text_elements(np.asarray(ids, dtype=np.str_))
    want = [struct.pack("!i", len(i.encode())) + i.encode() for i in ids]
    assert blob == b"".join(want)
    assert sizes.tolist() == [len(w) for w in want]


async def test_ranks_round_trip_whatever_the_ids_hold(pg: PgStore, pg_url: str) -> None:
    # precompute writes ranks through a binary COPY it encodes itself: IDs that a text
    # format would have to quote or escape, and scores no decimal form holds, come back as
    # written, bit for bit
    scope = _scope()
    awkward = ["a,b", 'q"uote', "back\\slash", "{brace}", "NULL", "null", "", " sp ace", "t\tab"]
    rows = [
        ("plain-user", ["i1", "i2", "i3"], [0.5, 0.25, -1.0]),
        ("awkward-user", awkward, [float(n) for n in range(len(awkward))]),
        ("empty-user", [], []),
        ("NULL", ["NULL"], [float("inf")]),
        ("ünï-cödé ✓", ["ïtem-✓", "i1"], [float(np.float32(1 / 3)), float(np.float32(-1e-38))]),
        # as precompute passes them: a slice of the snapshot's IDs and float32 scores
        ("numpy-user", np.array(["i2", "ïtem-✓", ""]), np.array([2.5, 0.1, -0.0], np.float32)),
    ]
    async with pg.replacing_ranks(scope, "v1") as ranks:
        await ranks.add(rows[:2])
        await ranks.add(rows[2:])  # batch by batch, in one transaction
    conn = await asyncpg.connect(pg_url)
    try:
        stored = {
            r["user_id"]: (r["item_ids"], r["scores"])
            for r in await conn.fetch(
                "SELECT user_id, item_ids, scores FROM ranks WHERE scope = $1", scope
            )
        }
    finally:
        await conn.close()
    assert stored == {
        user: (list(items), [float(s) for s in scores]) for user, items, scores in rows
    }
    # read back a page at a time in user order, as the cache refill reads them
    paged, after = [], ""
    while page := await pg.ranks_page(scope, "v1", after=after, limit=3):
        paged += page
        after = page[-1][0]
    assert [user for user, *_ in paged] == sorted(stored)
    assert {user: (items, scores) for user, items, scores, _ in paged} == stored
    assert await pg.ranks_page(scope, "v0", after="", limit=10) == []  # another version


async def test_replacing_ranks_shows_nothing_until_the_block_ends_and_nothing_after_an_error(
    pg: PgStore,
) -> None:
    """Readers see the previous rankings while a replacement is fed, the new ones once its
    block ends; a block that fails leaves the previous ones as they were, and an error of the
    block's own work comes out as itself, not as PostgreSQL's."""
    scope = _scope()

    async def stored() -> dict[str, tuple[str, list[str]]]:
        """user → (model version, item IDs) of every stored ranking of the scope"""
        return {
            user: (version, items)
            for version in ("v1", "v2", "v3")
            for user, items, *_ in await pg.ranks_page(scope, version, after="", limit=10)
        }

    async with pg.replacing_ranks(scope, "v1") as ranks:
        await ranks.add([("a", ["i1"], [1.0]), ("b", ["i2"], [1.0])])
    async with pg.replacing_ranks(scope, "v2") as ranks:
        await ranks.add([("a", ["i3"], [1.0])])
        await ranks.add([("c", ["i4"], [1.0])])
        assert await stored() == {"a": ("v1", ["i1"]), "b": ("v1", ["i2"])}  # not yet
    assert await stored() == {"a": ("v2", ["i3"]), "b": ("v1", ["i2"]), "c": ("v2", ["i4"])}
    before = await stored()

    async def fails_midway() -> None:
        async with pg.replacing_ranks(scope, "v3") as ranks:
            await ranks.add([("a", ["i5"], [1.0]), ("d", ["i6"], [1.0])])
            raise TimeoutError  # e.g. the caller's own deadline, not PostgreSQL's

    with pytest.raises(TimeoutError):
        await fails_midway()
    assert await stored() == before


async def test_users_not_to_rank_personally_and_dropping_their_ranks(pg: PgStore) -> None:
    scope, tag = _scope(), uuid.uuid4().hex[:8]
    kept, quitter, erased, erased_long_ago = (f"{n}-{tag}" for n in ("kept", "quit", "gone", "old"))
    users = [kept, quitter, erased, erased_long_ago]
    await pg.delete_user(erased_long_ago)
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    await pg.update_settings(quitter, personalization_enabled=False, data_sharing_consent=None)
    await pg.delete_user(erased)
    assert await pg.not_personal(users, erased_since=since) == {quitter, erased}
    assert await pg.not_personal([kept], erased_since=since) == set()
    assert await pg.not_personal([], erased_since=since) == set()
    async with pg.replacing_ranks(scope, "v1") as ranks:
        await ranks.add([(u, ["i1"], [1.0]) for u in users])
    assert await pg.drop_ranks(scope, [erased, erased_long_ago]) == 2
    assert await pg.drop_ranks(_scope(), [kept]) == 0  # another scope's ranks are not touched
    assert [user for user, *_ in await pg.ranks_page(scope, "v1", after="", limit=10)] == [kept]


@pytest.mark.parametrize("change", ["opt-out", "erasure"])
async def test_a_privacy_change_does_not_wait_for_a_ranks_replacement(
    pg: PgStore, pg_url: str, change: str
) -> None:
    """The nightly precompute holds its users' ranks rows until its one transaction ends, which
    can take minutes: an opt-out or erasure meanwhile must not wait for it (it timed out, and
    failed). The ranking the replacement wrote is retracted after it, as precompute does."""
    scope, user = _scope(), f"quits-{uuid.uuid4().hex[:8]}"
    async with pg.replacing_ranks(scope, "v1") as ranks:  # last night's ranking
        await ranks.add([(user, ["i1"], [1.0])])
    server = await PgStore.connect(pg_url, timeout_s=1)  # the server's store, a short timeout
    since = datetime.now(UTC)
    try:
        async with pg.replacing_ranks(scope, "v2") as ranks:
            await ranks.add([(user, ["i2"], [1.0]), ("stays", ["i3"], [1.0])])
            if change == "opt-out":
                settings = await server.update_settings(
                    user, personalization_enabled=False, data_sharing_consent=None
                )
                assert not settings.personalization_enabled
            else:
                assert (await server.delete_user(user))["ranks"] == 0  # locked: left to precompute
        assert await pg.not_personal([user, "stays"], erased_since=since) == {user}
        assert await pg.drop_ranks(scope, [user]) == 1  # retract_not_personal's part
        assert [u for u, *_ in await pg.ranks_page(scope, "v2", after="", limit=10)] == ["stays"]
    finally:
        await server.close()


async def test_cleanup_deletes_what_a_failed_replacement_left_of_a_privacy_change(
    pg: PgStore,
) -> None:
    """A replacement that held a user's row through their opt-out or erasure, then failed
    before retracting, leaves the previous ranking stored: cleanup deletes it, and keeps a
    ranking computed after an erasure (the user came back)."""
    scope, tag = _scope(), uuid.uuid4().hex[:8]
    quitter, erased, back = (f"{n}-{tag}" for n in ("quit", "gone", "back"))
    async with pg.replacing_ranks(scope, "v1") as ranks:
        await ranks.add([(u, ["i1"], [1.0]) for u in (quitter, erased, back, "kept")])
    await pg.delete_user(back)

    async def fails_after_the_changes() -> None:
        async with pg.replacing_ranks(scope, "v2") as ranks:
            await ranks.add([(u, ["i2"], [1.0]) for u in (quitter, erased)])
            await pg.update_settings(
                quitter, personalization_enabled=False, data_sharing_consent=None
            )
            await pg.delete_user(erased)
            raise TimeoutError  # the precompute fails before its retraction

    with pytest.raises(TimeoutError):
        await fails_after_the_changes()
    async with pg.replacing_ranks(scope, "v3") as ranks:  # computed after its erasure
        await ranks.add([(back, ["i3"], [1.0])])
    stored = {u for u, *_ in await pg.ranks_page(scope, "v1", after="", limit=10)}
    assert stored == {quitter, erased, "kept"}
    removed = await pg.cleanup(now=datetime.now(UTC), ranks_hours=0, features_days=0, events_days=0)
    assert removed["ranks of opted-out or erased users"] >= 2  # other tests' may be there too
    assert [u for u, *_ in await pg.ranks_page(scope, "v1", after="", limit=10)] == ["kept"]
    assert [u for u, *_ in await pg.ranks_page(scope, "v3", after="", limit=10)] == [back]


async def test_job_lock_admits_one_holder(pg: PgStore, pg_url: str) -> None:
    other = await PgStore.connect(pg_url, timeout_s=5)
    try:
        async with pg.job_lock():
            with pytest.raises(JobLocked, match="in progress"):
                async with other.job_lock():
                    pass
        async with other.job_lock():  # released on exit
            pass
        # the block's own errors come out as themselves and say nothing of PostgreSQL
        for _ in range(6):  # more than the breaker's failures
            with pytest.raises(OSError, match="disk full"):
                async with other.job_lock():
                    raise OSError("disk full")
        assert other.breaker.state == "closed"
    finally:
        await other.close()


async def test_unreachable_postgres_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await PgStore.connect("postgresql://nobody@127.0.0.1:1/none", timeout_s=1)


def test_ranking_packing_round_trips_and_is_little_endian() -> None:
    items = np.array([3, 1, 2], dtype=np.int64)
    scores = np.array([0.5, 0.25, -1.0], dtype=np.float32)
    raw = pack_ranking(items, scores)
    # golden bytes: int32 LE position then float32 LE score, per item
    assert raw[:8] == bytes.fromhex("03000000") + np.float32(0.5).tobytes()
    got_items, got_scores = unpack_ranking(raw)
    assert got_items.tolist() == [3, 1, 2]
    assert got_scores.tolist() == [0.5, 0.25, -1.0]


@pytest.fixture(params=["pipelined", "redis-py"])
async def either_cache(
    request: pytest.FixtureRequest, cache: RankCache, redis_url: str
) -> AsyncIterator[RankCache]:
    """The cache through its own pipelined connections, and through redis-py alone (as for
    a rediss:// URL, which the pipelined connections leave to redis-py)."""
    if request.param == "pipelined":
        yield cache
        return
    import redis.asyncio

    plain = RankCache(
        redis.asyncio.Redis.from_url(redis_url),
        3600,
        CircuitBreaker("Redis", failures=5, cooldown_s=1),
        None,
        cache.keys,
    )
    yield plain
    await plain.close()


async def test_cache_round_trip_ttl_and_user_deletion(
    either_cache: RankCache, redis_url: str
) -> None:
    import redis

    cache = either_cache
    scope = _scope()
    user, other = "u:" + uuid.uuid4().hex[:6], uuid.uuid4().hex[:6]
    rankings = [
        (user, np.array([1, 2]), np.array([0.9, 0.8], np.float32)),
        (other, np.array([2]), np.array([0.7], np.float32)),
    ]
    assert await cache.put_many(scope, "v1", rankings, batch=1) == 2  # a round trip each
    assert await cache.put_many(scope, "v2", rankings[:1]) == 1
    assert await cache.put_many(scope, "v2", []) == 0
    hit = await cache.get(scope, "v1", user)
    assert hit is not None
    assert hit[0].tolist() == [1, 2]
    assert await cache.get(scope, "v3", user) is None  # another model version never matches
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.ttl(cache.keys.rank(scope, "v1", user)) <= 3600
    client.close()
    assert await cache.count_user(user) == 2
    assert await cache.delete_rankings(scope, "v2", [user, "nobody"]) == 1  # that version only
    assert await cache.get(scope, "v1", user) is not None
    assert await cache.delete_rankings(scope, "v2", []) == 0
    assert await cache.put_many(scope, "v2", rankings[:1]) == 1
    assert await cache.delete_user(user) == 2
    assert await cache.get(scope, "v1", user) is None
    assert await cache.get(scope, "v1", other) is not None


async def test_cache_warm_mark_and_one_refill_claim(cache: RankCache) -> None:
    scope = _scope()
    assert not await cache.is_warm(scope, "v1")
    await cache.mark_warm(scope, "v1")
    assert await cache.is_warm(scope, "v1")
    assert not await cache.is_warm(scope, "v2")  # per model version
    assert await cache.claim_refill(scope, "v2", hold_s=30)
    assert not await cache.claim_refill(scope, "v2", hold_s=30)  # one claimant at a time
    assert await cache.claim_refill(scope, "v3", hold_s=30)


async def test_caches_with_other_key_prefixes_share_a_database_without_meeting(
    cache: RankCache, redis_url: str
) -> None:
    """Two deployments on one Redis database, told apart by their key prefixes (one a prefix
    of the other's): neither reads, marks, claims or erases the other's keys, and every key
    each writes starts with its own prefix."""
    import redis

    scope, user = _scope(), "u:" + uuid.uuid4().hex[:6]
    # "<ours>other:" starts with ours: a SCAN of a bare prefix would reach into it
    other = RankCache.from_url(
        redis_url, timeout_s=5, ttl_s=3600, key_prefix=f"{cache.keys.prefix}other:"
    )
    try:
        ranking = [(user, np.array([3]), np.array([0.5], np.float32))]
        for store in (cache, other):
            assert await store.put_many(scope, "v1", ranking) == 1
            await store.push_recent([(scope, user, "i9")], at=time.time())
        await other.mark_warm(scope, "v1")
        assert await other.claim_refill(scope, "v1", hold_s=30)
        assert not await cache.is_warm(scope, "v1")
        assert await cache.claim_refill(scope, "v1", hold_s=30)  # not held by the other
        assert await cache.count_user(user) == 2  # a ranking and a recent list, its own
        assert await cache.delete_user(user) == 2
        assert await cache.get(scope, "v1", user) is None
        assert await cache.recent(scope, user) == []
        assert await other.get(scope, "v1", user) is not None
        assert await other.recent(scope, user) == ["i9"]
        client = redis.Redis.from_url(redis_url)
        written = [k.decode() for k in client.scan_iter(match=f"*{scope}*", count=1000)]
        client.close()
        assert written
        assert all(k.startswith(cache.keys.prefix) for k in written)
        assert sum(k.startswith(other.keys.prefix) for k in written) == 4  # and its own
    finally:
        await other.delete_user(user)
        await other.close()


async def test_pipelined_gets_answer_each_caller_its_own_value(redis_url: str) -> None:
    """Many GETs in flight on one connection, binary values (CRLF inside, empty) and missing
    keys among them, and callers that give up before their reply: every other caller still
    gets exactly the value redis-py reads for its key."""
    import redis

    prefix = f"privrank:test:{uuid.uuid4().hex[:8]}:"
    values = {
        f"{prefix}{n}": bytes([n % 256]) * (n % 7) + b"\r\n$-1\r\n" * (n % 3) for n in range(300)
    }
    client = redis.Redis.from_url(redis_url)
    client.mset(values)
    gets = PipelinedConnection(redis_url, timeout_s=5)
    try:
        keys = [*values, f"{prefix}missing"] * 3
        assert await gets.get(keys[0]) == values[keys[0]]  # connected
        abandoned = [asyncio.ensure_future(gets.get(k)) for k in keys[::7]]
        await asyncio.sleep(0)  # each has written its GET and waits for the reply
        answers = asyncio.gather(*(gets.get(k) for k in keys))
        for task in abandoned:
            task.cancel()
        assert await answers == [client.get(k) for k in keys]
        assert all(task.cancelled() for task in abandoned)
        assert await gets.get(f"{prefix}1") == values[f"{prefix}1"]
    finally:
        await gets.close()
        client.delete(*values)
        client.close()


async def test_unreachable_redis_is_store_unavailable() -> None:
    dead = RankCache.from_url(
        "redis://127.0.0.1:1/0", timeout_s=0.2, ttl_s=10, key_prefix="privrank-test:"
    )
    try:
        with pytest.raises(StoreUnavailable):
            await dead.get("default", "v1", "u1")
    finally:
        await dead.close()
