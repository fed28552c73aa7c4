"""Keeps answering when things break: a hung or dead Redis, overload, short deadlines, and
jobs killed at random points. Real servers throughout; no timing assertions (figures are for
tests/bench/chaos.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import asyncpg
import grpc
import numpy as np
import pytest
import redis
from grpc import aio

from features.breaker import CircuitBreaker
from features.cache import CacheKeys, PipelinedConnection, RankCache
from features.errors import StoreUnavailable
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking import snapshot
from server import auth, embedded
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.app import App, stop_server
from server.config import Config
from server.interceptors import Admission, InFlight, ServingInterceptor
from server.metrics import ServiceMetrics
from server.threads import GRPC_THREAD_PREFIXES, threads, usable_cores
from tests.conftest import ROOT, cli_env, privrank
from tests.serving import Running, serving
from tests.test_snapshot import make_arrays


async def test_breaker_opens_probes_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("features.breaker.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker("dep", failures=3, cooldown_s=2.0)

    async def call(fail: bool) -> str:
        try:
            async with breaker.guard():
                if fail:
                    raise StoreUnavailable("down")
        except StoreUnavailable as exc:
            return "open" if "circuit open" in str(exc) else "failed"
        return "ok"

    assert [await call(True) for _ in range(3)] == ["failed"] * 3
    assert breaker.state == "open"
    assert await call(False) == "open"  # refused without calling the store
    now[0] += 2.0
    assert breaker.state == "half-open"
    assert await call(True) == "failed"  # the probe fails: open again
    assert await call(False) == "open"
    now[0] += 2.0
    assert await call(False) == "ok"  # the probe succeeds: closed
    assert breaker.state == "closed"
    assert await call(True) == "failed"  # one failure does not reopen it
    assert breaker.state == "closed"


@contextlib.contextmanager
def _own_redis(root: Path) -> Iterator[tuple[str, int]]:
    """A Redis of this test's own (so it may be stopped): (url, pid)."""
    with embedded.embedded_redis(root) as url:
        pid = int(
            subprocess.check_output(["pgrep", "-f", str(root.resolve() / "redis")]).split()[0]
        )
        yield url, pid


@contextlib.asynccontextmanager
async def _serving(
    config: Config, pg_url: str, redis_url: str
) -> AsyncIterator[tuple[App, rpc.RankingStub, list[tuple[str, str]]]]:
    async with serving(config, pg_url, redis_url) as running:
        yield running.app, rpc.RankingStub(running.channel), running.service


async def _burst(
    stub: rpc.RankingStub, metadata: list[tuple[str, str]], users: list[str], **request: object
) -> list[tuple[grpc.StatusCode, int]]:
    async def one(user: str) -> tuple[grpc.StatusCode, int]:
        try:
            answer = await stub.Recommend(
                pb.RecommendRequest(user_id=user, **request), metadata=metadata, timeout=5
            )
        except aio.AioRpcError as exc:
            return exc.code(), 0
        return grpc.StatusCode.OK, answer.source

    return list(await asyncio.gather(*(one(u) for u in users)))


