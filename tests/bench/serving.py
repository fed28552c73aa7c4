"""Serving at catalog scale: precompute, start-up, and Recommend over gRPC against an echo server.

Run from the repository root (the data is made once and reused from --data-dir):

    .venv/bin/python tests/bench/serving.py                         # 1M items, 100k users
    .venv/bin/python tests/bench/serving.py --items 100000 --users 20000 --events 400000 \\
        --data-dir /tmp/privrank-bench-small --seconds 5 --rounds 2  # quick
    .venv/bin/python tests/bench/serving.py --workers 2             # both cores serve

Data: ``privrank synth`` and ``privrank jobs nightly`` into ``--data-dir`` on its own embedded
PostgreSQL and Redis (started by this script under the data dir, stopped at the end), unless
the data dir already holds a published snapshot. Every item ID is imported with
``privrank import items`` (synthetic events touch about half of a million-item catalog; the
others are cold items, as in a real catalog), so the snapshot has ``--items`` items. Embedded
Redis keeps nothing on disk, so the cached rankings are re-made by the precompute section every run.

Sections (``--only`` picks some; all by default, in this order):

- precompute: the precompute job step, in this process, timed end to end (retrieval, Redis
  writes, the PostgreSQL ranks table) and its retrieval alone; users per second.
- startup: ``privrank serve`` started ``--starts`` times on the running stores: seconds from
  spawn to health SERVING, and its resident memory then (RSS, of which file-backed, and PSS,
  which shares mapped pages among the processes mapping them) against the bytes of the
  snapshot files it serves. Beside it the echo server's time to SERVING (Python and gRPC alone).
- recommend: closed loop, ``--concurrency`` callers over ``--channels`` connections, Recommend
  (limit 10, deadline 1 s) for random known users, against (a) a trivial grpc.aio server that
  answers every Recommend with a fixed answer of the same size (the echo server), (b) privrank
  with every user's ranking cached, (c) privrank with an empty cache (a Redis database with no
  keys), so every call is ranked live through the ANN index. Measured by the same client in
  rounds that alternate a, b, c; each figure is the median over rounds. With one worker the
  servers run on core 0 and the client on core 1, so the client does not take the server's core.

Every figure printed is measured in this run; targets (issue 6) are constants below. A target
missed prints MISS with the margin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, environment, verdict

# -- targets and fixed choices (no measured figure lives here) --------------------------------
PRECOMPUTE_USERS_PER_S = 5_000
SERVING_WITHIN_S = 5.0
RSS_PER_SNAPSHOT_BYTE = 1.5
MISS_THROUGHPUT_VS_ECHO = 0.65
HIT_THROUGHPUT_VS_ECHO = 0.85
P99_VS_ECHO = 2.0
LIMIT = 10
DEADLINE_S = 1.0
SCOPE = "default"
CLI = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]
SECRET = "bench-secret-" + "s" * 32


def say(*parts: object) -> None:
    print(*parts, flush=True)


def header(title: str) -> None:
    say(f"\n== {title} " + "=" * max(0, 70 - len(title)))


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pin_to(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


@dataclass
class Stores:
    data_dir: Path
    database_url: str
    redis_url: str
    precomputed: bool = False  # this run has filled the cache

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVRANK_")}
        env.update(
            PRIVRANK_DATA_DIR=str(self.data_dir),
            PRIVRANK_DATABASE_URL=self.database_url,
            PRIVRANK_REDIS_URL=self.redis_url,
            PRIVRANK_AUTH_SECRET=SECRET,
            PRIVRANK_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def cli(self, *args: str) -> None:
        say("  $ privrank " + " ".join(args))
        subprocess.run([*CLI, *args], env=self.env(), cwd=REPO, check=True)


@contextlib.contextmanager
def stores(data_dir: Path) -> Iterator[Stores]:
    from server import embedded

    data_dir.mkdir(parents=True, exist_ok=True)
    with embedded.services(data_dir, None, None) as urls:
        yield Stores(data_dir, urls.database_url, urls.redis_url)


def prepare(st: Stores, args: argparse.Namespace) -> None:
    from ranking import snapshot

    header("data")
    try:
        snap = snapshot.load_current(st.data_dir / "snapshots", SCOPE)
        say(f"  reusing {snap.path} ({snap.n_items:,} items, {snap.n_users:,} users)")
        return
    except Exception as exc:  # any unreadable state means: make it
        say(f"  no usable snapshot ({exc}); making the data")
    started = time.perf_counter()
    st.cli("db", "migrate")
    st.cli(
        *("synth", "--users", str(args.users), "--items", str(args.items)),
        *("--events", str(args.events), "--scope", SCOPE),
    )
    # a real catalog holds items nobody has touched yet: import every ID (with one of 20
    # categories), so the snapshot has --items items, the ones without events cold
    items_file = st.data_dir / "items.csv"
    rng = random.Random(1)
    with items_file.open("w") as out:
        out.write("item_id,category\n")
        out.writelines(f"i{n},c{rng.randrange(20)}\n" for n in range(args.items))
    st.cli("import", "items", str(items_file), "--scope", SCOPE)
    st.cli("jobs", "nightly", "--scope", SCOPE)
    say(f"  data made in {time.perf_counter() - started:.0f} s")


@dataclass
class Server:
    name: str
    port: int
    processes: list[subprocess.Popen[bytes]]
    log: Path

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def pids(self) -> list[int]:
        """The server's processes and their children (the workers under --workers)."""
        roots = {p.pid for p in self.processes}
        found = set(roots)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) in roots:
                        found.add(int(entry.name))
        return sorted(found)


