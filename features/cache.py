"""Redis, the cache of precomputed rankings. The only module that imports redis.

Keys are ``{prefix}rank:{scope}:{model_version}:{user_id}`` with a TTL (``CacheKeys``; the
prefix is ``Config.redis_key_prefix``), so a ranking is only ever read for the model
version that produced it; a swap makes older keys unreachable and the TTL reclaims them.
Values are the ranking packed as little-endian int32 item positions in the snapshot followed
by float32 scores (``RANKING_DTYPE`` pairs).

Every call carries the configured socket timeout and passes a circuit breaker; errors become
``StoreUnavailable``. The GET of a cached ranking, with the LRANGE of the user's recent items
beside it in the same round trip, goes through ``PipelinedConnection`` (one connection, requests
pipelined, replies parsed by hiredis) rather than redis-py's pooled client, whose Python per
command was the largest cost of a cached answer; every other command goes through redis-py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import hiredis
import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError, ResponseError

from features.breaker import CircuitBreaker
from features.errors import StoreUnavailable

RECENT_ITEMS = 20
RECENT_TTL_S = 7 * 24 * 3600
RANKING_DTYPE = np.dtype([("item", "<i4"), ("score", "<f4")])


@dataclass(frozen=True)
class CacheKeys:
    """The names of privrank's keys, all starting with ``prefix`` (so several deployments,
    or test runs, can share one Redis database). Scopes hold no ':', user IDs may."""

    prefix: str

    def rank(self, scope: str, model_version: str, user_id: str) -> str:
        """A user's precomputed ranking of one model version."""
        return f"{self.prefix}rank:{scope}:{model_version}:{user_id}"

    def recent(self, scope: str, user_id: str) -> str:
        """The user's recent events, newest first, each as "<unix seconds> <item ID>": the
        time is when it was received, so those from before an erasure are told apart."""
        return f"{self.prefix}recent:{scope}:{user_id}"

    def warm(self, scope: str, model_version: str) -> str:
        """Set when every precomputed ranking of that version is in Redis."""
        return f"{self.prefix}warm:{scope}:{model_version}"

    def refill(self, scope: str, model_version: str) -> str:
        """Held by the one process that refills that version's rankings."""
        return f"{self.prefix}refill:{scope}:{model_version}"

    def user_patterns(self, user_id: str) -> list[tuple[str, int]]:
        """SCAN patterns of the keys holding the user's data (rankings, recent items), each
        with the number of ':'-separated fields after the prefix, the user's ID last."""
        return [(f"{self.prefix}rank:*:*:{user_id}", 4), (f"{self.prefix}recent:*:{user_id}", 3)]

    def holds_user(self, key: str, fields: int, user_id: str) -> bool:
        """Whether ``key`` (matched by a pattern of ``user_patterns``) is the user's own; a glob
        '*' also matches ':', so the user part is confirmed exactly."""
        parts = key.removeprefix(self.prefix).split(":", fields - 1)
        return len(parts) == fields and parts[-1] == user_id


def _item_ids(raw: list[Any], after: float | None = None) -> list[str]:
    """The item IDs of an LRANGE reply of a recent list (entries "unix-seconds item-id"), in
    its order; with ``after``, only those received after it."""
    items = []
    for entry in raw:
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        stamp, _, item = text.partition(" ")
        if item and (after is None or float(stamp) > after):  # IDs hold no spaces
            items.append(item)
    return items


def pack_ranking(items: np.ndarray, scores: np.ndarray) -> bytes:
    """items int[k] (snapshot positions), scores float[k] → bytes of k RANKING_DTYPE records."""
    packed = np.empty(len(items), dtype=RANKING_DTYPE)
    packed["item"] = items
    packed["score"] = scores
    return packed.tobytes()


