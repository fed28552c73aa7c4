"""``privrank serve --workers 2``: two processes on one port, as one server to its callers.

Every check opens fresh connections (a local subchannel pool per channel), so the kernel's
SO_REUSEPORT balancing spreads them over both workers; with 24 connections the chance that
all land on one worker is 2 x 2^-24.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from jobs.steps import JobContext
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.auth import mint_token
from server.config import Config
from tests.conftest import ROOT, cli_env, privrank
from tests.serving import (
    CLI,
    established_sockets,
    free_port,
    fresh_channels,
    start_serve,
    wait_serving,
)

CONNECTIONS = 24
USER = "u1"
_T = TypeVar("_T")


@dataclass
class Workers:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    env: dict[str, str]
    log: Path
    service: list[tuple[str, str]]
    admin: list[tuple[str, str]]

    def worker_pids(self) -> set[int]:
        """The serve process's children (its workers), from /proc."""
        children = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                        children.add(int(entry.name))
        return children

    def metric(self, name: str, **labels: str) -> float:
        """A sample summed over the workers, as the parent's /metrics shows it."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


async def on_every_connection(
    port: int, call: Callable[[aio.Channel], Awaitable[_T]], n: int = CONNECTIONS
) -> list[_T]:
    async with fresh_channels(port, n) as channels:
        return await asyncio.gather(*(call(channel) for channel in channels))


def sockets_of(pid: int, inodes: set[str]) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            count += target.startswith("socket:[") and target[8:-1] in inodes
    return count


@pytest.fixture(scope="module")
async def workers(
    config: Config, seeded: JobContext, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Workers]:
    # a copy of the seeded data dir, so publishing a snapshot here touches no other test
    data_dir = tmp_path_factory.mktemp("workers-data")
    for part in ("snapshots", "models"):
        shutil.copytree(config.data_dir / part, data_dir / part)
    port, metrics_port = free_port(), free_port()
    env = cli_env(config) | {
        "PRIVRANK_DATA_DIR": str(data_dir),
        "PRIVRANK_LISTEN": f"127.0.0.1:{port}",
        "PRIVRANK_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "PRIVRANK_SHUTDOWN_DELAY_S": "0.5",
        "PRIVRANK_SHUTDOWN_GRACE_S": "5",
    }
    log = data_dir / "serve.log"
    process = start_serve(env | {"PRIVRANK_WORKERS": "2"}, log)
    key = config.signing_keys()[0]

    def token(role: str) -> list[tuple[str, str]]:
        minted = mint_token(key, role=role, subject="t", ttl_s=600, issuer=config.token_issuer)
        return [("authorization", f"Bearer {minted}")]

    running = Workers(process, port, metrics_port, env, log, token("service"), token("admin"))
    try:
        await wait_serving(port, process, log)
        await wait_for(lambda: len(running.worker_pids()) == 2, "two workers")
        # each worker answers health on its own: SERVING once both have warmed up
        await wait_for_async(lambda: every_worker_serving(running), "both workers SERVING")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def wait_for_async(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def every_worker_serving(w: Workers) -> bool:
    async def recommend(channel: aio.Channel) -> bool:
        try:
            await rpc.RankingStub(channel).Recommend(
                pb.RecommendRequest(user_id=USER, limit=5), metadata=w.service, timeout=5
            )
        except aio.AioRpcError:
            return False
        return True

    return all(await on_every_connection(w.port, recommend))


async def recommend_all(w: Workers) -> list[pb.RankedItems]:
    async def one(channel: aio.Channel) -> pb.RankedItems:
        reply: pb.RankedItems = await rpc.RankingStub(channel).Recommend(
            pb.RecommendRequest(user_id=USER, limit=5), metadata=w.service, timeout=5
        )
        return reply

    return await on_every_connection(w.port, one)


async def connections_per_worker(w: Workers) -> dict[int, int]:
    """Open CONNECTIONS connections, one Recommend on each; count them per worker."""
    pids = w.worker_pids()
    async with fresh_channels(w.port, CONNECTIONS) as channels:
        replies = await asyncio.gather(
            *(
                rpc.RankingStub(channel).Recommend(
                    pb.RecommendRequest(user_id=USER, limit=5), metadata=w.service, timeout=5
                )
                for channel in channels
            )
        )
        assert all(len(reply.items) == 5 for reply in replies)
        inodes = established_sockets(w.port)
        return {pid: sockets_of(pid, inodes) for pid in pids}


async def test_connections_spread_over_both_workers(workers: Workers) -> None:
    per_worker = await connections_per_worker(workers)
    assert sum(per_worker.values()) >= CONNECTIONS
    assert all(count > 0 for count in per_worker.values()), per_worker


async def test_set_flags_reaches_every_worker(workers: Workers) -> None:
    async with fresh_channels(workers.port, 1) as (channel,):
        admin = rpc.AdminStub(channel)
        await admin.SetFlags(
            pb.SetFlagsRequest(personalization_enabled=False), metadata=workers.admin, timeout=5
        )
    try:

        async def all_blocked() -> bool:
            return all(r.source == pb.SOURCE_POPULAR for r in await recommend_all(workers))

        await wait_for_async(all_blocked, "every worker to serve non-personal rankings", 5)
    finally:
        async with fresh_channels(workers.port, 1) as (channel,):
            await rpc.AdminStub(channel).SetFlags(
                pb.SetFlagsRequest(personalization_enabled=True), metadata=workers.admin, timeout=5
            )

    async def all_personal() -> bool:
        return all(r.source != pb.SOURCE_POPULAR for r in await recommend_all(workers))

    await wait_for_async(all_personal, "every worker to personalize again", 5)


async def test_reload_reaches_every_worker(workers: Workers, config: Config) -> None:
    replies = await recommend_all(workers)
    before = {reply.model_version for reply in replies}
    assert len(before) == 1
    # new data since the served snapshot's, or the build keeps its version (same content)
    event = pb.Event(
        user_id="w-reload", item_id=replies[0].items[0].item_id, event_type=pb.PURCHASE
    )
    async with fresh_channels(workers.port, 1) as (channel,):
        await rpc.RankingStub(channel).RecordEvents(
            pb.RecordEventsRequest(events=[event]), metadata=workers.service, timeout=5
        )
    result = subprocess.run(
        [*CLI, "jobs", "build", "--scope", "default"],
        env=workers.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    async with fresh_channels(workers.port, 1) as (channel,):
        reloaded = await rpc.AdminStub(channel).Reload(
            pb.ReloadRequest(), metadata=workers.admin, timeout=30
        )
    fresh = reloaded.model_versions["default"]
    assert fresh not in before

    async def all_fresh() -> bool:
        return {reply.model_version for reply in await recommend_all(workers)} == {fresh}

    # the snapshot poll is an hour away (PRIVRANK_SNAPSHOT_POLL_S), so only the relay does it
    await wait_for_async(all_fresh, "every worker to serve the reloaded snapshot", 10)


async def test_metrics_sum_over_workers(workers: Workers) -> None:
    async def requests_via_rpc() -> int:
        async with fresh_channels(workers.port, 1) as (channel,):
            reply = await rpc.AdminStub(channel).GetMetrics(
                pb.GetMetricsRequest(), metadata=workers.admin, timeout=5
            )
        return int(reply.online.requests)

    scraped = workers.metric("privrank_requests_total", method="Recommend", code="OK")
    reported = await requests_via_rpc()
    replies = await recommend_all(workers)
    assert len(replies) == CONNECTIONS
    assert (
        workers.metric("privrank_requests_total", method="Recommend", code="OK")
        == scraped + CONNECTIONS
    )
    assert await requests_via_rpc() == reported + CONNECTIONS


async def test_a_dead_worker_is_replaced(workers: Workers) -> None:
    before = workers.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await wait_for(
        lambda: victim not in workers.worker_pids() and len(workers.worker_pids()) == 2,
        "a replacement worker",
    )
    (replacement,) = workers.worker_pids() - before

    async def replacement_answers() -> bool:
        return (await connections_per_worker(workers)).get(replacement, 0) > 0

    await wait_for_async(replacement_answers, "the replacement to answer", 60)
    assert "died" in workers.log.read_text()


async def test_set_flags_reaches_a_worker_that_is_starting(workers: Workers, pg_url: str) -> None:
    """The switch turned off while a replacement worker warms up (its App is open, it is not
    ready, so no relay would reach it): once it answers, it personalizes nobody either. Its
    first read of the opt-outs is held on a table lock, so the call lands in that window."""
    before = workers.worker_pids()
    holder, watcher = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        async with holder.transaction(), fresh_channels(workers.port, 1) as (channel,):
            killed = await holder.fetchval("SELECT now()")
            await holder.execute("LOCK TABLE user_settings IN ACCESS EXCLUSIVE MODE")
            os.kill(min(before), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_start > $1 AND wait_event_type = 'Lock'",
                killed,
            ):
                assert time.monotonic() < deadline, "the replacement never read the opt-outs"
                await asyncio.sleep(0.01)
            await rpc.AdminStub(channel).SetFlags(
                pb.SetFlagsRequest(personalization_enabled=False), metadata=workers.admin, timeout=5
            )
    finally:
        await holder.close()
        await watcher.close()
    (replacement,) = workers.worker_pids() - before
    try:

        async def replacement_answers() -> bool:
            return (await connections_per_worker(workers)).get(replacement, 0) > 0

        await wait_for_async(replacement_answers, "the replacement to answer", 60)
        # the survivor (which took the call) and the replacement alike
        replies = await recommend_all(workers)
        assert [r.source for r in replies] == [pb.SOURCE_POPULAR] * len(replies)
    finally:
        async with fresh_channels(workers.port, 1) as (channel,):
            await rpc.AdminStub(channel).SetFlags(
                pb.SetFlagsRequest(personalization_enabled=True), metadata=workers.admin, timeout=5
            )


async def test_sigterm_stops_every_worker(workers: Workers) -> None:
    pids = workers.worker_pids()
    assert len(pids) == 2
    workers.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(workers.process.wait, 30) == 0
    assert not await asyncio.to_thread(lambda: [p for p in pids if Path(f"/proc/{p}").exists()])


def test_workers_setting_is_validated(config: Config) -> None:
    result = privrank(config, "serve", "--workers", "0", check=False)
    assert result.returncode != 0
    assert "WORKERS" in result.stderr


# -- the supervisor alone, with stand-in workers (no stores) ----------------------------------

_SUPERVISED = """
import logging, os, signal, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from server.config import Config
from server.workers import Supervisor
class StandIn(Supervisor):
    def _work(self, index, ready_fd):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        from prometheus_client import Gauge
        Gauge("standin_up", "1 per live worker", multiprocess_mode="livesum").set(1)
        os.write(ready_fd, b"R")
        os.close(ready_fd)
        while True:
            time.sleep(1)
