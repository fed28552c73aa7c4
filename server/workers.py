"""Serving across cores: ``privrank serve --workers N``.

One Python process runs its handlers on one core, so N worker processes each run the whole
server (server.app.serve) on the same port with SO_REUSEPORT; the kernel spreads incoming
connections over them, and they share the memory-mapped snapshots through the page cache.

The parent creates no gRPC object (gRPC is not fork-safe once started). Before forking it
compiles the numba kernels, so every worker starts with them compiled (copy-on-write). Then it:

- serves Prometheus ``/metrics`` summed over the workers (prometheus_client's multiprocess
  mode: every worker writes its series to files in one directory, removed at exit);
- relays SIGHUP (reload snapshots) that a worker sends it after ``Admin.Reload`` to every
  worker, so the call reaches all of them (``Admin.SetFlags`` needs no relay: the switch is
  stored in PostgreSQL, which every worker hears, server/optout.py);
- restarts a worker that dies after it was up (warm and listening); if one dies while starting,
  it stops the others and exits non-zero (a misconfiguration would only crash-loop);
- on SIGTERM or SIGINT forwards it: each worker goes NOT_SERVING, keeps answering for
  ``shutdown_delay_s``, drains in-flight calls for up to ``shutdown_grace_s``, then exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from server.config import Config

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0
STOP_MARGIN_S = 5.0  # past delay + grace, a worker that has not exited is killed


@dataclass(frozen=True)
class WorkerLink:
    """What a worker holds of its siblings: its index and a line to the parent."""

    index: int

    def announce_reload(self) -> None:
        """Tell every worker to load newly published snapshots now."""
        os.kill(os.getppid(), signal.SIGHUP)


def resolve_listen(listen: str) -> str:
    """``listen`` with port 0 replaced by a free port, so every worker binds the same one."""
    host, _, port = listen.rpartition(":")
    if port != "0":
        return listen
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host.strip("[]"), 0))
        return f"{host}:{probe.getsockname()[1]}"


@dataclass
class _Worker:
    index: int
    pid: int
    ready_fd: int
    ready: bool = False


class Supervisor:
    """Forks, watches and stops the workers (runs in the parent process)."""

    def __init__(
        self, config: Config, database_url: str, redis_url: str, workers: int, metrics_dir: str
    ) -> None:
        self._config = config
        self._database_url = database_url
        self._redis_url = redis_url
        self._count = workers
        self._metrics_dir = metrics_dir
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._failed: str | None = None

    # -- the parent -----------------------------------------------------------------------

    def run(self) -> int:
        """Fork the workers and supervise them until stopped. Returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._relay)
        for index in range(self._count):
            self._spawn(index)
        while self._workers:
            self._watch_ready(timeout_s=0.2)
            self._reap()
        if self._failed:
            log.error("%s", self._failed)
            return 1
        return 0

    def _spawn(self, index: int) -> None:
        if self._stopping:  # SIGTERM came meanwhile (a restart's backoff): start none
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            code = 1
            try:
                code = self._work(index, write_fd)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)  # never the parent's exit handlers (embedded stores)
        os.close(write_fd)
        self._workers[pid] = _Worker(index, pid, read_fd)
        log.info("worker %d started (pid %d)", index, pid)
        if self._stopping:  # SIGTERM came while it forked, and went to the others only
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _watch_ready(self, timeout_s: float) -> None:
        waiting = {w.ready_fd: w for w in self._workers.values() if not w.ready}
        if not waiting:
            time.sleep(timeout_s)
            return
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(list(waiting), [], [], timeout_s)
            for fd in readable:
                if os.read(fd, 1):
                    waiting[fd].ready = True
                    log.info("worker %d up", waiting[fd].index)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.ready_fd)
            # its live gauges (connections, the pool) leave the sums; its counts stay.
            # Imported here: prometheus_client must not be before serve_workers sets it up
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)
            code = os.waitstatus_to_exitcode(status)
            if self._stopping:
                log.info("worker %d exited (%d)", worker.index, code)
            elif not worker.ready:
                self._failed = f"worker {worker.index} exited ({code}) before it was up; stopping"
                self._stop_all()
            else:
                log.error("worker %d died (%d); restarting it", worker.index, code)
                time.sleep(RESTART_BACKOFF_S)
                self._spawn(worker.index)

    def _on_stop(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self._workers))
        self._stop_all()

    def _stop_all(self) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + (
            self._config.shutdown_delay_s + self._config.shutdown_grace_s + STOP_MARGIN_S
        )
        signal.signal(signal.SIGALRM, lambda *_: self._signal_all(signal.SIGKILL))
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))

    def _relay(self, signum: int, _frame: object) -> None:
        self._signal_all(signum, ready_only=True)

    def _signal_all(self, signum: int, ready_only: bool = False) -> None:
        for worker in list(self._workers.values()):
            if worker.ready or not ready_only:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    # -- a worker -------------------------------------------------------------------------

    def _work(self, index: int, ready_fd: int) -> int:
        import asyncio

        # until serve() installs its own handlers, a relayed signal must not kill the worker
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        from server.app import serve

        def ready(_port: int) -> None:
            os.write(ready_fd, b"R")
            os.close(ready_fd)

        asyncio.run(
            serve(
                self._config,
                self._database_url,
                self._redis_url,
                on_ready=ready,
                link=WorkerLink(index),
            )
        )
        return 0


@contextlib.contextmanager
def _metrics_dir(data_dir: str) -> Iterator[str]:
    os.makedirs(data_dir, exist_ok=True)
    path = tempfile.mkdtemp(prefix="metrics-", dir=data_dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_workers(config: Config, database_url: str, redis_url: str, workers: int) -> int:
    """Run ``workers`` serving processes on one port until SIGTERM/SIGINT. Exit status."""
    if "prometheus_client" in sys.modules:
        # its multiprocess mode is chosen at import, from the environment set below
        raise RuntimeError("serve_workers must run before prometheus_client is imported")
    from ranking import kernels

    listen = resolve_listen(config.listen)
    config = dataclasses.replace(config, listen=listen)
    log.info("compiling kernels before forking %d workers", workers)
    kernels.warm_up()
    with _metrics_dir(str(config.data_dir)) as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from server.metrics import serve_multiprocess_http

        port = serve_multiprocess_http(config.metrics_listen, metrics_dir)
        log.info("%d workers on %s; metrics of all of them on port %d", workers, listen, port)
        return Supervisor(config, database_url, redis_url, workers, metrics_dir).run()
