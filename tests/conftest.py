"""Shared fixtures: real PostgreSQL and Redis, a migrated database, a seeded scope.

With ``PRIVRANK_TEST_DATABASE_URL`` / ``PRIVRANK_TEST_REDIS_URL`` set (CI sets both) the tests
use those servers; otherwise they start the embedded ones. Either way the session creates its
own database, uses its own Redis key prefix space in the given db, and removes both at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.cache import RankCache
from features.postgres import SERVICE_ROLE, PgStore
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking.profiles import load_profiles
from server import embedded
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.app import App, create_server
from server.auth import mint_token
from server.config import Config

ROOT = Path(__file__).resolve().parent.parent
SEED_USERS, SEED_ITEMS, SEED_EVENTS = 200, 120, 5000


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def stores_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="session")
def server_pg_url(stores_dir: Path) -> Iterator[str]:
    """A PostgreSQL server: the configured test one, or an embedded one for this session."""
    url = os.environ.get("PRIVRANK_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded.embedded_postgres(stores_dir) as started:
        yield started


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on ``server_url``'s server; dropped on exit, with the service role
    if the migrations created it (it is cluster-wide)."""
    name = f"privrank_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        role_existed = await admin.fetchval(
            "SELECT count(*) > 0 FROM pg_roles WHERE rolname = $1", SERVICE_ROLE
        )
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if not role_existed:
                with contextlib.suppress(asyncpg.DependentObjectsStillExistError):
                    await admin.execute(f"DROP ROLE IF EXISTS {SERVICE_ROLE}")
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def pg_url(server_pg_url: str) -> AsyncIterator[str]:
    """A fresh database of this test session, dropped at the end."""
    async with fresh_database(server_pg_url) as url:
        yield url


@pytest.fixture(scope="session")
def redis_key_prefix() -> str:
    """This session's own key prefix, so test runs sharing a Redis database stay apart."""
    return f"privrank-test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_url(stores_dir: Path, redis_key_prefix: str) -> Iterator[str]:
    """A Redis database; every key of this session in it is removed at the end."""
    url = os.environ.get("PRIVRANK_TEST_REDIS_URL")
    with contextlib.ExitStack() as stack:
        if not url:
            url = stack.enter_context(embedded.embedded_redis(stores_dir))
        yield url
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{redis_key_prefix}*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def config(data_dir: Path, pg_url: str, redis_url: str, redis_key_prefix: str) -> Config:
    return Config.from_env(
        {
            "PRIVRANK_DATA_DIR": str(data_dir),
            "PRIVRANK_DATABASE_URL": pg_url,
            "PRIVRANK_REDIS_URL": redis_url,
            "PRIVRANK_REDIS_KEY_PREFIX": redis_key_prefix,
            "PRIVRANK_LISTEN": "127.0.0.1:0",
            "PRIVRANK_METRICS_LISTEN": "127.0.0.1:0",
            "PRIVRANK_AUTH_SECRET": "test-secret-" + "x" * 32,
            "PRIVRANK_DEFAULT_DEADLINE_S": "5",
            "PRIVRANK_SNAPSHOT_POLL_S": "3600",
        }
    )


@pytest.fixture(scope="session")
async def owner_pg(pg_url: str) -> AsyncIterator[PgStore]:
    """The database's owner (migrations; bypasses nothing the tests rely on)."""
    store = await PgStore.connect(pg_url, timeout_s=10, role=None, max_size=2)
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture(scope="session")
async def pg(owner_pg: PgStore, pg_url: str) -> AsyncIterator[PgStore]:
    """The store as privrank uses it: acting as the non-owner service role."""
    store = await PgStore.connect(pg_url, timeout_s=10)
    yield store
    await store.close()


@pytest.fixture(scope="session")
async def cache(redis_url: str, redis_key_prefix: str) -> AsyncIterator[RankCache]:
    store = RankCache.from_url(redis_url, timeout_s=5, ttl_s=3600, key_prefix=redis_key_prefix)
    yield store
    await store.close()


def cli_env(config: Config) -> dict[str, str]:
    """Environment for running the ``privrank`` CLI against the test stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVRANK_")}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None and not isinstance(value, Mapping):  # profiles come from the file
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[f"PRIVRANK_{field.name.upper()}"] = text
    env["PYTHONUNBUFFERED"] = "1"
    return env


def privrank(
    config: Config, *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the ``privrank`` CLI (this interpreter's) against the test stores."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())", *args],
        env=cli_env(config),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"privrank {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def with_profiles(config: Config, directory: Path, text: str) -> Config:
    """``config`` with the profiles ``text`` (TOML), written to ``directory``/profiles.toml."""
    path = directory / "profiles.toml"
    path.write_text(text)
    return dataclasses.replace(config, profiles_file=path, profiles=load_profiles(path))


def assert_offline_as_stored(metrics: pb.Metrics, stored: list[dict[str, Any]]) -> None:
    """``Admin.GetMetrics``' offline figures are exactly the evaluations evaluate stored (the
    scope's newest first, as ``PgStore.evaluations`` returns them)."""
    assert stored
    assert [
        (e.model_version, e.model, e.users_evaluated, dict(e.values)) for e in metrics.offline
    ] == [
        (s["model_version"], s["model"], s["users_evaluated"], pytest.approx(s["metrics"]))
        for s in stored
    ]


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Client:
    app: App
    channel: aio.Channel
    ranking: rpc.RankingStub
    settings: rpc.SettingsStub
    admin: rpc.AdminStub
    health: health_pb2_grpc.HealthStub
    config: Config
    port: int

    @classmethod
    def over(cls, app: App, channel: aio.Channel, config: Config, port: int) -> Client:
        """Every stub over ``channel`` to ``app``'s server on ``port``."""
        return cls(
            app,
            channel,
            rpc.RankingStub(channel),
            rpc.SettingsStub(channel),
            rpc.AdminStub(channel),
            health_pb2_grpc.HealthStub(channel),
            config,
            port,
        )

    def token(self, role: str, subject: str = "", ttl: int = 600) -> list[tuple[str, str]]:
        secret = self.config.signing_keys()[0]
        token = mint_token(
            secret, role=role, subject=subject, ttl_s=ttl, issuer=self.config.token_issuer
        )
        return [("authorization", f"Bearer {token}")]

    @property
    def svc(self) -> list[tuple[str, str]]:
        return self.token("service", "backend")

    @property
    def adm(self) -> list[tuple[str, str]]:
        return self.token("admin", "ops")


@pytest.fixture(scope="session")
async def seeded(config: Config, pg: PgStore, cache: RankCache) -> JobContext:
    ctx = JobContext(config, pg, cache)
    await pg.insert_event_batches(
        generate(users=SEED_USERS, items=SEED_ITEMS, events=SEED_EVENTS, scope="default", seed=3)
    )
    await run_job(ctx, "nightly", ["default"])
    return ctx


@pytest.fixture(scope="module")
async def client(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext
) -> AsyncIterator[Client]:
    app = await App.open(config, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await app.update_health()
    await server.start()
    await app.warm()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    yield Client.over(app, channel, config, port)
    await channel.close()
    await server.stop(1)
    await app.close()