config = Config(shutdown_delay_s=0.5, shutdown_grace_s=1.0)
sys.exit(StandIn(config, "", "", 2, os.environ["PROMETHEUS_MULTIPROC_DIR"]).run())
"""


@contextlib.contextmanager
def _supervised(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """A Supervisor of two stand-in workers, in a process of its own: (it, metrics dir, log)."""
    metrics_dir, log = tmp_path / "metrics", tmp_path / "supervisor.log"
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVRANK_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISED], env=env, stdout=out, stderr=out, cwd=ROOT
        )
    try:
        yield process, metrics_dir, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


def _until(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_while_a_dead_worker_waits_for_its_restart_starts_no_worker(
    tmp_path: Path,
) -> None:
    """The restart after a worker's death waits a moment; a SIGTERM in it stops the others,
    and no new worker starts then (it would miss the SIGTERM and be killed at the end)."""
    with _supervised(tmp_path) as (process, _, log):
        _until(lambda: log.read_text().count(" up") == 2, "both workers up")
        os.kill(min(_children(process.pid)), signal.SIGKILL)
        _until(lambda: "restarting it" in log.read_text(), "the death noticed")
        process.send_signal(signal.SIGTERM)  # inside the restart's backoff
        assert process.wait(30) == 0
        assert "started" not in log.read_text().split("stopping", 1)[1], log.read_text()


def test_a_dead_workers_live_gauges_leave_the_sums(tmp_path: Path) -> None:
    """Connections and pool sizes are summed over live workers: a dead one's leave the sum
    when it is reaped (prometheus_client keeps them otherwise)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    def summed(metrics_dir: Path) -> float:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        return registry.get_sample_value("standin_up") or 0.0

    with _supervised(tmp_path) as (process, metrics_dir, log):
        _until(lambda: log.read_text().count(" up") == 2, "both workers up")
        assert summed(metrics_dir) == 2
        os.kill(min(_children(process.pid)), signal.SIGKILL)
        _until(lambda: log.read_text().count(" up") == 3, "the replacement up")
        assert summed(metrics_dir) == 2