async def test_redis_hung_then_killed_then_back(
    config: Config, pg_url: str, seeded: object, tmp_path: Path
) -> None:
    with _own_redis(tmp_path) as (redis_url, pid):
        async with _serving(config, pg_url, redis_url) as (app, stub, metadata):
            snap = app.ranker.scope("default").snapshot
            # users no other test opts out or erases, and whom the model knows
            known = (f"u{n}" for n in range(100, 200))
            users = [u for u in known if snap.user_position(u) is not None][:60]
            # cache every user's ranking, as precompute would
            from jobs.steps import top_k_for_users

            positions = np.array([snap.user_position(u) for u in users], dtype=np.int64)
            items, scores, counts = top_k_for_users(snap, positions, 100)
            await app.cache.put_many(
                "default",
                snap.version,
                [(u, items[r, : counts[r]], scores[r, : counts[r]]) for r, u in enumerate(users)],
            )
            # opens the cache's connections: on a loaded machine a first connect can exceed the
            # 50 ms Redis timeout, and that call is then (correctly) answered LIVE
            await _burst(stub, metadata, users)
            healthy = await _burst(stub, metadata, users)
            assert {code for code, _ in healthy} == {grpc.StatusCode.OK}
            assert {source for _, source in healthy} == {pb.SOURCE_CACHED}

            # bursts of 2 x 60 calls at once: within the calls gRPC core holds per method
            # (Config.max_pending_rpcs), beyond which it sheds by design (test below)
            burst = users * 2
            assert len(burst) <= config.max_pending_rpcs
            os.kill(pid, signal.SIGSTOP)  # hung: accepts nothing, answers nothing
            try:
                hung = await _burst(stub, metadata, burst)
                assert {code for code, _ in hung} == {grpc.StatusCode.OK}
                assert {source for _, source in hung} == {pb.SOURCE_LIVE}
                assert app.cache.breaker.state in ("open", "half-open")
                # same items live as cached: the ladder changes the source, not the answer
                live = await stub.Recommend(
                    pb.RecommendRequest(user_id=users[0]), metadata=metadata
                )
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(config.breaker_cooldown_s + 0.1)
            await _burst(stub, metadata, users[:1])  # after the cooldown one call probes
            assert app.cache.breaker.state == "closed"
            back = await _burst(stub, metadata, users)
            assert {source for _, source in back} == {pb.SOURCE_CACHED}
            cached = await stub.Recommend(pb.RecommendRequest(user_id=users[0]), metadata=metadata)
            assert [i.item_id for i in cached.items] == [i.item_id for i in live.items]

            os.kill(pid, signal.SIGKILL)  # dead
            dead = await _burst(stub, metadata, burst)
            assert {code for code, _ in dead} == {grpc.StatusCode.OK}
            assert {source for _, source in dead} == {pb.SOURCE_LIVE}


async def test_pipelined_gets_give_up_on_a_hung_redis_and_reconnect(tmp_path: Path) -> None:
    """Every GET waiting on a hung Redis fails within the timeout; once it answers again the
    next GET reconnects; a password it asks for is sent, a wrong one refused at connection
    time; a dead Redis is a ConnectionError. Each as RankCache's StoreUnavailable."""
    with _own_redis(tmp_path) as (redis_url, pid):
        client = redis.Redis.from_url(redis_url)
        client.set("k", b"v")
        gets = PipelinedConnection(redis_url, timeout_s=0.3)
        cache = RankCache(
            redis.asyncio.Redis.from_url(redis_url),
            60,
            CircuitBreaker("Redis", failures=100, cooldown_s=1),
            gets,
            CacheKeys("privrank-test:"),
        )
        try:
            assert await gets.get("k") == b"v"
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                waiting = await asyncio.gather(
                    *(gets.get("k") for _ in range(20)), return_exceptions=True
                )
                assert all(isinstance(e, TimeoutError) for e in waiting), waiting
                assert time.monotonic() - started < 5
                with pytest.raises(StoreUnavailable, match="did not answer"):
                    await cache.get("s", "v", "u")  # a new connection, whose setup hangs too
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await gets.get("k") == b"v"

            client.config_set("requirepass", "sesame")
            await gets.close()
            with_password = PipelinedConnection(_with_password(redis_url, "sesame"), 1)
            assert await with_password.get("k") == b"v"
            await with_password.close()
            # a GET sent while a new connection's AUTH is unanswered (Redis stopped meanwhile)
            # waits for its SELECT too: it reads the URL's database, not database 0's "k"
            in_db_3 = _with_password(redis_url.replace("db=0", "db=3"), "sesame")
            with redis.Redis.from_url(in_db_3) as db_3:
                db_3.set("k", b"db 3")
            connecting = PipelinedConnection(in_db_3, 2)
            os.kill(pid, signal.SIGSTOP)
            try:
                first = asyncio.ensure_future(connecting.get("k"))
                await asyncio.sleep(0.2)  # connected (the kernel accepts), AUTH written
                second = asyncio.ensure_future(connecting.get("k"))
                await asyncio.sleep(0.05)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert [await first, await second] == [b"db 3", b"db 3"]
            await connecting.close()
            refused = PipelinedConnection(_with_password(redis_url, "wrong"), 1)
            with pytest.raises(redis.exceptions.ResponseError, match="setup"):
                await refused.get("k")
            await refused.close()

            os.kill(pid, signal.SIGKILL)
            with pytest.raises(StoreUnavailable, match="Redis"):
                await cache.get("s", "v", "u")
        finally:
            await cache.close()
            client.close()


