"""PostgreSQL, the system of record, through asyncpg. The only module that imports asyncpg.

Every call runs with a timeout (``command_timeout`` on the pool, ``timeout`` on acquire) and
driver errors leave this module translated into the error tree (``StoreUnavailable``,
``InvalidInput``). SQL is built with placeholders only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
import numpy as np
from asyncpg.pool import PoolConnectionProxy

from features.breaker import CircuitBreaker
from features.errors import (
    InvalidInput,
    JobError,
    JobLocked,
    StoreUnavailable,
    StoreUnreachable,
)
from features.schema import EVENT_WEIGHTS, FEATURE_NAMES, Interaction, user_digest

log = logging.getLogger(__name__)

SETTINGS_CHANNEL = "privrank_settings"
SERVICE_ROLE = "privrank_service"  # created by migration 0002; see its header
_JOB_LOCK_KEY = 0x70726976  # "priv": one advisory lock serialises all job runs
_ERASURE_LOCK_KEY = 0x65726173  # "eras": erasures (shared) against read_horizon (exclusive)
# how long an erasure's transaction may run between its stamp and its commit, at most
ERASURE_COMMIT_MARGIN = timedelta(minutes=10)
_MIGRATION_LOCK_KEY = 0x70726977
MIGRATION_LOCK_WAIT_S = 600.0  # how long a migration waits for another process's to finish
_MIGRATION_LOCK_POLL_S = 0.2
_MIGRATION_TIMEOUT_S = 120.0  # each transactional script
# a script's wait for each lock it takes: writers of a table queue behind an ALTER waiting
# for it, so it gives up soon and tries again, MIGRATION_ATTEMPTS times with doubling pauses
MIGRATION_TABLE_LOCK_S = 2.0
MIGRATION_ATTEMPTS = 6
_MIGRATION_RETRY_S = 1.0  # the first pause; 1 + 2 + 4 + 8 + 16 s in all
_NO_TRANSACTION = "-- privrank: no-transaction"
_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(?P<name>\w+)"
    r"\s+ON\s[^;]+;?",
    re.IGNORECASE,
)

_EVENT_COLUMNS = (
    "scope",
    "user_id",
    "item_id",
    "event_type",
    "value",
    "occurred_at",
    "session_id",
    "device",
    "country",
    "utc_offset_minutes",
    "variant",
)

_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


# PostgreSQL not reached, as against reached and refusing (a login, role or database wrong)
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    kind = StoreUnreachable if isinstance(exc, _UNREACHABLE) else StoreUnavailable
    return kind(f"PostgreSQL: {type(exc).__name__}: {exc}")


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        # the driver's message may quote the offending value: name only the SQLSTATE
        raise InvalidInput(f"rejected by the database (SQLSTATE {exc.sqlstate})") from exc
    except _DRIVER_ERRORS as exc:
        raise _unavailable(exc) from exc


def _migration_scripts() -> list[tuple[str, str]]:
    """(version, SQL) of every script in features/migrations, in version order."""
    scripts = (
        p for p in resources.files("features.migrations").iterdir() if p.name.endswith(".sql")
    )
    return sorted((p.name.removesuffix(".sql"), p.read_text()) for p in scripts)


async def _lock_migrations(conn: asyncpg.Connection, wait_s: float) -> None:
    """Take the migration lock, polling for it rather than blocking: a session blocked in
    ``pg_advisory_lock`` holds a snapshot, which a concurrent index build waits out while its
    holder waits for the lock, and PostgreSQL breaks that cycle by failing one of the two."""
    deadline = time.monotonic() + wait_s
    waiting = False
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MIGRATION_LOCK_KEY):
        if time.monotonic() >= deadline:
            raise JobLocked(
                f"another process has been migrating the schema for over {wait_s:g} s;"
                " try again when it finishes"
            )
        if not waiting:
            log.info("waiting for another process's schema migration to finish")
            waiting = True
        await asyncio.sleep(_MIGRATION_LOCK_POLL_S)


async def _record_migration(conn: asyncpg.Connection, version: str) -> None:
    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)


async def _run_script(
    conn: asyncpg.Connection, version: str, sql: str, lock_wait_s: float, attempts: int
) -> None:
    """Run a transactional script and record it, waiting at most ``lock_wait_s`` for each
    lock it takes; a script that did not get its locks is rolled back and tried again after
    a doubling pause, ``attempts`` times in all, then JobLocked."""
    for attempt in range(attempts):
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('lock_timeout', $1, true)", f"{lock_wait_s * 1000:.0f}ms"
                )
                await conn.execute(sql, timeout=_MIGRATION_TIMEOUT_S)
                await _record_migration(conn, version)
            return
        except asyncpg.LockNotAvailableError:
            if attempt + 1 < attempts:
                pause = _MIGRATION_RETRY_S * 2**attempt
                log.warning(
                    "migration %s: a table it changes is in use; trying again in %g s",
                    version,
                    pause,
                )
                await asyncio.sleep(pause)
    raise JobLocked(
        f"migration {version}: a table it changes stayed in use (a long query or job holds"
        f" it; {attempts} tries of {lock_wait_s:g} s); try again when that ends"
    )


async def _build_index_concurrently(conn: asyncpg.Connection, version: str, sql: str) -> None:
    """Run a no-transaction script: one ``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS``.

    An interrupted concurrent build leaves its index behind, invalid (never read, still
    written), and ``IF NOT EXISTS`` would then keep it: such a leftover is dropped first. A
    build that finished before its version was recorded is kept by ``IF NOT EXISTS``.
    """
    statement = re.sub(r"--[^\n]*", "", sql).strip()
    match = _CONCURRENT_INDEX.fullmatch(statement)
    if match is None:
        raise ValueError(
            f"migration {version}: a no-transaction script must hold exactly one"
            " CREATE INDEX CONCURRENTLY IF NOT EXISTS statement"
        )
    name = match["name"]
    invalid = await conn.fetchval(
        "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = $1 AND c.relnamespace = to_regnamespace(current_schema())",
        name,
    )
    if invalid:
        log.warning("index %s was left invalid by an interrupted build: building it again", name)
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    await conn.execute(statement)


@dataclass(frozen=True, slots=True)
class UserSettingsRow:
    user_id: str
    personalization_enabled: bool
    data_sharing_consent: bool
    updated_at: datetime | None
    revision: int  # orders the row's changes (migration 0006); 0 for the default settings


@dataclass(frozen=True, slots=True)
class TrainingPairs:
    """Aggregated (user, item) interactions of a scope. Arrays are aligned, length = pairs.

    ``strength`` is the summed implicit-feedback weight (0 for pairs seen only as dismissals).
    """

    user_ids: np.ndarray  # str
    item_ids: np.ndarray  # str
    strength: np.ndarray  # float32
    last_at: np.ndarray  # float64 unix seconds


@dataclass(frozen=True, slots=True)
class ItemStats:
    item_ids: np.ndarray  # str
    popularity: np.ndarray  # float32, weighted engagement over the window
    first_seen: np.ndarray  # float64 unix seconds
    engagement: np.ndarray  # float32 in [0, 1]: share of the window's events that engaged
    category: np.ndarray  # str, the imported category label ('' = none)


@dataclass(frozen=True, slots=True)
class JobRunRow:
    run_id: int
    name: str
    scope: str
    status: str
    detail: str
    started_at: datetime
    finished_at: datetime | None


class Listener:
    """A LISTEN on its own connection (``PgStore.listen_settings``)."""

    def __init__(self, conn: asyncpg.Connection, timeout_s: float) -> None:
        self._conn = conn
        self._timeout = timeout_s

    @property
    def lost(self) -> bool:
        """The connection is gone (its backend terminated, the network dropped it): nothing
        more will be heard on it."""
        return self._conn.is_closed()

    async def stop(self) -> None:
        try:
            await self._conn.close(timeout=self._timeout)
        except _DRIVER_ERRORS:
            self._conn.terminate()


def _weights() -> tuple[list[str], list[float]]:
    return list(EVENT_WEIGHTS), list(EVENT_WEIGHTS.values())


def _user_hash(column: str) -> str:
    """SQL for ``features.schema.user_digest`` of the user IDs in ``column`` (sha256, hex),
    to match them with the erasures table, which holds no ID."""
    return f"encode(sha256(convert_to({column}, 'UTF8')), 'hex')"


# A user's stored rankings, except those a ranks replacement (precompute's one transaction)
# holds: waiting for it would make an opt-out or erasure time out. The replacement deletes
# them itself once it commits (features.privacy.retract_not_personal).
_DELETE_UNLOCKED_RANKS = (
    "DELETE FROM ranks WHERE (scope, user_id) IN"
    " (SELECT scope, user_id FROM ranks WHERE user_id = $1 FOR UPDATE SKIP LOCKED)"
)
# What a replacement that failed before it could retract leaves of those: the rankings of
# users opted out now, or erased after their ranking was computed (cleanup deletes them)
_DELETE_NOT_PERSONAL_RANKS = (
    "DELETE FROM ranks r USING user_settings s"
    " WHERE s.user_id = r.user_id AND NOT s.personalization_enabled",
    "DELETE FROM ranks r USING erasures x"
    f" WHERE x.user_hash = {_user_hash('r.user_id')}"
    " AND x.erased_at >= r.computed_at",
)


class PgStore:
    """A pool of connections to one database plus the statements privrank runs on it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        timeout_s: float,
        settings: dict[str, str],
        breaker: CircuitBreaker,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._timeout = timeout_s
        self._settings = settings
        self._breaker = breaker

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        timeout_s: float = 2.0,
        role: str | None = SERVICE_ROLE,
        min_size: int = 1,
        max_size: int = 8,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 1.0,
    ) -> PgStore:
        """A pool on ``dsn`` whose sessions act as ``role`` (the non-owner service role by
        default; ``None`` keeps the login's own role, as migrations need), in TimeZone UTC."""
        # timestamptz arithmetic and extract() follow the session TimeZone: UTC, whatever the
        # server's or the database's default
        settings = {"timezone": "UTC", **({"role": role} if role else {})}
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout_s,
                command_timeout=max(timeout_s, 1.0),
                server_settings=settings,
            )
        except _DRIVER_ERRORS as exc:
            raise _unavailable(exc) from exc
        breaker = CircuitBreaker(
            "PostgreSQL", failures=breaker_failures, cooldown_s=breaker_cooldown_s
        )
        return cls(pool, dsn, timeout_s, settings, breaker)

    def pool_size(self) -> tuple[int, int, int]:
        """(open, idle, maximum) connections of the pool."""
        pool = self._pool
        return pool.get_size(), pool.get_idle_size(), pool.get_max_size()

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[PoolConnectionProxy]:
        async with (
            self._breaker.guard(),
            _translated(),
            self._pool.acquire(timeout=self._timeout) as conn,
        ):
            yield conn

    @asynccontextmanager
    async def _user_scoped(self, user_id: str) -> AsyncIterator[PoolConnectionProxy]:
        """A transaction that row-level security confines to ``user_id``'s rows."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT set_config('privrank.user_id', $1, true)", user_id)
            yield conn

    # -- schema ---------------------------------------------------------------------------

    async def migrate(
        self,
        lock_wait_s: float = MIGRATION_LOCK_WAIT_S,
        *,
        table_lock_wait_s: float = MIGRATION_TABLE_LOCK_S,
        attempts: int = MIGRATION_ATTEMPTS,
    ) -> list[str]:
        """Apply pending migrations in order; returns the versions applied. Idempotent.

        Callers take turns on an advisory lock, waiting up to ``lock_wait_s`` for it (then
        JobLocked). A script runs in a transaction of its own, within 120 s, waiting at most
        ``table_lock_wait_s`` for each table lock and tried ``attempts`` times (see
        ``_run_script``), unless it starts with ``-- privrank: no-transaction``: then it
        builds one index CONCURRENTLY (see ``_build_index_concurrently``), with no time
        limit, while writes to its table go on. Migrations run on a connection of their own,
        as this store's role.
        """
        applied: list[str] = []
        async with _translated():
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=None,
                server_settings=self._settings,
            )
            try:  # the lock is the session's: closing the connection releases it
                await _lock_migrations(conn, lock_wait_s)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for version, sql in _migration_scripts():
                    if version in done:
                        continue
                    if sql.startswith(_NO_TRANSACTION):
                        await _build_index_concurrently(conn, version, sql)
                        await _record_migration(conn, version)
                    else:
                        await _run_script(conn, version, sql, table_lock_wait_s, attempts)
                    applied.append(version)
            finally:
                await conn.close()
        return applied

    # -- events ---------------------------------------------------------------------------

    async def insert_events(self, events: Sequence[Interaction]) -> int:
        """Store events and register their items, all or nothing. Returns the count stored."""
        return await self.insert_event_batches([events])

    async def insert_event_batches(self, batches: Iterable[Sequence[Interaction]]) -> int:
        """Store every batch in one transaction: an error in any batch (including one raised
        while producing the next batch) keeps none of them. Returns the count stored.

        An event of an erased user that occurred before their erasure is erased data, late or
        not: it is not stored. An erasure committed while this transaction ran could not see
        its rows, so once it commits, such events of the users erased meanwhile are deleted
        (as ``features.privacy.retract_not_personal`` does for rankings)."""
        stored, users = 0, set[str]()
        started = datetime.now(UTC)  # the margin below dwarfs any skew to the server's clock
        async with self._conn() as conn:
            async with conn.transaction():
                for events in batches:
                    stored += await self._copy_events(conn, events)
                    users.update(e.user_id for e in events)
            digests = {user_digest(u): u for u in users}
            erased = await conn.fetch(  # stamped before this began, committed after: margin
                "SELECT user_hash, max(erased_at) AS at FROM erasures"
                " WHERE erased_at >= $1 GROUP BY user_hash",
                started - ERASURE_COMMIT_MARGIN,
            )
            gone = [(digests[r["user_hash"]], r["at"]) for r in erased if r["user_hash"] in digests]
            if gone:
                status = await conn.execute(
                    "DELETE FROM events e USING unnest($1::text[], $2::timestamptz[]) AS g(u, at)"
                    " WHERE e.user_id = g.u AND e.occurred_at <= g.at",
                    [u for u, _ in gone],
                    [at for _, at in gone],
                )
                stored -= int(status.split()[-1])
        return stored

    async def _copy_events(self, conn: PoolConnectionProxy, events: Sequence[Interaction]) -> int:
        """Stage and insert ``events``; how many were stored (``insert_event_batches``)."""
        if not events:
            return 0
        timeout = max(self._timeout, 120.0)
        # COPY cannot write through row-level security: stage in a temp table, then INSERT
        columns = ", ".join(_EVENT_COLUMNS)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS events_in AS"
            f" SELECT {columns} FROM events WITH NO DATA"
        )
        await conn.copy_records_to_table(
            "events_in",
            records=[
                (
                    e.scope,
                    e.user_id,
                    e.item_id,
                    e.event_type,
                    e.value,
                    e.occurred_at,
                    e.session_id,
                    e.device,
                    e.country,
                    e.utc_offset_minutes,
                    e.variant,
                )
                for e in events
            ],
            columns=list(_EVENT_COLUMNS),
            timeout=timeout,
        )
        status = await conn.execute(
            f"INSERT INTO events ({columns}) SELECT {columns} FROM events_in e"
            f" WHERE NOT EXISTS (SELECT 1 FROM erasures x WHERE x.erased_at >= e.occurred_at"
            f" AND x.user_hash = {_user_hash('e.user_id')})",
            timeout=timeout,
        )
        await conn.execute("TRUNCATE events_in")
        first_seen: dict[tuple[str, str], datetime] = {}
        for e in events:
            key = (e.scope, e.item_id)
            if key not in first_seen or e.occurred_at < first_seen[key]:
                first_seen[key] = e.occurred_at
        await conn.execute(
            "INSERT INTO items (scope, item_id, first_seen)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])"
            " ON CONFLICT (scope, item_id) DO UPDATE"
            " SET first_seen = LEAST(items.first_seen, EXCLUDED.first_seen)",
            [k[0] for k in first_seen],
            [k[1] for k in first_seen],
            list(first_seen.values()),
            timeout=timeout,
        )
        return int(status.split()[-1])

    async def scopes(self) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT DISTINCT scope FROM items ORDER BY scope")
        return [r["scope"] for r in rows]

    async def latest_event_time(self, scope: str) -> datetime | None:
        async with self._conn() as conn:
            value: datetime | None = await conn.fetchval(
                "SELECT max(occurred_at) FROM events WHERE scope = $1", scope
            )
        return value

    async def training_pairs(self, scope: str, *, before: datetime | None = None) -> TrainingPairs:
        """Aggregated non-impression interactions of users who have not opted out."""
        names, weights = _weights()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT e.user_id, e.item_id,"
                "  sum(w.weight * CASE WHEN e.event_type = 'rating' THEN e.value ELSE 1 END)"
                "    AS strength,"
                "  extract(epoch FROM max(e.occurred_at)) AS last_at"
                " FROM events e"
                " JOIN unnest($2::text[], $3::real[]) AS w(event_type, weight) USING (event_type)"
                " WHERE e.scope = $1 AND e.event_type <> 'impression'"
                "   AND ($4::timestamptz IS NULL OR e.occurred_at < $4)"
                "   AND NOT EXISTS (SELECT 1 FROM user_settings s"
                "                   WHERE s.user_id = e.user_id AND NOT s.personalization_enabled)"
                " GROUP BY e.user_id, e.item_id",
                scope,
                names,
                weights,
                before,
                timeout=600,
            )
        return TrainingPairs(
            user_ids=np.array([r["user_id"] for r in rows], dtype=str),
            item_ids=np.array([r["item_id"] for r in rows], dtype=str),
            strength=np.array([max(r["strength"], 0.0) for r in rows], dtype=np.float32),
            last_at=np.array([float(r["last_at"]) for r in rows], dtype=np.float64),
        )

    async def segment_popularity(
        self, scope: str, *, now: datetime, window_days: int = 30
    ) -> list[tuple[int, int, str, float]]:
        """Weighted engagement per (daypart, device code, item) over the window; dayparts are
        the user's local hours // 6 (0 = night, 1 = morning, 2 = afternoon, 3 = evening)."""
        names, weights = _weights()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT (extract(hour FROM (e.occurred_at AT TIME ZONE 'UTC')"
                "          + make_interval(mins => coalesce(e.utc_offset_minutes, 0)))::int / 6)"
                "         AS daypart, e.device, e.item_id, sum(w.weight) AS pop"
                " FROM events e"
                " JOIN unnest($2::text[], $3::real[]) AS w(event_type, weight) USING (event_type)"
                " WHERE e.scope = $1 AND w.weight > 0"
                "   AND e.occurred_at > $4::timestamptz - make_interval(days => $5)"
                "   AND e.occurred_at <= $4"
                " GROUP BY 1, 2, 3",
                scope,
                names,
                weights,
                now,
                window_days,
                timeout=600,
            )
        return [(r["daypart"], r["device"], r["item_id"], float(r["pop"])) for r in rows]

    async def holdout_cutoff(self, scope: str, fraction: float) -> datetime | None:
        """The time after which the newest ``fraction`` of the scope's interactions fall."""
        async with self._conn() as conn:
            value: datetime | None = await conn.fetchval(
                "SELECT percentile_disc($2::float8) WITHIN GROUP (ORDER BY occurred_at)"
                " FROM events WHERE scope = $1 AND event_type <> 'impression'",
                scope,
                1.0 - fraction,
                timeout=600,
            )
        return value

    async def item_stats(
        self,
        scope: str,
        *,
        now: datetime | None = None,
        before: datetime | None = None,
        window_days: int = 30,
    ) -> ItemStats:
        """Every active item of the scope with its weighted engagement over the window that
        ends at ``now``. With ``before`` instead (a holdout cutoff), the scope as it stood just
        before that time: only events before it count and only items first seen before it
        are listed, so nothing at or after the cutoff leaks in."""
        if (now is None) == (before is None):
            raise ValueError("item_stats takes one of now= and before=")
        names, weights = _weights()
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT i.item_id, coalesce(p.pop, 0) AS pop, coalesce(p.eng, 0) AS eng,"
                "       extract(epoch FROM i.first_seen) AS first_seen, i.category"
                " FROM items i LEFT JOIN ("
                "   SELECT e.item_id, sum(w.weight) AS pop,"
                "          avg((w.weight > 0)::int) AS eng FROM events e"
                "   JOIN unnest($2::text[], $3::real[]) AS w(event_type, weight) USING (event_type)"
                "   WHERE e.scope = $1"
                "     AND e.occurred_at > $4::timestamptz - make_interval(days => $5)"
                "     AND e.occurred_at <= $4 AND NOT ($6::boolean AND e.occurred_at = $4)"
                "   GROUP BY e.item_id) p USING (item_id)"
                " WHERE i.scope = $1 AND i.active AND NOT ($6::boolean AND i.first_seen >= $4)",
                scope,
                names,
                weights,
                now or before,
                window_days,
                before is not None,
                timeout=600,
            )
        return ItemStats(
            item_ids=np.array([r["item_id"] for r in rows], dtype=str),
            popularity=np.array([r["pop"] for r in rows], dtype=np.float32),
            first_seen=np.array([float(r["first_seen"]) for r in rows], dtype=np.float64),
            engagement=np.array([float(r["eng"]) for r in rows], dtype=np.float32),
            category=np.array([r["category"] for r in rows], dtype=str),
        )

    async def upsert_item_batches(
        self, scope: str, batches: Iterable[Sequence[tuple[str, str]]]
    ) -> int:
        """Store (item_id, category) pairs of one scope, all or nothing: new items are
        registered, known ones get the new category (a re-import updates). Returns the count."""
        stored = 0
        async with self._conn() as conn, conn.transaction():
            for batch in batches:
                if not batch:
                    continue
                await conn.execute(
                    "INSERT INTO items (scope, item_id, category, updated_at)"
                    " SELECT $1, i, c, now() FROM unnest($2::text[], $3::text[]) AS u(i, c)"
                    " ON CONFLICT (scope, item_id) DO UPDATE"
                    " SET category = EXCLUDED.category, updated_at = now()",
                    scope,
                    [item for item, _ in batch],
                    [category for _, category in batch],
                    timeout=max(self._timeout, 120.0),
                )
                stored += len(batch)
        return stored

    async def item_categories(self, scope: str) -> dict[str, str]:
        """item_id → category label ('' = none) of every item of the scope."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT item_id, category FROM items WHERE scope = $1 ORDER BY item_id", scope
            )
        return {r["item_id"]: r["category"] for r in rows}

    # -- settings -------------------------------------------------------------------------

    async def get_settings(self, user_id: str) -> UserSettingsRow:
        async with self._user_scoped(user_id) as conn:
            row = await conn.fetchrow("SELECT * FROM user_settings WHERE user_id = $1", user_id)
        if row is None:
            return UserSettingsRow(user_id, True, False, None, 0)
        return _settings_row(row)

    async def update_settings(
        self,
        user_id: str,
        *,
        personalization_enabled: bool | None,
        data_sharing_consent: bool | None,
    ) -> UserSettingsRow:
        """Upsert; ``None`` keeps the current value. Opting out also drops the user's ranks."""
        async with self._user_scoped(user_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO user_settings AS s"
                "  (user_id, personalization_enabled, data_sharing_consent, updated_at)"
                " VALUES ($1, coalesce($2, true), coalesce($3, false), now())"
                " ON CONFLICT (user_id) DO UPDATE SET"
                "  personalization_enabled = coalesce($2, s.personalization_enabled),"
                "  data_sharing_consent = coalesce($3, s.data_sharing_consent),"
                "  updated_at = now()"
                " RETURNING *",
                user_id,
                personalization_enabled,
                data_sharing_consent,
            )
            assert row is not None  # an upsert with RETURNING always returns its row
            if not row["personalization_enabled"]:
                await conn.execute(_DELETE_UNLOCKED_RANKS, user_id)
        return _settings_row(row)

    async def opted_out_users(self) -> dict[str, int]:
        """User ID → revision of the opt-out, for every user opted out now."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT user_id, revision FROM user_settings WHERE NOT personalization_enabled"
            )
        return {r["user_id"]: r["revision"] for r in rows}

    async def listen_settings(self, on_message: Callable[[str, int, str], None]) -> Listener:
        """Call ``on_message(kind, revision, subject)`` for every privacy change announced by
        PostgreSQL: kind ``"0"``/``"1"`` (personalization off/on; subject = user ID; revision
        as ``UserSettingsRow.revision``), ``"G"`` (the global switch; subject ``"0"``/``"1"``;
        revision as ``personalization_switch``'s) or ``"E"`` (erasure; subject = user hash;
        revision 0).

        Uses a dedicated connection, which the returned Listener stops or reports lost.
        Raises StoreUnavailable if PostgreSQL cannot be reached.
        """

        def handler(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            kind, _, subject = str(payload).partition(":")
            revision = "0"
            if kind != "E":
                revision, _, subject = subject.partition(":")
            on_message(kind, int(revision), subject)

        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout, server_settings=self._settings
            )
        except _DRIVER_ERRORS as exc:
            raise _unavailable(exc) from exc
        try:  # LISTEN has no timeout of its own: a hung server would hold the caller forever
            await asyncio.wait_for(conn.add_listener(SETTINGS_CHANNEL, handler), self._timeout)
        except _DRIVER_ERRORS as exc:
            conn.terminate()
            raise _unavailable(exc) from exc
        return Listener(conn, self._timeout)

    async def personalization_switch(self) -> tuple[bool, int]:
        """The stored global switch (``Admin.SetFlags``): (enabled, revision)."""
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT personalization_enabled, revision FROM global_flags")
        assert row is not None  # migration 0007 inserts the one row
        return row["personalization_enabled"], row["revision"]

    async def set_personalization(self, enabled: bool) -> int:
        """Store the global switch; returns the change's revision."""
        async with self._conn() as conn:
            revision: int = await conn.fetchval(
                "UPDATE global_flags SET personalization_enabled = $1, updated_at = now()"
                " RETURNING revision",
                enabled,
            )
        return revision

    # -- a user's data: export and erasure -----------------------------------------------

    async def export_user(self, user_id: str) -> dict[str, Any]:
        """What privrank holds about a user: settings, feature vectors, event counts, ranks."""
        async with self._user_scoped(user_id) as conn:
            features = await conn.fetch(
                "SELECT * FROM user_features WHERE user_id = $1 ORDER BY scope", user_id
            )
            counts = await conn.fetch(
                "SELECT scope, event_type, count(*) AS n FROM events WHERE user_id = $1"
                " GROUP BY scope, event_type ORDER BY scope, event_type",
                user_id,
            )
            ranks = await conn.fetchval("SELECT count(*) FROM ranks WHERE user_id = $1", user_id)
        return {
            "features": [
                {
                    "scope": r["scope"],
                    "values": {name: _as_number(r[name]) for name in FEATURE_NAMES},
                    "embedding": list(r["embedding"] or []),
                    "updated_at": r["updated_at"],
                }
                for r in features
            ],
            "event_counts": [(r["scope"], r["event_type"], r["n"]) for r in counts],
            "ranks": ranks,
        }

    async def delete_user(self, user_id: str) -> dict[str, int]:
        """Erase a user's rows from every table in one transaction; counts per table.

        Records the erasure (as a one-way hash) so every server process masks the user's
        vector at once and cleanup prunes snapshots that may still hold it."""
        removed: dict[str, int] = {}
        async with self._user_scoped(user_id) as conn:
            # held to the commit, and the erasure stamped once it is taken: read_horizon
            # waits for this transaction, or comes before its stamp
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", _ERASURE_LOCK_KEY)
            for table in ("events", "user_features", "ranks", "user_settings"):
                status = await conn.execute(
                    _DELETE_UNLOCKED_RANKS
                    if table == "ranks"
                    else f"DELETE FROM {table} WHERE user_id = $1",
                    user_id,
                )
                removed[table] = int(status.split()[-1])
            await conn.execute(
                "INSERT INTO erasures (user_hash, erased_at) VALUES ($1, clock_timestamp())",
                user_digest(user_id),
            )
        return removed

    async def read_horizon(self) -> datetime:
        """A time to stamp data read from now on with (a snapshot's data_as_of): every erasure
        stamped before it has committed, so the read cannot see its user's rows, and every
        later one is stamped later. An erasure still running is waited for (it holds the
        erasure lock shared until it commits; this takes it exclusively)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ERASURE_LOCK_KEY)
            horizon: datetime = await conn.fetchval("SELECT clock_timestamp()")
        return horizon

    async def feedback_by_variant(
        self, scope: str, *, since: datetime
    ) -> dict[str, tuple[int, int, int]]:
        """Per variant: (impressions, clicks, acceptances) recorded since ``since``."""
        async with self._conn() as conn:
            rows = await conn.fetch(FEEDBACK_SQL, scope, since)
        return {r["variant"]: (r["impressions"], r["clicks"], r["accepted"]) for r in rows}

    async def not_personal(
        self, user_ids: Sequence[str], *, erased_since: datetime | None
    ) -> set[str]:
        """Those of ``user_ids`` who opted out of personalization, or (unless ``erased_since``
        is None) were erased at or after ``erased_since``."""
        digests = {user_digest(u): u for u in user_ids} if erased_since is not None else {}
        async with self._conn() as conn:
            opted_out = await conn.fetch(
                "SELECT user_id FROM user_settings"
                " WHERE user_id = ANY($1::text[]) AND NOT personalization_enabled",
                list(user_ids),
            )
            erased = (
                await conn.fetch(
                    "SELECT DISTINCT user_hash FROM erasures"
                    " WHERE user_hash = ANY($1::text[]) AND erased_at >= $2",
                    list(digests),
                    erased_since,
                )
                if digests
                else []
            )
        return {r["user_id"] for r in opted_out} | {digests[r["user_hash"]] for r in erased}

    async def drop_ranks(self, scope: str, user_ids: Sequence[str]) -> int:
        """Delete the stored rankings of ``user_ids`` in ``scope``; how many there were."""
        async with self._conn() as conn:
            status = await conn.execute(
                "DELETE FROM ranks WHERE scope = $1 AND user_id = ANY($2::text[])",
                scope,
                list(user_ids),
            )
        return int(status.split()[-1])

    async def erasures(self, *, since: datetime) -> dict[str, float]:
        """Erasures recorded since ``since``: user hash → erasure time (unix seconds)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT user_hash, extract(epoch FROM max(erased_at)) AS at FROM erasures"
                " WHERE erased_at >= $1 GROUP BY user_hash",
                since,
            )
        return {r["user_hash"]: float(r["at"]) for r in rows}

    async def latest_erasure(self) -> datetime | None:
        async with self._conn() as conn:
            value: datetime | None = await conn.fetchval("SELECT max(erased_at) FROM erasures")
        return value

    async def consenting_features(self, scope: str | None) -> list[dict[str, Any]]:
        """Feature rows of users who consented to data sharing (and nobody else)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT f.* FROM user_features f JOIN user_settings s USING (user_id)"
                " WHERE s.data_sharing_consent AND ($1::text IS NULL OR f.scope = $1)"
                " ORDER BY f.scope, f.user_id",
                scope,
                timeout=600,
            )
        return [
            {
                "scope": r["scope"],
                "user_id": r["user_id"],
                **{name: _as_number(r[name]) for name in FEATURE_NAMES},
            }
            for r in rows
        ]

    # -- features -------------------------------------------------------------------------

    async def refresh_features(self, scope: str, *, now: datetime) -> int:
        """Recompute every active user's aggregate features inside PostgreSQL. Returns rows.

        Opted-out users are skipped and their feature rows deleted.
        """
        names, weights = _weights()
        started = datetime.now(UTC)  # as in insert_event_batches
        async with self._conn() as conn:
            async with conn.transaction():
                # right after a bulk import (before autovacuum has analyzed events) the
                # planner thinks the aggregates have a row or two and nests their join:
                # quadratic in users (minutes at 100k). Hash joins are right at any size.
                await conn.execute("SET LOCAL enable_nestloop = off")
                await conn.execute(
                    "DELETE FROM user_features f USING user_settings s WHERE f.user_id ="
                    " s.user_id AND NOT s.personalization_enabled AND f.scope = $1",
                    scope,
                )
                status = await conn.execute(
                    _REFRESH_FEATURES_SQL, scope, now, names, weights, timeout=600
                )
            # an erasure that ran meanwhile: this read the user's events before it committed,
            # and wrote their features again after its delete (``insert_event_batches``)
            await conn.execute(
                "DELETE FROM user_features f USING erasures x WHERE f.scope = $1"
                " AND x.erased_at >= $2"
                f" AND x.user_hash = {_user_hash('f.user_id')}",
                scope,
                started - ERASURE_COMMIT_MARGIN,
                timeout=600,
            )
        return int(status.split()[-1])

    async def save_embeddings(
        self, scope: str, user_ids: Sequence[str], vectors: np.ndarray
    ) -> None:
        """Store learned user embeddings (rows of ``vectors``) in the feature table."""
        records = [(u, [float(x) for x in row]) for u, row in zip(user_ids, vectors, strict=True)]
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE embeddings_in (user_id text, embedding real[]) ON COMMIT DROP"
            )
            await conn.copy_records_to_table("embeddings_in", records=records, timeout=600)
            await conn.execute(
                "UPDATE user_features f SET embedding = v.embedding FROM embeddings_in v"
                " WHERE f.scope = $1 AND f.user_id = v.user_id",
                scope,
                timeout=600,
            )

    async def user_features(self, scope: str) -> tuple[np.ndarray, np.ndarray]:
        """(user_ids str[u], features float32[u, len(FEATURE_NAMES)]) of the scope."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT user_id, engagement_score, click_through_rate, sessions_7d, sessions_30d,"
                " avg_session_seconds, preferred_hour, device_category,"
                " CASE WHEN country_code = '' THEN 0"
                "      ELSE ascii(substr(country_code, 1, 1)) * 256"
                "           + ascii(substr(country_code, 2, 1))"
                " END AS country_code, utc_offset_minutes"
                " FROM user_features WHERE scope = $1",
                scope,
                timeout=600,
            )
        ids = np.array([r["user_id"] for r in rows], dtype=str)
        matrix = np.array(
            [[float(r[name]) for name in FEATURE_NAMES] for r in rows], dtype=np.float32
        ).reshape(len(rows), len(FEATURE_NAMES))
        return ids, matrix

    # -- ranks, models, evaluations ------------------------------------------------------

    async def active_users(self, scope: str, *, now: datetime, days: int = 30) -> list[str]:
        """Users with events in the window who have not opted out."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT e.user_id FROM events e"
                " WHERE e.scope = $1"
                "   AND e.occurred_at > $2::timestamptz - make_interval(days => $3)"
                "   AND NOT EXISTS (SELECT 1 FROM user_settings s"
                "                   WHERE s.user_id = e.user_id AND NOT s.personalization_enabled)",
                scope,
                now,
                days,
                timeout=600,
            )
        return sorted(r["user_id"] for r in rows)

    async def ranks_page(
        self, scope: str, model_version: str, *, after: str, limit: int
    ) -> list[tuple[str, list[str], list[float], datetime]]:
        """Up to ``limit`` stored rankings of ``model_version`` in user order, of users after
        ``after``: (user_id, item_ids best first, scores, computed_at)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT user_id, item_ids, scores, computed_at FROM ranks"
                " WHERE scope = $1 AND user_id > $2 AND model_version = $3"
                " ORDER BY user_id LIMIT $4",
                scope,
                after,
                model_version,
                limit,
            )
        return [(r["user_id"], r["item_ids"], r["scores"], r["computed_at"]) for r in rows]

    @asynccontextmanager
    async def replacing_ranks(
        self, scope: str, model_version: str
    ) -> AsyncIterator[RanksReplacement]:
        """One transaction that upserts the scope's precomputed rankings, ``add``ed batch by
        batch (so PostgreSQL stores one while the caller computes the next), committed when
        the block ends without an error: until then readers see the previous set. It holds
        one connection throughout, outside the circuit breaker (errors of the block's other
        work must not count against PostgreSQL); its statements are translated as usual."""
        async with _translated():  # only around its own statements, not the caller's block
            conn = await self._pool.acquire(timeout=self._timeout)
        try:
            transaction = conn.transaction()
            async with _translated():
                await transaction.start()
                await conn.execute(
                    "CREATE TEMP TABLE ranks_in (user_id text, item_ids text[], scores real[])"
                    " ON COMMIT DROP"
                )
            try:
                yield RanksReplacement(conn, scope, model_version)
            except BaseException:
                with contextlib.suppress(*_DRIVER_ERRORS):  # a dead connection rolls back
                    await transaction.rollback()
                raise
            async with _translated():
                await transaction.commit()
        finally:
            await self._pool.release(conn)

    async def record_model_version(
        self, scope: str, version: str, manifest: dict[str, Any]
    ) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO model_versions (scope, model_version, manifest) VALUES ($1, $2, $3)"
                " ON CONFLICT (scope, model_version) DO UPDATE SET manifest = EXCLUDED.manifest",
                scope,
                version,
                json.dumps(manifest),
            )

    async def save_evaluations(
        self,
        scope: str,
        model_version: str,
        results: Sequence[tuple[str, dict[str, float]]],
        users: int,
    ) -> None:
        """One evaluation run's (model label, metrics), all or none: a run killed midway
        leaves no part of its labels beside the re-run's."""
        async with self._conn() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO eval_results (scope, model_version, model, metrics, users_evaluated)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(scope, model_version, model, json.dumps(m), users) for model, m in results],
            )

    async def evaluations(self, scope: str, *, limit: int = 20) -> list[dict[str, Any]]:
        """Newest stored evaluations of a scope, newest first."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT model_version, model, metrics, users_evaluated, evaluated_at"
                " FROM eval_results WHERE scope = $1 ORDER BY evaluated_at DESC, id DESC LIMIT $2",
                scope,
                limit,
            )
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]

    async def cleanup(
        self, *, now: datetime, ranks_hours: int, features_days: int, events_days: int
    ) -> dict[str, int]:
        """Delete rows past their retention window (0 = keep forever), and the rankings of
        users who opted out or were erased that are still stored; counts per table."""
        statements = {
            "ranks": (
                "DELETE FROM ranks WHERE computed_at < $1::timestamptz"
                " - make_interval(hours => $2)",
                ranks_hours,
            ),
            "user_features": (
                "DELETE FROM user_features WHERE updated_at < $1::timestamptz"
                " - make_interval(days => $2)",
                features_days,
            ),
            "events": (
                "DELETE FROM events WHERE occurred_at < $1::timestamptz"
                " - make_interval(days => $2)",
                events_days,
            ),
        }
        removed: dict[str, int] = {}
        async with self._conn() as conn:
            for table, (sql, window) in statements.items():
                if window <= 0:  # 0 keeps that table's rows forever
                    continue
                status = await conn.execute(sql, now, window, timeout=600)
                removed[table] = int(status.split()[-1])
            withheld = 0
            for sql in _DELETE_NOT_PERSONAL_RANKS:
                withheld += int((await conn.execute(sql, timeout=600)).split()[-1])
            removed["ranks of opted-out or erased users"] = withheld
        return removed

    # -- jobs -----------------------------------------------------------------------------

    @asynccontextmanager
    async def job_lock(self) -> AsyncIterator[JobLock]:
        """Hold the job lock for the block; raise JobLocked if another run holds it.

        A session-level advisory lock on a connection of its own: a killed run's connection
        closes and the lock goes with it, so a stale lock never blocks the next run; by the
        same token a run whose connection ended (PostgreSQL restarted, the network dropped
        it) has lost the lock, which ``JobLock.check`` tells. Only the lock's own statements
        are translated and count against PostgreSQL, not the block's work.
        """
        async with self._breaker.guard(), _translated():
            conn = await self._pool.acquire(timeout=self._timeout)
        try:
            async with self._breaker.guard(), _translated():
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _JOB_LOCK_KEY):
                    raise JobLocked(
                        "another privrank job run is in progress; try again when it ends"
                    )
            try:
                async with self._breaker.guard(), _translated():
                    await conn.execute(
                        "UPDATE job_runs SET status = 'failed', finished_at = now(),"
                        " detail = 'interrupted (the process ended without finishing)'"
                        " WHERE status = 'running'"
                    )
                yield JobLock(conn, self._timeout)
            finally:
                # a dead connection took the lock with it; the pool resets (unlocks) or
                # discards one that fails here
                with contextlib.suppress(*_DRIVER_ERRORS, asyncpg.InternalClientError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", _JOB_LOCK_KEY)
        finally:
            await self._pool.release(conn)

    async def start_run(self, name: str, scope: str) -> int:
        async with self._conn() as conn:
            run_id: int = await conn.fetchval(
                "INSERT INTO job_runs (name, scope, status) VALUES ($1, $2, 'running')"
                " RETURNING id",
                name,
                scope,
            )
        return run_id

    async def finish_run(self, run_id: int, *, ok: bool, detail: str) -> None:
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE job_runs SET status = $2, detail = $3, finished_at = now() WHERE id = $1",
                run_id,
                "succeeded" if ok else "failed",
                detail[:2000],
            )

    async def job_runs(self, limit: int = 20) -> list[JobRunRow]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT * FROM job_runs ORDER BY id DESC LIMIT $1", limit)
        return [
            JobRunRow(
                r["id"],
                r["name"],
                r["scope"],
                r["status"],
                r["detail"],
                r["started_at"],
                r["finished_at"],
            )
            for r in rows
        ]


def _settings_row(row: asyncpg.Record) -> UserSettingsRow:
    return UserSettingsRow(
        row["user_id"],
        row["personalization_enabled"],
        row["data_sharing_consent"],
        row["updated_at"],
        row["revision"],
    )


def _as_number(value: object) -> float:
    if isinstance(value, str):  # country code, exported as its two letters' code point pair
        return float(ord(value[0]) * 256 + ord(value[1])) if len(value) == 2 else 0.0
    return float(value)  # type: ignore[arg-type]


# PostgreSQL's binary COPY: signature, flags, header extension length; then per row a field
# count and length-prefixed fields; then -1
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_TEXT_OID, _FLOAT4_OID = 25, 700
_FLOAT4_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">f4")])


def _binary_array(oid: int, elements: bytes, count: int) -> bytes:
    """A one-dimensional array field of ``count`` ``elements`` (each length-prefixed, none
    NULL) of element type ``oid``, length prefix included."""
    header = struct.pack("!iiiii", 1, 0, oid, count, 1) if count else struct.pack("!iii", 0, 0, oid)
    return struct.pack("!i", len(header) + len(elements)) + header + elements


# (user_id, item_ids, scores): one user's ranking, best first
RankRow = tuple[str, Sequence[str] | np.ndarray, Sequence[float] | np.ndarray]


class JobLock:
    """The job lock ``PgStore.job_lock`` holds, on its connection."""

    def __init__(self, conn: PoolConnectionProxy, timeout_s: float) -> None:
        self._conn = conn
        self._timeout = timeout_s

    async def check(self) -> None:
        """JobError unless the lock is still held: once its connection has ended, another
        run may hold it, and this one must not go on."""
        try:
            held = await self._conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid() AND granted AND classid = 0 AND objid = $1)",
                _JOB_LOCK_KEY,
                timeout=self._timeout,
            )
        except Exception as exc:  # asyncpg: also InternalClientError on a killed session
            raise JobError(
                f"lost the job lock: its PostgreSQL session ended ({type(exc).__name__});"
                " another run may have started, so this one stops"
            ) from exc
        if not held:
            raise JobError("lost the job lock; another run may have started, so this one stops")


class RanksReplacement:
    """The batches of ``PgStore.replacing_ranks``; one ``add`` at a time."""

    def __init__(self, conn: PoolConnectionProxy, scope: str, model_version: str) -> None:
        self._conn = conn
        self._scope = scope
        self._version = model_version

    async def add(self, rows: Iterable[RankRow]) -> None:
        """Upsert (user_id, item_ids, scores) rows, each user at most once per call; users
        who have opted out are left out."""
        async with _translated():
            # encoded here in bulk: asyncpg's record encoder checks every array element in
            # Python, most of the precompute step's time at 100k users x 100 items
            await self._conn.copy_to_table(
                "ranks_in",
                source=io.BytesIO(_ranks_copy_binary(rows)),
                format="binary",
                timeout=600,
            )
            await self._conn.execute(
                "INSERT INTO ranks (scope, user_id, model_version, item_ids, scores, computed_at)"
                " SELECT $1, r.user_id, $2, r.item_ids, r.scores, now() FROM ranks_in r"
                " WHERE NOT EXISTS (SELECT 1 FROM user_settings s"
                "                   WHERE s.user_id = r.user_id AND NOT s.personalization_enabled)"
                " ON CONFLICT (scope, user_id) DO UPDATE SET"
                "  model_version = EXCLUDED.model_version,"
                "  item_ids = EXCLUDED.item_ids, scores = EXCLUDED.scores,"
                "  computed_at = EXCLUDED.computed_at",
                self._scope,
                self._version,
                timeout=600,
            )
            await self._conn.execute("TRUNCATE ranks_in")


def _ranks_copy_binary(rows: Iterable[RankRow]) -> bytes:
    """(user_id, item_ids, scores) rows as a binary COPY of (text, text[], real[]): no quoting
    or escaping whatever the IDs hold, and every float32 score as its four bytes. The item
    IDs of all rows are encoded together in numpy (``_text_elements``); numpy arrays of IDs
    and scores are taken as they are."""
    rows = list(rows)
    ids = [np.asarray(items, dtype=np.str_) for _, items, _ in rows]
    elements, sizes = _text_elements(np.concatenate(ids) if ids else np.empty(0, np.str_))
    ends = [0, *np.cumsum(sizes).tolist()]  # of each element in ``elements``
    scores = [np.asarray(values, dtype=np.float32) for _, _, values in rows]
    if any(len(s) != len(i) for s, i in zip(scores, ids, strict=True)):
        raise ValueError("a ranking has not one score per item")
    floats = np.empty(len(sizes), _FLOAT4_ELEMENTS)
    floats["length"] = 4
    floats["value"] = np.concatenate(scores) if scores else []
    float_elements = floats.tobytes()
    parts = [_COPY_HEADER]
    first = 0  # the row's first element
    for (user, _, _), items in zip(rows, ids, strict=True):
        raw_user = user.encode()
        count = len(items)
        last = first + count
        parts += [
            struct.pack("!hi", 3, len(raw_user)),
            raw_user,
            _binary_array(_TEXT_OID, elements[ends[first] : ends[last]], count),
            _binary_array(_FLOAT4_OID, float_elements[8 * first : 8 * last], count),
        ]
        first = last
    parts.append(_COPY_TRAILER)
    return b"".join(parts)


def _text_elements(ids: np.ndarray) -> tuple[bytes, np.ndarray]:
    """``ids`` (str[m]) as binary COPY array elements, each its UTF-8 bytes' length (int32,
    big-endian) then the bytes: (all m elements in order, each one's size int64[m]).

    ASCII IDs are their code points as bytes, read straight off the array; only the others
    go through numpy's UTF-8 encoder (about 1 us an ID). No ID holds a NUL (PostgreSQL's
    text cannot), so a code point of 0 is the array's padding."""
    ids = np.ascontiguousarray(ids, dtype=np.str_)
    points = ids.view(np.uint32).reshape(len(ids), ids.dtype.itemsize // 4)
    lengths = np.strings.str_len(ids)
    if not len(ids) or points.max() < 128:  # the common case: every ID ASCII
        width = points.shape[1]
        table = np.zeros((len(ids), 4 + width), dtype=np.uint8)  # one element per row
        table[:, 4:] = points
    else:
        ascii = (points < 128).all(axis=1)
        other = np.strings.encode(ids[~ascii], "utf-8")
        width = max(points.shape[1], other.dtype.itemsize)
        table = np.zeros((len(ids), 4 + width), dtype=np.uint8)
        table[ascii, 4 : 4 + points.shape[1]] = points[ascii]
        lengths[~ascii] = np.strings.str_len(other)
        table[~ascii, 4 : 4 + other.dtype.itemsize] = other.view(np.uint8).reshape(len(other), -1)
    table[:, :4] = lengths.astype(">i4").view(np.uint8).reshape(-1, 4)
    sizes = 4 + lengths.astype(np.int64)
    return table[np.arange(4 + width) < sizes[:, None]].tobytes(), sizes


# an index-only scan of events_feedback (migration 0005), whose predicate it must keep
FEEDBACK_SQL = (
    "SELECT variant,"
    "  count(*) FILTER (WHERE event_type = 'impression') AS impressions,"
    "  count(*) FILTER (WHERE event_type = 'click') AS clicks,"
    "  count(*) FILTER (WHERE event_type IN ('accept', 'complete', 'purchase')) AS accepted"
    " FROM events WHERE scope = $1 AND received_at >= $2 AND variant <> ''"
    " GROUP BY variant"
)

_REFRESH_FEATURES_SQL = """
WITH ev AS (
    SELECT e.user_id, e.event_type, e.occurred_at, e.session_id, e.device, e.country,
           e.utc_offset_minutes, w.weight
    FROM events e
    JOIN unnest($3::text[], $4::real[]) AS w(event_type, weight) USING (event_type)
    WHERE e.scope = $1
      AND e.occurred_at > $2::timestamptz - interval '30 days' AND e.occurred_at <= $2
      AND NOT EXISTS (SELECT 1 FROM user_settings s
                      WHERE s.user_id = e.user_id AND NOT s.personalization_enabled)
),
sessions AS (
    SELECT user_id, session_id, min(occurred_at) AS started, max(occurred_at) AS ended
    FROM ev WHERE session_id <> '' GROUP BY user_id, session_id
),
per_session AS (
    SELECT user_id,
           count(*) FILTER (WHERE started > $2::timestamptz - interval '7 days') AS sessions_7d,
           count(*) AS sessions_30d,
           avg(extract(epoch FROM ended - started)) AS avg_session_seconds
    FROM sessions GROUP BY user_id
),
per_user AS (
    SELECT user_id,
           ln(1 + sum(weight)) AS engagement_score,
           least(1.0, count(*) FILTER (WHERE event_type = 'click')::real
                 / greatest(1, count(*) FILTER (WHERE event_type = 'impression'))) AS ctr,
           mode() WITHIN GROUP (ORDER BY extract(hour FROM (occurred_at AT TIME ZONE 'UTC')
               + make_interval(mins => coalesce(utc_offset_minutes, 0)))) AS preferred_hour,
           coalesce(mode() WITHIN GROUP (ORDER BY device) FILTER (WHERE device <> 0), 0)
               AS device_category,
           coalesce(mode() WITHIN GROUP (ORDER BY country) FILTER (WHERE country <> ''), '')
               AS country_code,
           coalesce(mode() WITHIN GROUP (ORDER BY utc_offset_minutes), 0) AS utc_offset_minutes
    FROM ev GROUP BY user_id
)
INSERT INTO user_features AS f (scope, user_id, engagement_score, click_through_rate,
    sessions_7d, sessions_30d, avg_session_seconds, preferred_hour, device_category,
    country_code, utc_offset_minutes, updated_at)
SELECT $1, u.user_id, u.engagement_score, u.ctr, coalesce(s.sessions_7d, 0),
       coalesce(s.sessions_30d, 0), coalesce(s.avg_session_seconds, 0), u.preferred_hour,
       u.device_category, u.country_code, u.utc_offset_minutes, now()
FROM per_user u LEFT JOIN per_session s USING (user_id)
ON CONFLICT (scope, user_id) DO UPDATE SET
    engagement_score = EXCLUDED.engagement_score,
    click_through_rate = EXCLUDED.click_through_rate,
    sessions_7d = EXCLUDED.sessions_7d,
    sessions_30d = EXCLUDED.sessions_30d,
    avg_session_seconds = EXCLUDED.avg_session_seconds,
    preferred_hour = EXCLUDED.preferred_hour,
    device_category = EXCLUDED.device_category,
    country_code = EXCLUDED.country_code,
    utc_offset_minutes = EXCLUDED.utc_offset_minutes,
    updated_at = EXCLUDED.updated_at
"""
