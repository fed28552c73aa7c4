"""Running privrank for tests and benchmarks: in-process on a free port, or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.app import App, create_server
from server.auth import mint_token
from server.config import Config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``privrank serve`` with ``env``, its log (stderr) written to ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [*CLI, "serve"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink
        )


@contextlib.contextmanager
def serve_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``start_serve``, killed on the way out if it still runs."""
    process = start_serve(env, log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def terminate(process: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, then the exit code."""
    process.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(process.wait, timeout_s)


async def wait_serving(
    port: int,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 120,
    service: str = "",
) -> None:
    """Until health says SERVING for ``service`` (default: the server as a whole, which
    needs a snapshot); AssertionError naming the log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, f"privrank serve exited; see {log}"
            with contextlib.suppress(aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, f"privrank serve never became SERVING; see {log}"
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class Running:
    """An in-process server: its app, its address, a channel to it, and service / admin
    credentials."""

    app: App
    server: aio.Server
    target: str
    channel: aio.Channel
    service: list[tuple[str, str]]
    admin: list[tuple[str, str]]

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    async def recommend_status(self, channel: aio.Channel) -> grpc.StatusCode:
        """The status of one Recommend (user u1, 5 items) over ``channel``, as the service."""
        try:
            await rpc.RankingStub(channel).Recommend(
                pb.RecommendRequest(user_id="u1", limit=5), metadata=self.service, timeout=5
            )
        except aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def serving(config: Config, pg_url: str, redis_url: str) -> AsyncIterator[Running]:
    """A warmed-up server on a free port, stopped and closed on exit."""
    app = await App.open(config, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await server.start()
    await app.warm()

    def credentials(role: str) -> list[tuple[str, str]]:
        token = mint_token(
            config.signing_keys()[0],
            role=role,
            subject="test",
            ttl_s=600,
            issuer=config.token_issuer,
        )
        return [("authorization", f"Bearer {token}")]

    try:
        target = f"127.0.0.1:{port}"
        async with aio.insecure_channel(target) as channel:
            yield Running(
                app, server, target, channel, credentials("service"), credentials("admin")
            )
    finally:
        await server.stop(0)
        await app.close()


@contextlib.asynccontextmanager
async def fresh_channels(port: int, n: int) -> AsyncIterator[list[aio.Channel]]:
    """``n`` channels, each on its own TCP connection."""
    channels = [
        aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()


def established_sockets(port: int) -> set[str]:
    """Inodes of the server side of established TCP connections to ``port`` on loopback."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":  # TCP_ESTABLISHED
                    inodes.add(fields[9])
    return inodes