def unpack_ranking(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_ranking``: (int64[k] positions, float32[k] scores)."""
    packed = np.frombuffer(raw, dtype=RANKING_DTYPE)
    return packed["item"].astype(np.int64), packed["score"].astype(np.float32)


def _cached_ranking(raw: bytes | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A GET's reply as a ranking, or None (a miss): missing, or not whole RANKING_DTYPE
    records (cut short, or not written by ``pack_ranking``), which would fail every call."""
    if raw is None or len(raw) % RANKING_DTYPE.itemsize:
        return None
    return unpack_ranking(raw)


def _command(*parts: bytes) -> bytes:
    """One command in RESP, Redis's request encoding."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _Replies(asyncio.Protocol):
    """One connection: the futures waiting for replies, in the order their requests were
    written (Redis answers in that order), each with the loop time it gives up at."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.failed: Exception | None = None
        self._parser = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                future, _ = self.waiting.popleft()
                if not future.done():  # a caller that gave up (cancelled) is skipped
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply unasked for
            self.fail(ConnectionError(f"Redis sent an unreadable reply: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))

    def fail(self, error: Exception) -> None:
        """Fail every waiting request and drop the connection (a reply arriving later could
        no longer be matched to its request)."""
        if self.failed is None:
            self.failed = error
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes, replies: int, give_up_at: float) -> list[asyncio.Future[Any]]:
        """Write ``request`` (``replies`` commands) in one go; a future for each reply."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        self.transport.write(request)
        self.waiting.extend((future, give_up_at) for future in futures)
        return futures


class PipelinedConnection:
    """Commands over one connection of their own, pipelined: each request is written at once
    and its reply resolves its future in order, so concurrent callers share the connection
    without a pool, a lock or a task. redis-py spends about 45 us of CPU on a GET, this about 9
    (measured side by side, README Performance); a batch's SETs cost 34-39 us each through
    redis-py's pipeline and 16-22 this way, the ranking's packing included.
    A request unanswered within ``timeout_s`` fails with every other waiting one
    (TimeoutError) and drops the connection; the next request connects again, within the
    same timeout. ``url``: redis:// or unix://, with its user, password and database;
    rediss:// (TLS) is left to redis-py (``for_url``)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._host = str(params.get("host", "localhost"))
        self._port = int(params.get("port", 6379))
        self._setup: list[bytes] = []
        if params.get("password") is not None:
            user = params.get("username")
            auth = (user, params["password"]) if user else (params["password"],)
            self._setup.append(_command(b"AUTH", *(str(a).encode() for a in auth)))
        if params.get("db"):
            self._setup.append(_command(b"SELECT", str(params["db"]).encode()))
        self._timeout = timeout_s
        self._conn: _Replies | None = None
        self._connecting = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_url(cls, url: str, timeout_s: float) -> PipelinedConnection | None:
        """A connection for ``url`` (made on the first request), or None for rediss://."""
        return None if url.startswith("rediss://") else cls(url, timeout_s)

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None. ConnectionError, TimeoutError or ResponseError."""
        (reply,) = await self.pipeline(_command(b"GET", key.encode()))
        assert reply is None or isinstance(reply, bytes)
        return reply

    async def pipeline(self, *commands: bytes) -> list[Any]:
        """The replies to ``commands`` (RESP-encoded), written together: one round trip.
        ConnectionError, TimeoutError, or ResponseError if Redis refused one of them."""
        conn = self._conn
        if conn is None or conn.failed is not None:
            conn = await self._connect()
        replies = await asyncio.gather(*self._send(conn, b"".join(commands), len(commands)))
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
        return replies

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._conn is not None:
            self._conn.fail(ConnectionError("closed"))
            self._conn = None

    def _send(self, conn: _Replies, request: bytes, replies: int = 1) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures = conn.send(request, replies, loop.time() + self._timeout)
        if self._timer is None:
            self._timer = loop.call_at(conn.waiting[0][1], self._check_overdue)
        return futures

    def _check_overdue(self) -> None:
        """The one timer: fail the connection if its oldest request is overdue, else wait
        for that request's time (replies arrive in order, so no other can be older)."""
        self._timer = None
        conn = self._conn
        if conn is None or not conn.waiting:
            return
        loop = asyncio.get_running_loop()
        give_up_at = conn.waiting[0][1]
        if give_up_at <= loop.time():
            conn.fail(TimeoutError(f"Redis did not answer within {self._timeout:g}s"))
        else:
            self._timer = loop.call_at(give_up_at, self._check_overdue)

    async def _connect(self) -> _Replies:
        async with self._connecting:
            if self._conn is not None and self._conn.failed is None:
                return self._conn  # another caller connected meanwhile
            loop = asyncio.get_running_loop()
            if self._path is not None:
                opening = loop.create_unix_connection(_Replies, self._path)
            else:
                opening = loop.create_connection(_Replies, self._host, self._port)
            try:
                _, conn = await asyncio.wait_for(opening, self._timeout)
            except TimeoutError:
                raise TimeoutError(f"Redis: no connection within {self._timeout:g}s") from None
            self._conn = conn
            if self._setup:
                # AUTH and SELECT written together, before any caller can write to the
                # connection: a GET written between them would read database 0
                setup = self._send(conn, b"".join(self._setup), len(self._setup))
                for reply in await asyncio.gather(*setup):
                    if isinstance(reply, hiredis.ReplyError):
                        conn.fail(ConnectionError(str(reply)))
                        raise ResponseError(f"Redis refused the connection's setup: {reply}")
            return conn


class RankCache:
    """Precomputed rankings in Redis, behind a circuit breaker."""

    def __init__(
        self,
        client: aioredis.Redis,
        ttl_s: int,
        breaker: CircuitBreaker,
        gets: PipelinedConnection | None,
        keys: CacheKeys,
        writes: PipelinedConnection | None = None,
    ) -> None:
        self.keys = keys
        self._client = client
        self._ttl = ttl_s
        self._breaker = breaker
        self._gets = gets  # the rankings' GETs, if not through ``client``
        # the rankings' batched SETs, on a connection of their own: a refill's batch written
        # on the GETs' connection would hold serving's replies up behind it
        self._writes = writes

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        ttl_s: int,
        key_prefix: str,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 1.0,
    ) -> RankCache:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
        )
        breaker = CircuitBreaker("Redis", failures=breaker_failures, cooldown_s=breaker_cooldown_s)
        gets = PipelinedConnection.for_url(url, timeout_s)
        writes = PipelinedConnection.for_url(url, timeout_s)
        return cls(client, ttl_s, breaker, gets, CacheKeys(key_prefix), writes)

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def close(self) -> None:
        for connection in (self._gets, self._writes):
            if connection is not None:
                await connection.close()
        await self._client.aclose()

    @asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client, behind the breaker, with driver errors translated."""
        async with self._breaker.guard():
            try:
                yield self._client
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._redis() as client:
            await client.ping()

    async def get(
        self, scope: str, model_version: str, user_id: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        key = self.keys.rank(scope, model_version, user_id)
        async with self._redis() as client:
            raw = await (client.get(key) if self._gets is None else self._gets.get(key))
        assert raw is None or isinstance(raw, bytes)  # the client has no decode_responses
        return _cached_ranking(raw)

    async def get_with_recent(
        self, scope: str, model_version: str, user_id: str, *, after: float | None = None
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
        """``get`` and ``recent`` (with ``after``) of the user in one round trip (pipelined)."""
        key, recent = (
            self.keys.rank(scope, model_version, user_id),
            self.keys.recent(scope, user_id),
        )
        async with self._redis() as client:
            if self._gets is None:
                pipe = client.pipeline(transaction=False)
                pipe.get(key)
                pipe.lrange(recent, 0, RECENT_ITEMS - 1)
                raw, items = await pipe.execute()
            else:
                raw, items = await self._gets.pipeline(
                    _command(b"GET", key.encode()),
                    _command(b"LRANGE", recent.encode(), b"0", b"%d" % (RECENT_ITEMS - 1)),
                )
        return _cached_ranking(raw), _item_ids(items, after)

    async def put_many(
        self,
        scope: str,
        model_version: str,
        rankings: Iterable[tuple[str, np.ndarray, np.ndarray]],
        *,
        batch: int = 1000,
        ttl_s: int | None = None,
    ) -> int:
        """Write (user_id, items, scores) rankings in pipelined batches, each with ``ttl_s``
        (default: the cache's TTL); returns the count."""
        expiry = b"%d" % (ttl_s or self._ttl)
        commands = (
            (
                b"SET",
                self.keys.rank(scope, model_version, user_id).encode(),
                pack_ranking(items, scores),
                b"EX",
                expiry,
            )
            for user_id, items, scores in rankings
        )
        written = 0
        async with self._redis() as client:
            while chunk := list(itertools.islice(commands, batch)):
                if self._writes is not None:
                    await self._writes.pipeline(*(_command(*command) for command in chunk))
                else:
                    pipe = client.pipeline(transaction=False)
                    for command in chunk:
                        pipe.execute_command(*command)
                    await pipe.execute()
                written += len(chunk)
        return written

    async def delete_rankings(self, scope: str, model_version: str, user_ids: Sequence[str]) -> int:
        """Delete the users' cached rankings of one model version; how many there were."""
        return await self._delete([self.keys.rank(scope, model_version, u) for u in user_ids])

    async def is_warm(self, scope: str, model_version: str) -> bool:
        """Whether every precomputed ranking of the version is here (``mark_warm``); a
        restarted Redis has lost the mark with the rankings."""
        async with self._redis() as client:
            return bool(await client.exists(self.keys.warm(scope, model_version)))

    async def mark_warm(self, scope: str, model_version: str, ttl_s: int | None = None) -> None:
        async with self._redis() as client:
            await client.set(self.keys.warm(scope, model_version), b"1", ex=ttl_s or self._ttl)

    async def claim_refill(self, scope: str, model_version: str, hold_s: int) -> bool:
        """True for the one process (of all sharing this Redis) that may refill the version's
        rankings in the next ``hold_s`` seconds."""
        async with self._redis() as client:
            key = self.keys.refill(scope, model_version)
            return bool(await client.set(key, b"1", nx=True, ex=hold_s))

    async def push_recent(self, events: Iterable[tuple[str, str, str]], *, at: float) -> None:
        """Remember (scope, user_id, item_id) interactions received at ``at`` (unix seconds) as
        each user's most recent items, for ranking users the current model does not know yet."""
        async with self._redis() as client:
            pipe = client.pipeline(transaction=False)
            for scope, user_id, item_id in events:
                key = self.keys.recent(scope, user_id)
                pipe.lpush(key, f"{at:.6f} {item_id}")
                pipe.ltrim(key, 0, RECENT_ITEMS - 1)
                pipe.expire(key, RECENT_TTL_S)
            await pipe.execute()

    async def delete_recent(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Delete the recent items of (scope, user_id) pairs; how many lists there were."""
        return await self._delete([self.keys.recent(scope, user_id) for scope, user_id in pairs])

    async def _delete(self, keys: list[str]) -> int:
        if not keys:
            return 0
        async with self._redis() as client:
            return int(await client.delete(*keys))

    async def recent(self, scope: str, user_id: str, *, after: float | None = None) -> list[str]:
        """The user's most recent item IDs in the scope, newest first (possibly repeated); with
        ``after`` (unix seconds, e.g. the user's erasure) only those received after it."""
        async with self._redis() as client:
            raw = await client.lrange(self.keys.recent(scope, user_id), 0, RECENT_ITEMS - 1)
        return _item_ids(raw, after)

    async def _user_keys(self, client: aioredis.Redis, user_id: str) -> list[bytes]:
        """Every key holding data of the user: cached rankings and recent items."""
        keys: list[bytes] = []
        for pattern, fields in self.keys.user_patterns(user_id):
            async for key in client.scan_iter(match=pattern, count=1000):
                if self.keys.holds_user(key.decode(), fields, user_id):
                    keys.append(key)
        return keys

    async def delete_user(self, user_id: str) -> int:
        """Delete every cached ranking of a user, across scopes and model versions."""
        async with self._redis() as client:
            keys = await self._user_keys(client, user_id)
            return int(await client.delete(*keys)) if keys else 0

    async def count_user(self, user_id: str) -> int:
        """How many keys (cached rankings, recent items) hold data of the user."""
        async with self._redis() as client:
            return len(await self._user_keys(client, user_id))