def _with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://:{password}@{rest}" if scheme != "unix" else f"{url}&password={password}"


def _one_slot(config: Config, max_queue_wait_s: float) -> Config:
    """One handler slot and four queue places; every request scores on the kernel pool, so
    waiting calls are visible to admission."""
    return dataclasses.replace(
        config,
        max_active_rpcs=1,
        max_queued_rpcs=4,
        offload_min_work=0,
        max_queue_wait_s=max_queue_wait_s,
    )


def _hold_kernel_threads(app: App, release: threading.Event) -> list[Future[bool]]:
    """Occupy every kernel thread until ``release`` is set (each returns True then)."""
    threads = app.config.kernel_thread_count(usable_cores())
    return [app.kernels_pool.submit(release.wait, 30) for _ in range(threads)]


async def test_overload_is_shed_at_once_and_queued_calls_respect_deadlines(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    async with serving(_one_slot(config, max_queue_wait_s=30), pg_url, redis_url) as running:
        app, stub, metadata = running.app, rpc.RankingStub(running.channel), running.service
        candidates = [f"i{n}" for n in range(100)] * 100

        async def heavy() -> grpc.StatusCode:
            try:
                await stub.RankCandidates(
                    pb.RankCandidatesRequest(user_id="u1", candidate_item_ids=candidates),
                    metadata=metadata,
                    timeout=10,
                )
            except aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # both kernel threads held: the first call keeps its slot until they are freed, so
        # however slowly the calls arrive, one runs, four queue and the rest are refused
        release = threading.Event()
        holds = _hold_kernel_threads(app, release)
        calls = [asyncio.create_task(heavy()) for _ in range(60)]
        for refused, finished in enumerate(asyncio.as_completed(calls), start=1):
            assert await finished == grpc.StatusCode.RESOURCE_EXHAUSTED
            if refused == 55:
                break
        # full: a call is refused before its request is parsed (garbage is not even looked at)
        garbage = running.channel.unary_unary("/privrank.v1.Ranking/Recommend")
        with pytest.raises(aio.AioRpcError) as err:
            await garbage(b"\xff\xff not protobuf", metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        codes = await asyncio.gather(*calls)
        assert all(hold.result() for hold in holds)
        assert codes.count(grpc.StatusCode.OK) == 5  # one running + four queued
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 55

        # the kernel threads held again and a call holding the slot (the server runs on this
        # event loop: once the blocker is in flight, a few turns put it on the kernel pool)
        answers_before = sum(app.metrics.figures().served_by_source.values())
        release = threading.Event()
        holds = _hold_kernel_threads(app, release)
        blocker = asyncio.create_task(heavy())
        arrival = time.monotonic() + 10
        while app.in_flight.count == 0:
            assert time.monotonic() < arrival, "the blocker never reached the server"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Recommend(
                pb.RecommendRequest(user_id="u2"), metadata=metadata, timeout=0.001
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert await blocker == grpc.StatusCode.OK
        assert all(hold.result() for hold in holds)
        # one answer was produced (the blocker's); the expired call started no work
        answers_after = sum(app.metrics.figures().served_by_source.values())
        assert answers_after - answers_before == 1
        # the server still serves normally afterwards
        answer = await stub.Recommend(pb.RecommendRequest(user_id="u2"), metadata=metadata)
        assert answer.items


async def test_a_call_queued_past_the_wait_bound_is_refused_without_work(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    async with serving(_one_slot(config, max_queue_wait_s=0.2), pg_url, redis_url) as running:
        stub = rpc.RankingStub(running.channel)
        release = threading.Event()
        # the kernel threads held: the first call keeps the only slot; the next one queues
        holds = _hold_kernel_threads(running.app, release)
        first = asyncio.ensure_future(
            stub.Recommend(pb.RecommendRequest(user_id="u1"), metadata=running.service, timeout=10)
        )
        await asyncio.sleep(0.05)
        answers_before = sum(running.app.metrics.figures().served_by_source.values())
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Recommend(
                pb.RecommendRequest(user_id="u2"), metadata=running.service, timeout=10
            )
        waited = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queued over 0.2s" in (err.value.details() or "")
        assert waited < 5  # refused at the bound, not at its 10 s deadline
        release.set()
        assert (await first).items
        assert all(hold.result() for hold in holds)
        # one answer (the first call's); the refused call computed nothing
        assert sum(running.app.metrics.figures().served_by_source.values()) == answers_before + 1


async def test_a_call_without_a_deadline_is_bounded_by_the_default_budget(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    """A caller that sets no deadline (grpcurl, a careless client) still gets an answer within
    the default budget: here DEADLINE_EXCEEDED while its scoring waits for the held kernel
    threads, instead of waiting for as long as they are held."""
    budgeted = dataclasses.replace(_one_slot(config, max_queue_wait_s=30), default_deadline_s=0.3)
    async with serving(budgeted, pg_url, redis_url) as running:
        release = threading.Event()
        holds = _hold_kernel_threads(running.app, release)
        try:
            with pytest.raises(aio.AioRpcError) as err:
                await rpc.RankingStub(running.channel).RankCandidates(
                    pb.RankCandidatesRequest(user_id="u1", candidate_item_ids=["i1", "i2"]),
                    metadata=running.service,
                )
        finally:
            release.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.details() == "deadline of 0.300s exceeded"
        assert all(hold.result() for hold in holds)
        answer = await rpc.RankingStub(running.channel).Recommend(
            pb.RecommendRequest(user_id="u1"), metadata=running.service
        )
        assert answer.items


def _never_finished(app: App) -> float:
    """privrank_grpc_calls started - succeeded - failed: calls in flight, or that gRPC core
    dropped (shed, expired) before any handler finished them."""
    registry = app.metrics.registry
    started, succeeded, failed = (
        registry.get_sample_value("privrank_grpc_calls_total", {"result": result}) or 0.0
        for result in ("started", "succeeded", "failed")
    )
    return started - succeeded - failed


def _loop_lag_samples(app: App, over_s: float) -> tuple[float, float]:
    """privrank_event_loop_lag_seconds: (samples, samples later than ``over_s``)."""
    registry = app.metrics.registry
    name = "privrank_event_loop_lag_seconds"
    total = registry.get_sample_value(f"{name}_count") or 0.0
    within = registry.get_sample_value(f"{name}_bucket", {"le": str(over_s)}) or 0.0
    return total, total - within


async def _backlog_while_loop_blocked(
    running: Running, calls: int
) -> tuple[list[grpc.StatusCode | None], list[grpc.StatusCode]]:
    """Send ``calls`` Recommends from another thread while this (the server's) event loop is
    blocked, so they wait in gRPC core. Returns the codes of the calls as they stood when the
    loop was freed (None: not finished), and their final codes."""
    async with _held_in_core(running, calls) as futures:
        while_blocked = [_code(f) if f.done() else None for f in futures]
    return while_blocked, await asyncio.to_thread(lambda: [_code(f) for f in futures])


def _code(future: grpc.Future) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def _held_in_core(running: Running, calls: int) -> AsyncIterator[list[grpc.Future]]:
    """The futures of ``calls`` Recommends sent from another thread while this (the server's)
    event loop was blocked, so that they wait in gRPC core; the block runs as the loop is freed,
    before the server takes any of them. The channel closes after the block."""
    with grpc.insecure_channel(running.target) as channel:
        stub = rpc.RankingStub(channel)

        def fire() -> list[grpc.Future]:
            request = pb.RecommendRequest(user_id="u1")
            return [
                stub.Recommend.future(request, metadata=running.service, timeout=30)
                for _ in range(calls)
            ]

        with ThreadPoolExecutor(1) as sender:
            fired = sender.submit(fire)
            time.sleep(1.5)  # noqa: ASYNC251 -- blocks the loop: the server takes no call
            futures = fired.result()
        yield futures
        await asyncio.to_thread(lambda: [f.exception() for f in futures])


async def test_calls_held_in_grpc_core_at_shutdown_are_refused_not_dropped(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    """chttp2's stop() drops the calls gRPC core holds for the loop (CANCELLED); stop_server
    first lets them reach the refusal, UNAVAILABLE, which callers retry elsewhere."""
    async with serving(config, pg_url, redis_url) as running:
        async with _held_in_core(running, 60) as futures:
            await stop_server(running.app, running.server)
        codes = [_code(f) for f in futures]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, Counter(codes)
    assert grpc.StatusCode.UNAVAILABLE in codes


async def test_a_backlog_in_grpc_core_is_shed_there_and_the_rest_answered(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    cap, calls = 8, 60
    async with serving(
        dataclasses.replace(config, max_pending_rpcs=cap), pg_url, redis_url
    ) as running:
        answered_before = sum(running.app.metrics.figures().served_by_source.values())
        await asyncio.sleep(0.3)  # the loop's lag sampler is now waiting on its timer
        _, late_before = _loop_lag_samples(running.app, 1.0)
        dropped_before = _never_finished(running.app)
        while_blocked, final = await _backlog_while_loop_blocked(running, calls)
        # past the cap, gRPC core refused the calls at once, without the server's Python: as
        # CANCELLED, or on its promise-based transport (PRIVRANK_GRPC_TRANSPORT=ph2, which this
        # test runs on where that is set) RESOURCE_EXHAUSTED
        ph2 = running.app.transport == "ph2"
        shed = [c for c in while_blocked if c is not None]
        assert set(shed) == {
            grpc.StatusCode.RESOURCE_EXHAUSTED if ph2 else grpc.StatusCode.CANCELLED
        }
        assert len(shed) >= calls - 2 * cap - 1  # one handed to the loop, < 2 x cap waiting
        # the ones it kept were answered once the loop was free, and only they did work
        kept = [f for w, f in zip(while_blocked, final, strict=True) if w is None]
        assert set(kept) == {grpc.StatusCode.OK}
        answered = sum(running.app.metrics.figures().served_by_source.values()) - answered_before
        assert answered == len(kept)
        # the cause shows on the server: its loop's timer woke up over a second late
        for _ in range(50):
            if _loop_lag_samples(running.app, 1.0)[1] > late_before:
                break
            await asyncio.sleep(0.1)
        assert _loop_lag_samples(running.app, 1.0)[1] == late_before + 1
        # and the shed calls show in privrank_grpc_calls (gRPC core's own counts, followed each
        # second): started, but neither succeeded nor failed; ph2 keeps no counts
        if not ph2:
            for _ in range(50):
                if _never_finished(running.app) - dropped_before == len(shed):
                    break
                await asyncio.sleep(0.1)
            assert _never_finished(running.app) - dropped_before == len(shed)

    # the default cap holds this backlog: nothing is shed
    async with serving(config, pg_url, redis_url) as running:
        while_blocked, final = await _backlog_while_loop_blocked(running, calls)
        assert while_blocked == [None] * calls
        assert final == [grpc.StatusCode.OK] * calls


def _content_hash(root: Path, scope: str) -> str:
    """The current snapshot's content hash (its version without the publication time)."""
    version = snapshot.current_version(root, scope)
    assert version is not None
    return version.split("Z-", 1)[1]


async def _ranks(pg_url: str, scope: str) -> list[tuple[str, str, list[str]]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT user_id, model_version, item_ids FROM ranks WHERE scope = $1 ORDER BY user_id",
            scope,
        )
    finally:
        await conn.close()
    return [(r["user_id"], r["model_version"].split("Z-", 1)[1], list(r["item_ids"])) for r in rows]


async def test_a_job_killed_at_random_points_reruns_to_the_clean_result(
    config: Config, pg_url: str, seeded: object
) -> None:
    scope = "crash"
    privrank(
        config,
        "synth",
        "--users",
        "300",
        "--items",
        "150",
        "--events",
        "8000",
        "--scope",
        scope,
        "--seed",
        "21",
    )
    started = time.monotonic()
    await asyncio.to_thread(privrank, config, "jobs", "nightly", "--scope", scope)
    clean_seconds = time.monotonic() - started
    clean_hash = _content_hash(config.snapshot_dir, scope)
    clean_ranks = await _ranks(pg_url, scope)
    assert clean_ranks

    rng = random.Random(5)
    for attempt in range(5):
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs", "nightly", "--scope", scope],
            env=cli_env(config),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(rng.uniform(0.2, clean_seconds))
        process.kill()
        await asyncio.to_thread(process.wait)
        # whatever the kill interrupted, readers still find a complete snapshot
        snapshot.load_current(config.snapshot_dir, scope)
        await asyncio.to_thread(privrank, config, "jobs", "nightly", "--scope", scope)
        assert _content_hash(config.snapshot_dir, scope) == clean_hash, f"attempt {attempt}"
        assert await _ranks(pg_url, scope) == clean_ranks, f"attempt {attempt}"


async def test_train_replaces_its_model_durably(
    seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.replace`` is atomic, not durable: train's new model.npz is fsynced before it
    replaces the old one and its directory after, so a crash leaves one model or the other."""
    scope = "durable"
    await seeded.pg.insert_event_batches(generate(users=60, items=40, events=1500, scope=scope))
    done: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def traced_fsync(fd: int) -> None:
        done.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def traced_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        done.append(("replace", f"{src} -> {dst}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", traced_fsync)
    monkeypatch.setattr(os, "replace", traced_replace)
    await run_job(seeded, "train", [scope])
    monkeypatch.undo()
    model = seeded.model_path(scope)
    (moved,) = [
        n for n, (op, what) in enumerate(done) if op == "replace" and what.endswith(f" -> {model}")
    ]
    staging = done[moved][1].split(" -> ")[0]
    assert ("fsync", staging) in done[:moved], "the new model was not on disk before the swap"
    assert ("fsync", str(model.parent)) in done[moved:], "the swap itself was not made durable"


async def test_a_snapshot_whose_index_faiss_cannot_read_is_refused_and_others_still_load(
    config: Config, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The scope keeps its snapshot, and the scopes after it in the reload still move on (a
    faiss RuntimeError used to end the whole reload, and a start-up's warm-up with it)."""
    own = dataclasses.replace(config, data_dir=tmp_path)
    root = own.snapshot_dir
    first = {s: snapshot.publish(root, s, make_arrays(n=50, d=4, seed=1)) for s in ("a", "b")}
    app = await App.open(own, pg_url, redis_url)
    try:
        assert await app.reload() == first
        snapshot.publish(
            root, "a", make_arrays(n=50, d=4, seed=2), index_writer=lambda p: p.write_bytes(b"x")
        )
        second_b = snapshot.publish(root, "b", make_arrays(n=50, d=4, seed=3))
        assert await app.reload() == {"a": first["a"], "b": second_b}
    finally:
        await app.close()


async def test_the_pool_is_reported(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    async with serving(config, pg_url, redis_url) as running:
        settings = rpc.SettingsStub(running.channel)
        await settings.GetSettings(pb.GetSettingsRequest(user_id="u3"), metadata=running.service)
        registry = running.app.metrics.registry

        def pool(state: str) -> float | None:
            return registry.get_sample_value("privrank_pg_pool_connections", {"state": state})

        for _ in range(50):  # reported once a second
            if pool("max") is not None:
                break
            await asyncio.sleep(0.1)
        assert pool("max") == 8
        opened, idle = pool("open"), pool("idle")
        assert opened is not None
        assert idle is not None
        assert 1 <= opened <= 8
        assert 0 <= idle <= opened


def _grpc_threads_niceness() -> list[int]:
    """The niceness of each of this process's gRPC core threads."""
    found = []
    for tid, name in threads():
        if name.startswith(GRPC_THREAD_PREFIXES):
            with contextlib.suppress(OSError):
                found.append(os.getpriority(os.PRIO_PROCESS, tid))
    return found


async def test_grpc_core_threads_run_below_the_event_loop(
    config: Config, pg_url: str, redis_url: str, seeded: object
) -> None:
    nice = 12  # above the default, so only this server can have set it
    async with serving(dataclasses.replace(config, grpc_threads_nice=nice), pg_url, redis_url) as r:
        stub = rpc.RankingStub(r.channel)
        await stub.Recommend(pb.RecommendRequest(user_id="u3"), metadata=r.service)
        for _ in range(30):  # checked once a second
            niceness = _grpc_threads_niceness()
            if niceness and min(niceness) >= nice:
                break
            await asyncio.sleep(0.1)
        assert niceness, "no gRPC core thread found"
        assert min(niceness) >= nice
        # the event loop's own thread keeps its priority
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0


async def _until_warm(app: App, scope: str, version: str) -> None:
    for _ in range(100):
        if await app.cache.is_warm(scope, version):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the cache of {scope}/{version} was never refilled")


async def test_an_emptied_redis_is_refilled_from_postgresql(
    config: Config, pg_url: str, seeded: JobContext, tmp_path: Path
) -> None:
    await run_job(seeded, "precompute", ["default"])  # the serving version's ranks are stored
    with _own_redis(tmp_path) as (redis_url, _):  # empty, as a restarted Redis is
        async with _serving(config, pg_url, redis_url) as (app, stub, metadata):
            version = app.ranker.scope("default").snapshot.version
            conn = await asyncpg.connect(pg_url)
            try:
                stored = {
                    r["user_id"]: list(r["item_ids"])
                    for r in await conn.fetch(
                        "SELECT user_id, item_ids FROM ranks WHERE scope = 'default'"
                        " AND model_version = $1 ORDER BY user_id LIMIT 40",
                        version,
                    )
                }
            finally:
                await conn.close()
            assert stored
            for round_ in ("at start-up", "after a flush"):
                await _until_warm(app, "default", version)
                for user, items in stored.items():
                    answer = await stub.Recommend(
                        pb.RecommendRequest(user_id=user), metadata=metadata
                    )
                    assert answer.source == pb.SOURCE_CACHED, (round_, user)
                    assert [i.item_id for i in answer.items] == items[: len(answer.items)]
                client = redis.Redis.from_url(redis_url)
                client.flushdb()  # the rankings and the mark are gone, as in a restart
                client.close()


async def test_a_refill_racing_an_opt_out_leaves_no_ranking_of_the_user(
    config: Config, pg_url: str, seeded: JobContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An opt-out that lands after the refill checked its page, before it wrote it, is undone
    by the refill itself: the user's ranking does not come back into Redis."""
    quitter = "u66"
    await run_job(seeded, "precompute", ["default"])
    with _own_redis(tmp_path) as (redis_url, _):
        async with serving(config, pg_url, redis_url) as running:
            app, settings = running.app, rpc.SettingsStub(running.channel)
            version = app.ranker.scope("default").snapshot.version
            await _until_warm(app, "default", version)
            assert await app.cache.get("default", version, quitter) is not None
            write, raced = app.cache.put_many, []

            async def racing_write(
                scope: str, model_version: str, batch: list, **kw: object
            ) -> int:
                if not raced and any(user == quitter for user, _, _ in batch):
                    raced.append(quitter)  # checked already; the opt-out lands before the write
                    await settings.UpdateSettings(
                        pb.UpdateSettingsRequest(user_id=quitter, personalization_enabled=False),
                        metadata=running.service,
                    )
                return await write(scope, model_version, batch, **kw)  # type: ignore[arg-type]

            monkeypatch.setattr(app.cache, "put_many", racing_write)
            try:
                client = redis.Redis.from_url(redis_url)
                client.flushdb()  # a restart: the refill runs again, through racing_write
                client.close()
                await _until_warm(app, "default", version)
                assert raced == [quitter]
                assert await app.cache.get("default", version, quitter) is None
                assert await app.cache.get("default", version, "u67") is not None
            finally:
                await settings.UpdateSettings(
                    pb.UpdateSettingsRequest(user_id=quitter, personalization_enabled=True),
                    metadata=running.service,
                )


# -- the interceptor alone, around handlers of the test's own ---------------------------------

_KEY, _ISSUER = "interceptor-test-" + "k" * 32, "privrank"
_Handler = Callable[[bytes, aio.ServicerContext], Awaitable[bytes]]


@contextlib.asynccontextmanager
async def _intercepted(
    monkeypatch: pytest.MonkeyPatch,
    handler: _Handler,
    admission: Admission | None,
    metrics: ServiceMetrics,
    in_flight: InFlight,
    default_deadline_s: float = 5.0,
) -> AsyncIterator[Callable[..., Awaitable[bytes]]]:
    """A server of one method, /test.T/Work, behind privrank's interceptor; yields a caller
    with a service token (request bytes, the call's deadline in seconds)."""
    monkeypatch.setitem(auth.POLICY, "/test.T/Work", frozenset({auth.Role.SERVICE}))
    interceptor = ServingInterceptor(
        metrics, default_deadline_s, admission, auth.Authorizer([_KEY], _ISSUER), in_flight
    )
    server = aio.server(interceptors=[interceptor])
    method = {"Work": grpc.unary_unary_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.T", method)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = auth.mint_token(_KEY, role="service", subject="t", ttl_s=60, issuer=_ISSUER)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            work = channel.unary_unary("/test.T/Work")

            async def call(request: bytes = b"", deadline_s: float | None = None) -> bytes:
                metadata = [("authorization", f"Bearer {token}")]
                answer: bytes = await work(request, metadata=metadata, timeout=deadline_s)
                return answer

            yield call
    finally:
        await server.stop(0)


async def _status(call: Awaitable[bytes]) -> grpc.StatusCode:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_call_past_its_deadline_in_cpu_work_is_counted_deadline_exceeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC core ends the call at its deadline while the handler computes without awaiting:
    a slow answer, counted DEADLINE_EXCEEDED and timed (as CANCELLED it fell out of the
    latency histogram and the p99, just the slow answers)."""

    async def slow(request: bytes, context: aio.ServicerContext) -> bytes:
        time.sleep(1.0)  # noqa: ASYNC251 (CPU work past the 0.3 s deadline)
        await asyncio.sleep(0.05)
        return b"late"

    metrics, in_flight = ServiceMetrics(), InFlight()
    async with _intercepted(monkeypatch, slow, None, metrics, in_flight) as call:
        assert await _status(call(deadline_s=0.3)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await in_flight.close(timeout_s=10) == 0
    counted = metrics.registry.get_sample_value
    work = {"method": "Work"}
    assert counted("privrank_requests_total", {**work, "code": "CANCELLED"}) is None
    assert counted("privrank_requests_total", {**work, "code": "DEADLINE_EXCEEDED"}) == 1
    assert counted("privrank_request_seconds_count", work) == 1


async def test_a_queued_call_woken_after_its_deadline_starts_no_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slot frees before the queued call's deadline, but the loop is busy and runs it
    only after: wait_for hands it the slot (swallowing the budget's cancellation, Python
    3.11), and it must still start no work."""
    worked: list[bytes] = []

    async def handler(request: bytes, context: aio.ServicerContext) -> bytes:
        if request == b"hold":
            await asyncio.sleep(0.3)
            asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # busy right after release
            return b"held"
        worked.append(request)
        return b"worked"

    metrics, in_flight, admission = ServiceMetrics(), InFlight(), Admission(1, 4, 30.0)
    async with _intercepted(
        monkeypatch, handler, admission, metrics, in_flight, default_deadline_s=0.5
    ) as call:
        first = asyncio.create_task(call(b"hold", deadline_s=10))
        arrival = time.monotonic() + 10
        while not in_flight.count:
            assert time.monotonic() < arrival, "the first call never reached the server"
            await asyncio.sleep(0.01)
        queued = await _status(call(b"queued"))  # no deadline: the 0.5 s default budget
        assert await first == b"held"
        assert worked == []
        assert queued == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await call(b"after", deadline_s=10) == b"worked"
    assert admission.admitted == 0