def start_privrank(
    st: Stores, name: str, workers: int, cores: set[int] | None, **env: str
) -> Server:
    port, metrics = free_port(), free_port()
    log = st.data_dir / f"bench-{name}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CLI, "serve", "--workers", str(workers)],
            env=st.env(
                PRIVRANK_LISTEN=f"127.0.0.1:{port}",
                PRIVRANK_METRICS_LISTEN=f"127.0.0.1:{metrics}",
                PRIVRANK_SNAPSHOT_POLL_S="3600",
                PRIVRANK_SHUTDOWN_DELAY_S="0.2",
                **env,
            ),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            preexec_fn=lambda: pin_to(cores),
        )
    return Server(name, port, [process], log)


def start_echo(st: Stores, workers: int, cores: set[int] | None) -> Server:
    port = free_port()
    log = st.data_dir / "bench-echo.log"
    processes = []
    with log.open("w") as sink:
        for _ in range(workers):
            processes.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--echo", str(port), "--echo-workers", str(workers)],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                    preexec_fn=lambda: pin_to(cores),
                )
            )
    return Server("echo", port, processes, log)


async def wait_serving(server: Server, limit_s: float = 600.0) -> float:
    """Seconds until health says SERVING, polled every 10 ms from now."""
    from grpc import aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.perf_counter()
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if any(p.poll() is not None for p in server.processes):
                raise RuntimeError(f"{server.name} exited; see {server.log}")
            with contextlib.suppress(aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            if time.perf_counter() - started > limit_s:
                raise RuntimeError(f"{server.name} not SERVING after {limit_s:.0f} s")
            await asyncio.sleep(0.01)


# -- the echo server ----------------------------------------------------------------------------


def run_echo(port: int, workers: int) -> None:
    """A trivial grpc.aio server: every Recommend gets the same answer, as big as privrank's."""
    from grpc import aio
    from grpc_health.v1 import health, health_pb2_grpc

    from server.api import privrank_pb2 as pb
    from server.api import privrank_pb2_grpc as rpc

    answer = pb.RankedItems(
        items=[pb.ScoredItem(item_id=f"i{123456 + n}", score=0.5 / (n + 1)) for n in range(LIMIT)],
        model_version="20261123T120000.000000Z-0123456789",
        source=pb.SOURCE_CACHED,
        variant="control",
    )

    class Echo(rpc.RankingServicer):
        async def Recommend(self, request: pb.RecommendRequest, context: object) -> pb.RankedItems:
            return answer

    async def main() -> None:
        server = aio.server(options=[("grpc.so_reuseport", 1 if workers > 1 else 0)])
        rpc.add_RankingServicer_to_server(Echo(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    client_cpu: float = 0.0  # CPU seconds of this process / wall seconds

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


async def closed_loop(
    server: Server, users: list[str], args: argparse.Namespace, seconds: float, warmup_s: float
) -> Phase:
    from grpc import aio

    from server.api import privrank_pb2 as pb
    from server.api import privrank_pb2_grpc as rpc
    from server.auth import mint_token

    token = mint_token(SECRET, role="service", subject="bench", ttl_s=3600, issuer="privrank")
    metadata = [("authorization", f"Bearer {token}")]
    channels = [
        aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(args.channels)
    ]
    stubs = [rpc.RankingStub(channel) for channel in channels]
    phase = Phase(server.name, seconds)
    names = {v.number: v.name.removeprefix("SOURCE_") for v in pb.Source.DESCRIPTOR.values}
    begin = time.perf_counter()
    measure_from, measure_to = begin + warmup_s, begin + warmup_s + seconds

    async def caller(n: int) -> None:
        stub, rng = stubs[n % len(stubs)], random.Random(n)
        while (now := time.perf_counter()) < measure_to:
            request = pb.RecommendRequest(user_id=rng.choice(users), limit=LIMIT)
            try:
                reply = await stub.Recommend(request, metadata=metadata, timeout=DEADLINE_S)
            except aio.AioRpcError as exc:
                if now >= measure_from:
                    phase.errors[exc.code().name] += 1
                continue
            done = time.perf_counter()
            if measure_from <= now and done <= measure_to:
                phase.latencies_ms.append((done - now) * 1e3)
                phase.sources[names.get(reply.source, str(reply.source))] += 1

    cpu_before = time.process_time()
    await asyncio.gather(*(caller(n) for n in range(args.concurrency)))
    phase.client_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - begin)
    for channel in channels:
        await channel.close()
    return phase


# -- memory -------------------------------------------------------------------------------------


def memory_of(pids: list[int]) -> tuple[int, int, int]:
    """(RSS, file-backed RSS, PSS) in bytes, summed over ``pids``."""
    rss = rss_file = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    rss_file += int(line.split()[1]) * 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
    return rss, rss_file, pss


def snapshot_bytes(data_dir: Path) -> int:
    from ranking import snapshot

    root = data_dir / "snapshots"
    total = 0
    for scope in snapshot.published_scopes(root):
        version = snapshot.current_version(root, scope)
        if version is not None:
            total += sum(f.stat().st_size for f in (root / scope / version).iterdir())
    return total


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


# -- sections -----------------------------------------------------------------------------------


async def bench_precompute(st: Stores, args: argparse.Namespace) -> None:
    import numpy as np

    from features.cache import RankCache
    from features.postgres import PgStore
    from jobs.steps import BATCH_USERS, JobContext, precompute, top_k_for_users
    from ranking import snapshot
    from ranking.retrieval import retriever_for
    from ranking.scoring import scoring_for
    from server.config import Config

    header("precompute: top-100 for every active user into Redis (and the ranks table)")
    config = Config.from_env(st.env())
    snap = snapshot.load_current(config.snapshot_dir, SCOPE)
    retriever = retriever_for(snap)
    scoring = scoring_for(snap, config.profile(SCOPE), retriever=retriever)
    say(f"  snapshot {snap.version}: {snap.n_items:,} items x {snap.dim}, {snap.n_users:,} users")
    say(f"  retrieval: {retriever.name}; {BATCH_USERS} users per batch")
    sample = np.arange(min(snap.n_users, args.retrieval_sample), dtype=np.int64)
    started = time.perf_counter()
    for start in range(0, len(sample), BATCH_USERS):
        top_k_for_users(snap, sample[start : start + BATCH_USERS], 100, scoring)
    retrieval_rate = len(sample) / (time.perf_counter() - started)
    pg = await PgStore.connect(st.database_url, timeout_s=60)
    cache = RankCache.from_url(
        st.redis_url, timeout_s=60, ttl_s=config.cache_ttl_s, key_prefix=config.redis_key_prefix
    )
    try:
        started = time.perf_counter()
        summary = await precompute(JobContext(config, pg, cache), SCOPE)
        elapsed = time.perf_counter() - started
    finally:
        await cache.close()
        await pg.close()
    st.precomputed = True
    written = int(summary.split()[0])
    rate = written / elapsed
    say(f"  job step: {summary}")
    say(f"  {'what':<44} {'users/s':>10}")
    say(f"  {'retrieval alone (' + f'{len(sample):,} users)':<44} {retrieval_rate:>10,.0f}")
    say(f"  {'the step: retrieval + Redis + ranks table':<44} {rate:>10,.0f}")
    say(
        f"  precompute >= {PRECOMPUTE_USERS_PER_S:,} users/s: "
        + verdict(
            rate >= PRECOMPUTE_USERS_PER_S,
            f"{rate:,.0f} users/s, {rate / PRECOMPUTE_USERS_PER_S:.2f}x the target; "
            f"{written:,} users in {elapsed:.1f} s",
        )
    )


async def bench_startup(st: Stores, args: argparse.Namespace) -> None:
    header(f"start-up: spawn to SERVING, memory at SERVING ({args.workers} worker(s))")
    snap_bytes = snapshot_bytes(st.data_dir)
    say(f"  snapshot files: {mb(snap_bytes)}")
    times, echo_times, memory = [], [], []
    for _ in range(args.starts):
        server = start_privrank(st, "startup", args.workers, None)
        try:
            times.append(await wait_serving(server))
            await asyncio.sleep(0.5)
            memory.append(memory_of(server.pids()))
        finally:
            server.stop()
        echo = start_echo(st, 1, None)
        try:
            echo_times.append(await wait_serving(echo))
        finally:
            echo.stop()
    serving_s, echo_s = statistics.median(times), statistics.median(echo_times)
    rss, rss_file, pss = (statistics.median(m[i] for m in memory) for i in range(3))
    say(f"  {'':<28} {'median':>9} {'all runs':>30}")
    for label, median, runs in (
        ("privrank to SERVING", serving_s, times),
        ("echo server to SERVING", echo_s, echo_times),
    ):
        say(f"  {label:<28} {median:>8.2f}s {', '.join(f'{t:.2f}' for t in runs):>30}")
    say(f"  RSS {mb(rss)} (file-backed {mb(rss_file)}), PSS {mb(pss)}, snapshot {mb(snap_bytes)}")
    say(
        f"  SERVING within {SERVING_WITHIN_S:.0f} s: "
        + verdict(
            serving_s <= SERVING_WITHIN_S,
            f"{serving_s:.2f} s; {serving_s / echo_s:.1f}x the echo server's",
        )
    )
    measure = rss if args.workers == 1 else pss
    label = "RSS" if args.workers == 1 else "PSS (summed over workers)"
    say(
        f"  {label} <= {RSS_PER_SNAPSHOT_BYTE}x snapshot bytes: "
        + verdict(
            measure <= RSS_PER_SNAPSHOT_BYTE * snap_bytes,
            f"{measure / snap_bytes:.2f}x ({mb(measure)} for {mb(snap_bytes)})",
        )
    )


async def bench_recommend(st: Stores, args: argparse.Namespace) -> None:
    from ranking import snapshot

    pinned = args.workers == 1 and (os.cpu_count() or 1) >= 2 and not args.no_pin
    server_cores, client_cores = ({0}, {1}) if pinned else (None, None)
    header(
        f"Recommend over loopback gRPC: concurrency {args.concurrency}, {args.channels} "
        f"connections, {args.workers} worker(s)"
        + (", servers on core 0, client on core 1" if pinned else ", no pinning")
    )
    snap = snapshot.load_current(st.data_dir / "snapshots", SCOPE)
    if not st.precomputed:
        await bench_precompute(st, args)
    # the users whose rankings precompute cached (and wrote to the ranks table)
    import asyncpg

    conn = await asyncpg.connect(st.database_url)
    try:
        rows = await conn.fetch(
            "SELECT user_id FROM ranks WHERE scope = $1 AND model_version = $2",
            SCOPE,
            snap.version,
        )
    finally:
        await conn.close()
    rng = random.Random(1)
    cached = [r["user_id"] for r in rows]
    users = [cached[rng.randrange(len(cached))] for _ in range(20_000)]
    say(f"  users: 20,000 draws from the {len(cached):,} with a cached ranking")
    miss_url = st.redis_url.replace("db=0", "db=1")
    # privrank refills an empty Redis from the ranks table (App.refill_cache): db 1 (this
    # bench's own Redis) emptied of an earlier run's, and the refill claim held there first,
    # or the cache-miss server answers from the cache it refilled
    import redis

    from features.cache import RankCache
    from server.config import Config

    with redis.Redis.from_url(miss_url) as emptied:
        emptied.flushdb()
    config = Config.from_env(st.env())
    miss_cache = RankCache.from_url(
        miss_url, timeout_s=10, ttl_s=config.cache_ttl_s, key_prefix=config.redis_key_prefix
    )
    try:
        await miss_cache.claim_refill(SCOPE, snap.version, 24 * 3600)
    finally:
        await miss_cache.close()
    servers = [
        start_echo(st, args.workers, server_cores),
        start_privrank(st, "cache-hit", args.workers, server_cores),
        start_privrank(st, "cache-miss", args.workers, server_cores, PRIVRANK_REDIS_URL=miss_url),
    ]
    pin_to(client_cores)
    try:
        for server in servers:
            await wait_serving(server)
        phases: dict[str, list[Phase]] = {s.name: [] for s in servers}
        for round_ in range(args.rounds):
            for server in servers:
                phase = await closed_loop(server, users, args, args.seconds, args.warmup)
                phases[server.name].append(phase)
                say(
                    f"  round {round_ + 1} {server.name:<10} {phase.throughput:>8,.0f}/s "
                    f"p50 {phase.percentile(0.5):6.2f} ms p99 {phase.percentile(0.99):6.2f} ms "
                    f"errors {sum(phase.errors.values())} client CPU {phase.client_cpu:.0%} "
                    f"{dict(phase.sources)}"
                )
    finally:
        for server in servers:
            server.stop()
        pin_to(set(range(os.cpu_count() or 1)))

    def med(name: str, value: str) -> float:
        figures = [
            getattr(p, value) if value == "throughput" else p.percentile(float(value))
            for p in phases[name]
        ]
        return statistics.median(figures)

    echo_t, echo_p99 = med("echo", "throughput"), med("echo", "0.99")
    columns = ("answers/s", "vs echo", "p50 ms", "p99 ms", "p99 vs echo", "errors")
    say(f"\n  {'server':<12} " + " ".join(f"{c:>11}" for c in columns))
    for name in phases:
        t, p50, p99 = med(name, "throughput"), med(name, "0.5"), med(name, "0.99")
        errors = sum(sum(p.errors.values()) for p in phases[name])
        cells = (f"{t:,.0f}", f"{t / echo_t:.2f}x", f"{p50:.2f}", f"{p99:.2f}")
        cells += (f"{p99 / echo_p99:.2f}x", str(errors))
        say(f"  {name:<12} " + " ".join(f"{c:>11}" for c in cells))
    client = max(p.client_cpu for ps in phases.values() for p in ps)
    if client > 0.9:
        say(f"  note: the client used up to {client:.0%} of its core: echo may be client-bound")
    for name, target in (
        ("cache-miss", MISS_THROUGHPUT_VS_ECHO),
        ("cache-hit", HIT_THROUGHPUT_VS_ECHO),
    ):
        ratio = med(name, "throughput") / echo_t
        sources = sum((p.sources for p in phases[name]), Counter())
        wrong = sources["CACHED"] if name == "cache-miss" else 0  # a miss must be ranked live
        say(
            f"  {name} throughput >= {target}x echo: "
            + verdict(ratio >= target and not wrong, f"{ratio:.2f}x; {dict(sources)}")
        )
    for name in ("cache-hit", "cache-miss"):
        ratio = med(name, "0.99") / echo_p99
        errors = sum(sum(p.errors.values()) for p in phases[name])
        say(
            f"  {name} p99 <= {P99_VS_ECHO}x echo p99: "
            + verdict(
                ratio <= P99_VS_ECHO and not errors, f"{ratio:.2f}x (OK calls); {errors} failed"
            )
        )


async def main(args: argparse.Namespace) -> None:
    say("serving benchmark; " + "; ".join(environment()))
    with stores(args.data_dir) as st:
        prepare(st, args)
        sections = {
            "precompute": bench_precompute,
            "startup": bench_startup,
            "recommend": bench_recommend,
        }
        for name in args.only or list(sections):
            await sections[name](st, args)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/privrank-bench-1m"))
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--only", action="append", choices=["precompute", "startup", "recommend"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, before each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--retrieval-sample", type=int, default=20_000)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-workers", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.echo is not None:
        run_echo(arguments.echo, arguments.echo_workers)
    else:
        asyncio.run(main(arguments))
