"""Many connections: the server's memory at the connection cap and past it.

Run from the repository root:

    .venv/bin/python tests/bench/connections.py                 # cap 1,000, 3 waves past it
    .venv/bin/python tests/bench/connections.py --cap 300 --waves 2   # quick

It starts embedded PostgreSQL and Redis under a temporary data dir and ``privrank serve`` on
them with ``PRIVRANK_MAX_CONNECTIONS=--cap`` (loopback only; everything stops at the end).
Each connection is a channel of its own (a local subchannel pool) that makes one
``Health.Check`` and stays open. Phases, with the server's resident memory (VmRSS) after each:

- at rest: one connection;
- at the cap: ``--cap`` connections open (one of them the first);
- past the cap, ``--waves`` times: ``--cap`` more connections tried, each refused, then closed.

Targets: every connection up to the cap answered and every one past it refused, and memory
flat past the cap: each wave adds less than ``FLAT_SHARE`` of what the connections up to the
cap took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import environment, verdict
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

FLAT_SHARE = 0.05  # a wave of refused connections may add at most this share of the cap's cost
BATCH = 100  # connections opened at once


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def server(cap: int, data_dir: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    from server import embedded
    from tests.serving import free_port, start_serve

    with embedded.services(data_dir, None, None) as urls:
        port = free_port()
        env = os.environ | {
            "PRIVRANK_DATA_DIR": str(data_dir),
            "PRIVRANK_DATABASE_URL": urls.database_url,
            "PRIVRANK_REDIS_URL": urls.redis_url,
            "PRIVRANK_LISTEN": f"127.0.0.1:{port}",
            "PRIVRANK_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
            "PRIVRANK_MAX_CONNECTIONS": str(cap),
            "PRIVRANK_SHUTDOWN_DELAY_S": "0",
        }
        process = start_serve(env, data_dir / "serve.log")
        try:
            yield port, process
        finally:
            process.terminate()
            process.wait(60)


async def check(channel: aio.Channel) -> bool:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except aio.AioRpcError:
        return False
    return True


async def open_connections(port: int, n: int) -> tuple[list[aio.Channel], int]:
    """``n`` channels of their own, each after one Health.Check; (channels, checks answered)."""
    channels, answered = [], 0
    for start in range(0, n, BATCH):
        batch = [
            aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(min(BATCH, n - start))
        ]
        answered += sum(await asyncio.gather(*(check(c) for c in batch)))
        channels += batch
    return channels, answered


async def measure(args: argparse.Namespace, port: int, pid: int, first: aio.Channel) -> bool:
    mb = 1024 * 1024
    await asyncio.sleep(1)
    at_rest = rss_bytes(pid)
    print(f"at rest (1 connection): RSS {at_rest / mb:.1f} MB")
    held, answered = await open_connections(port, args.cap - 1)
    await asyncio.sleep(1)
    at_cap = rss_bytes(pid)
    cost = at_cap - at_rest
    per = cost / max(args.cap - 1, 1)
    print(
        f"at the cap ({args.cap} connections): {answered + 1}/{args.cap} answered, RSS "
        f"{at_cap / mb:.1f} MB, +{cost / mb:.1f} MB, {per / 1024:.1f} KB a connection"
    )
    all_in = answered == args.cap - 1
    ok = True
    for wave in range(1, args.waves + 1):
        extra, let_in = await open_connections(port, args.cap)
        await asyncio.sleep(1)
        after = rss_bytes(pid)
        for channel in extra:
            await channel.close()
        added = after - at_cap
        flat = added <= FLAT_SHARE * cost
        ok &= flat and let_in == 0
        print(
            f"past the cap, wave {wave}: {args.cap} more tried, {let_in} let in; RSS "
            f"{after / mb:.1f} MB ({added / mb:+.1f} MB against the cap): "
            + verdict(flat and let_in == 0, f"<= {FLAT_SHARE:.0%} of the cap's "
                      f"+{cost / mb:.1f} MB is {FLAT_SHARE * cost / mb:.1f} MB")
        )  # fmt: skip
    for channel in held:
        await channel.close()
    await asyncio.sleep(2)
    print(f"all but the first closed: RSS {rss_bytes(pid) / mb:.1f} MB")
    print("up to the cap: " + verdict(all_in, f"{answered + 1} of {args.cap} connections answered"))
    await first.close()
    return ok and all_in


async def run(args: argparse.Namespace) -> bool:
    with (
        tempfile.TemporaryDirectory(prefix="privrank-conn-") as tmp,
        server(args.cap, Path(tmp)) as (port, process),
    ):
        from tests.serving import wait_serving

        # no snapshot here, so only Settings and Admin become SERVING: enough to connect to
        await wait_serving(port, process, Path(tmp) / "serve.log", service="privrank.v1.Admin")
        first = aio.insecure_channel(f"127.0.0.1:{port}")
        assert await check(first), "the first connection was not answered"
        return await measure(args, port, process.pid, first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=1000, help="PRIVRANK_MAX_CONNECTIONS")
    parser.add_argument("--waves", type=int, default=3, help="waves of connections past the cap")
    args = parser.parse_args()
    for line in environment():
        print(line)
    started = time.monotonic()
    ok = asyncio.run(run(args))
    print(f"{time.monotonic() - started:.0f} s in all: {'every target HIT' if ok else 'a MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
