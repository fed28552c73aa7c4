"""Wiring: the application state, the gRPC server and its lifecycle.

    create_server(app) -> (server, port)     with server.interceptors.ServingInterceptor
    serve(config)                            start → warm → SERVING; SIGTERM → NOT_SERVING → drain

Health stays NOT_SERVING until every published snapshot is loaded and every kernel has been
compiled and run once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import faiss
import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from features.cache import RankCache
from features.errors import ConfigError, NotReady, SnapshotError, StoreUnavailable
from features.postgres import PgStore
from features.privacy import retract_not_personal
from features.schema import ENGAGED_EVENTS, Interaction
from ranking import kernels, snapshot
from ranking.pipeline import EMPTY, LoadedScope, Ranker
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.auth import Authorizer
from server.config import Config, running_grpc_transport
from server.interceptors import Admission, InFlight, ServingInterceptor
from server.metrics import ServiceMetrics, core_calls, core_connections
from server.optout import OptOutRegistry
from server.services import AdminService, RankingService, SettingsService
from server.threads import lower_grpc_threads, usable_cores
from server.tls import CertificateFiles

if TYPE_CHECKING:
    from server.workers import WorkerLink

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

REFILL_CHECK_S = 1.0  # how often each process checks that Redis holds the cached rankings
REFILL_PAGE = 200  # rankings read from PostgreSQL and written to Redis at a time
REFILL_SHARE = 0.2  # of the event loop's time, at most, while serving goes on
REFILL_HOLD_S = 600  # how long one process's claim to refill a scope's cache holds
GAUGES_PERIOD_S = 1.0  # how often the gauges are brought up to date, channelz's at most
# Reading channelz holds the event loop: for the call counts about 23 us per open connection
# (24 ms at 1,000), for the connections about 1 us each. Each read is spaced so that it takes
# at most this share of the loop
CHANNELZ_LOOP_SHARE = 0.002
SHUTDOWN_QUIET_S = 0.1  # shutdown: stop() once no call has been refused for this long, or
SHUTDOWN_FLUSH_S = 0.5  # on chttp2, once the calls held in gRPC core have reached the refusal
LOOP_LAG_SAMPLE_S = 0.1  # privrank_event_loop_lag_seconds: one sample per this, at most
GRPC_THREADS_CHECK_S = 1.0  # how often new gRPC threads get PRIVRANK_GRPC_THREADS_NICE

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Ranking", "Settings", "Admin")
)
RANKING_SERVICE = SERVICE_NAMES[0]


@dataclass
class App:
    """Everything a serving process holds. Built by ``open``, released by ``close``."""

    config: Config
    database_url: str
    redis_url: str
    pg: PgStore
    cache: RankCache
    optouts: OptOutRegistry
    ranker: Ranker
    kernels_pool: ThreadPoolExecutor
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    in_flight: InFlight = field(default_factory=InFlight)  # refused and drained on shutdown
    # the transport gRPC runs (the configured one unless GRPC_EXPERIMENTS or grpc came first)
    transport: str = field(default_factory=running_grpc_transport)
    link: WorkerLink | None = None  # to the sibling workers under ``serve --workers``
    warm_done: bool = False
    stopping: bool = False  # shutdown has begun: health says NOT_SERVING from then on
    _health: dict[str, bool] = field(default_factory=dict)  # what health says, by service
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: bool = False
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _health_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # channelz: when to read the call counts (with the servers' ids) and the connections next
    _calls_due: float = 0.0
    _connections_due: float = 0.0
    _server_ids: list[int] = field(default_factory=list)

    @classmethod
    async def open(
        cls, config: Config, database_url: str, redis_url: str, link: WorkerLink | None = None
    ) -> App:
        faiss.omp_set_num_threads(1)  # one query per request: threads only add overhead
        failures, cooldown = config.breaker_failures, config.breaker_cooldown_s
        # min_size=0: a server starts (and serves its snapshots) while PostgreSQL is down
        pg = await PgStore.connect(
            database_url,
            timeout_s=config.store_timeout_s,
            min_size=0,
            breaker_failures=failures,
            breaker_cooldown_s=cooldown,
        )
        cache = RankCache.from_url(
            redis_url,
            timeout_s=config.redis_timeout_s,
            ttl_s=config.cache_ttl_s,
            key_prefix=config.redis_key_prefix,
            breaker_failures=failures,
            breaker_cooldown_s=cooldown,
        )
        optouts = OptOutRegistry(
            pg,
            refresh_s=config.optout_refresh_s,
            max_staleness_s=config.optout_max_staleness_s,
            forced_off=not config.personalization_enabled,
        )
        kernels_pool = ThreadPoolExecutor(
            max_workers=config.kernel_thread_count(usable_cores()),
            thread_name_prefix="privrank-kernel",
        )
        ranker = Ranker(
            cache,
            optouts,
            executor=kernels_pool,
            offload_min_work=config.offload_min_work,
            profiles=config.profiles,
        )
        return cls(
            config, database_url, redis_url, pg, cache, optouts, ranker, kernels_pool, link=link
        )

    async def update_health(self) -> None:
        """Health by service: Settings and Admin are SERVING once warm; Ranking, and the server
        as a whole (service ""), once a snapshot is loaded too, since without one there is
        nothing to rank; every service is NOT_SERVING once ``stopping``. Only changes are
        sent, so Watch streams see each transition once. One update at a time: a ``set`` waits
        while a Watch stream writes, and an update decided before ``stopping`` must not finish
        after the one that stops."""
        async with self._health_lock:
            up = self.warm_done and not self.stopping
            ranking = up and bool(self.ranker.loaded())
            wanted = {name: ranking if name == RANKING_SERVICE else up for name in SERVICE_NAMES}
            wanted[""] = ranking
            for name, serving in wanted.items():
                if self._health.get(name) is not serving:
                    await self.health.set(name, SERVING if serving else NOT_SERVING)
                    self._health[name] = serving

    async def warm(self) -> None:
        """Compile every kernel, start the opt-out view, load every snapshot; then SERVING
        (Ranking only once a snapshot is loaded: ``update_health``)."""
        await asyncio.to_thread(kernels.warm_up)
        await self.optouts.start()
        await self.reload()
        self._background = [
            asyncio.create_task(self._every(name, period, step), name=name)
            for name, period, step in (
                ("snapshot poll", self.config.snapshot_poll_s, self.reload),
                ("gauges", GAUGES_PERIOD_S, self._follow_gauges),
                ("cache refill", REFILL_CHECK_S, self.refill_cache),
                ("gRPC threads' priority", GRPC_THREADS_CHECK_S, self._lower_grpc_threads),
                ("event loop lag", 0.0, self._sample_loop_lag),
            )
        ]
        self.warm_done = True
        await self.update_health()

    def check_warm(self) -> None:
        """NotReady (UNAVAILABLE, retryable) until ``warm`` has loaded the snapshots."""
        if not self.warm_done:
            raise NotReady("warming up: snapshots not loaded yet; retry shortly")

    async def reload(self) -> dict[str, str]:
        """Load any newly published snapshot, warm it off the request path, and swap it in.

        A snapshot that fails verification is refused; the scope keeps serving the old one.
        Returns scope → version now serving.
        """
        async with self._reload_lock:
            root = self.config.snapshot_dir
            loaded = self.ranker.loaded()
            installed = False
            for scope in snapshot.published_scopes(root):
                version = snapshot.current_version(root, scope)
                if version is None or (
                    scope in loaded and loaded[scope].snapshot.version == version
                ):
                    continue
                try:
                    fresh = await asyncio.to_thread(
                        lambda path: self.ranker.prepare(_load_warm(path)), root / scope / version
                    )
                except SnapshotError as exc:
                    log.error("refusing snapshot %s/%s: %s", scope, version, exc)
                    continue
                self.ranker.install(fresh)
                installed = True
                log.info("serving scope %s from snapshot %s", scope, version)
            if installed:
                await self.update_health()
            return {name: ls.snapshot.version for name, ls in self.ranker.loaded().items()}

    async def reload_everywhere(self) -> dict[str, str]:
        """``reload`` here, and in every sibling worker (which answer on their own)."""
        versions = await self.reload()
        if self.link is not None:
            self.link.announce_reload()
        return versions

    async def set_personalization(self, enabled: bool) -> None:
        """Store the global switch: this process follows it at once, every other one (sibling
        workers, other hosts) on the NOTIFY, or at its next re-read. StoreUnavailable, and no
        change anywhere, if PostgreSQL cannot store it."""
        self.optouts.apply_switch(enabled, await self.pg.set_personalization(enabled))

    def follow_siblings(self, loop: asyncio.AbstractEventLoop) -> None:
        """Act on what the parent relays from a sibling worker: SIGHUP reload."""
        link = self.link
        if link is None:
            return

        def reload() -> None:
            task = loop.create_task(self.reload(), name="sibling-reload")
            task.add_done_callback(_log_failure)

        loop.add_signal_handler(signal.SIGHUP, reload)

    async def _every(
        self, name: str, period_s: float, step: Callable[[], Awaitable[object]]
    ) -> None:
        """Run ``step`` now and every ``period_s`` until ``close``, logging its failures. The
        flag, not only the cancellation, ends it: on Python 3.11 a store call's own timeout
        expiring as the task is cancelled can turn the cancellation into a timeout error."""
        while not self._closing:
            try:
                await step()
            except Exception:
                log.exception("%s failed", name)
            await asyncio.sleep(period_s)

    async def refill_cache(self) -> int:
        """Copy each serving scope's precomputed rankings from PostgreSQL's ranks table (their
        system of record) into Redis when Redis does not hold them all, as after a Redis
        restart (checked every REFILL_CHECK_S); returns how many were written. One process of
        those sharing the Redis does it; users not to be ranked personally (opted out,
        erased) are left out, and each ranking keeps what is left of its TTL. While either
        store is unreachable it writes nothing and the next check tries again."""
        if not self.optouts.personalizing:
            return 0  # no one is ranked personally now: refill once they are again
        written = 0
        for scope, loaded in self.ranker.loaded().items():
            version = loaded.snapshot.version
            try:
                if await self.cache.is_warm(scope, version) or not await self.cache.claim_refill(
                    scope, version, REFILL_HOLD_S
                ):
                    continue
                written += await self._refill(scope, loaded.snapshot)
            except StoreUnavailable as exc:  # tried again in REFILL_CHECK_S
                log.debug("refilling the cached rankings of %s deferred: %s", scope, exc)
        return written

    async def _refill(self, scope: str, snap: snapshot.Snapshot) -> int:
        ttl_s = self.config.profile(scope).cache_ttl_s or self.config.cache_ttl_s
        written, after = 0, ""
        while True:
            started = time.monotonic()
            page = await self.pg.ranks_page(scope, snap.version, after=after, limit=REFILL_PAGE)
            if not page:
                break
            if not self.optouts.personalizing:
                # nobody is ranked personally for now (the global switch, an opt-out set gone
                # stale): the rest would be left out for the moment only, so not warm yet
                return written
            after, now = page[-1][0], time.time()
            batch, shortest = [], ttl_s
            for user_id, item_ids, scores, computed_at in page:
                left = int(computed_at.timestamp() + ttl_s - now)
                if left <= 0 or not self.ranker.personal(user_id, snap):
                    continue  # expired, or not to be ranked personally: opted out, erased
                positions = snap.lookup_items(item_ids)
                known = positions >= 0
                batch.append((user_id, positions[known], np.asarray(scores, np.float32)[known]))
                shortest = min(shortest, left)
            if batch:
                written += await self.cache.put_many(scope, snap.version, batch, ttl_s=shortest)
                retracted = await retract_not_personal(
                    self.pg,
                    self.cache,
                    scope,
                    snap.version,
                    [user_id for user_id, _, _ in batch],
                    data_as_of=snap.data_as_of,
                    stored=False,
                )
                written -= len(retracted)
            # the refill shares the event loop with serving: it takes at most REFILL_SHARE of it
            await asyncio.sleep((time.monotonic() - started) * (1 / REFILL_SHARE - 1))
        if after:  # the version's stored rankings are all in Redis now
            await self.cache.mark_warm(scope, snap.version, ttl_s)
            log.info("refilled %d cached rankings of %s/%s", written, scope, snap.version)
        return written

    async def _lower_grpc_threads(self) -> None:
        if self.config.grpc_threads_nice:
            lower_grpc_threads(self.config.grpc_threads_nice)

    async def _follow_gauges(self) -> None:
        """The PostgreSQL pool's size into the metrics, and, each when due (channelz_pause),
        gRPC core's call counts (where it keeps them) and open connections, from channelz."""
        self.metrics.observe_pool(*self.pg.pool_size())
        self._calls_due = _when_due(self._calls_due, self._follow_core_calls)
        self._connections_due = _when_due(self._connections_due, self._follow_connections)

    def _follow_core_calls(self) -> None:
        calls, self._server_ids = core_calls()
        if self.transport == "chttp2":
            self.metrics.follow_core_calls(calls)

    def _follow_connections(self) -> None:
        open_ = core_connections(self._server_ids)
        self.metrics.observe_connections(open_, self.config.max_connections)

    async def _sample_loop_lag(self) -> None:
        """Sleep LOOP_LAG_SAMPLE_S and record how much later than that the loop woke up."""
        started = time.monotonic()
        await asyncio.sleep(LOOP_LAG_SAMPLE_S)
        self.metrics.observe_loop_lag(time.monotonic() - started - LOOP_LAG_SAMPLE_S)

    async def remember_recent(self, events: Sequence[Interaction], received_at: float) -> None:
        """Keep the items of fresh events, received at ``received_at`` (unix seconds, before
        they were stored), for ranking users the model does not know yet; never for a user who
        opted out. Best effort: the events themselves are already stored.

        The opt-out set in memory may not have heard of an opt-out or erasure made a moment
        ago (on another process, or while this was writing), so the users are checked again
        in PostgreSQL after the write, as ``retract_not_personal`` explains; if that check
        cannot be made, the items just written are deleted again (fail closed)."""
        allowed = [
            (e.scope, e.user_id, e.item_id)
            for e in events
            if e.event_type in ENGAGED_EVENTS and self.optouts.personalization_allowed(e.user_id)
        ]
        if not allowed:
            return
        try:
            await self.cache.push_recent(allowed, at=received_at)
        except StoreUnavailable as exc:
            log.warning("could not remember recent items: %s", exc)
            return
        users = {(scope, user) for scope, user, _ in allowed}
        try:
            # and erased since the events came in: the erasure's own purge may have run
            # before these items were written
            gone = await self.pg.not_personal(
                sorted({u for _, u in users}), erased_since=datetime.fromtimestamp(received_at, UTC)
            )
        except StoreUnavailable as exc:
            log.warning("could not re-check opt-outs, so recent items are not kept: %s", exc)
            gone = {u for _, u in users}
        if gone:
            try:
                await self.cache.delete_recent({(s, u) for s, u in users if u in gone})
            except StoreUnavailable as exc:  # they expire with their TTL
                log.warning("could not delete recent items of opted-out users: %s", exc)

    async def forget_cached(self, user_id: str) -> int:
        """Delete a user's cached rankings; 0 if Redis is unreachable (the ranker never
        serves them to an opted-out user anyway)."""
        try:
            return await self.cache.delete_user(user_id)
        except StoreUnavailable as exc:
            log.warning("could not delete cached rankings: %s", exc)
            return 0

    def child_env(self) -> dict[str, str]:
        """Environment for job processes started by Admin.RunJob: the same stores."""
        env = dict(os.environ)
        env["PRIVRANK_DATABASE_URL"] = self.database_url
        env["PRIVRANK_REDIS_URL"] = self.redis_url
        env["PRIVRANK_DATA_DIR"] = str(self.config.data_dir)
        return env

    async def close(self) -> None:
        self._closing = True
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.optouts.close()
        await self.cache.close()
        await self.pg.close()
        self.kernels_pool.shutdown(wait=True)


def _log_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


def _load_warm(path: os.PathLike[str]) -> LoadedScope:
    loaded = LoadedScope.of(snapshot.load(path))  # type: ignore[arg-type]
    snap = loaded.snapshot
    if snap.n_users and snap.n_items:  # touch the pages and the index before serving
        loaded.retriever.top_k(snap.user_vectors[0], EMPTY, 10)
        np.asarray(snap.item_vectors).sum()
    return loaded


def channelz_pause(read_s: float) -> float:
    """Seconds from one read of channelz to the next, given the CPU time this one took: at
    least GAUGES_PERIOD_S, and long enough that reads take at most CHANNELZ_LOOP_SHARE."""
    return max(GAUGES_PERIOD_S, read_s / CHANNELZ_LOOP_SHARE)


def _when_due(due: float, read: Callable[[], None]) -> float:
    """Run ``read`` if its time (``due``, time.monotonic()) has come; returns when it is due
    next, spaced by the CPU time it took (channelz_pause). CPU, not wall time: a read that
    lost its core for 20 ms to another process would otherwise put the next one 10 s off,
    on a busy machine, when the counts matter most."""
    started = time.monotonic()
    if started < due:
        return due
    cpu = time.thread_time()
    read()
    return started + channelz_pause(time.thread_time() - cpu)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def create_server(
    app: App, listen: str | None = None, reuse_port: bool = False
) -> tuple[aio.Server, int]:
    """A gRPC server with every service, bound but not started. Returns (server, port).

    ``reuse_port`` lets several processes bind the same port (``serve --workers``); otherwise
    binding a port in use fails rather than silently sharing it."""
    config = app.config
    if app.transport != config.grpc_transport:
        log.warning(
            "gRPC's HTTP/2 server transport is %s, not %s (PRIVRANK_GRPC_TRANSPORT): "
            "GRPC_EXPERIMENTS says otherwise, or grpc was imported before privrank's server "
            "package",
            app.transport,
            config.grpc_transport,
        )
    backlog: list[tuple[str, int]] = []
    if config.max_pending_rpcs:
        # The event loop takes one call per method per turn, so past capacity the backlog
        # waits in gRPC core, out of admission control's sight, until it expires there. Core
        # bounds it instead (random early drop between the cap and twice the cap): shedding
        # costs core microseconds, where a refusal in Python would cost nearly what an
        # answer does and at 3x load leave little time to answer.
        backlog = [
            ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_rpcs),
        ]
    if app.transport == "ph2" and (config.max_connection_idle_s or config.max_connection_age_s):
        log.warning(
            "PRIVRANK_MAX_CONNECTION_IDLE_S and _AGE_S have no effect on the ph2 transport"
            " (grpcio 1.85): connections stay open until their clients close them"
        )
    lifetime: list[tuple[str, int]] = []
    if config.max_connection_idle_s:
        lifetime.append(("grpc.max_connection_idle_ms", _ms(config.max_connection_idle_s)))
    if config.max_connection_age_s:
        lifetime += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(config.shutdown_grace_s)),
        ]
    server = aio.server(
        interceptors=[
            ServingInterceptor(
                app.metrics,
                config.default_deadline_s,
                Admission(config.max_active_rpcs, config.max_queued_rpcs, config.max_queue_wait_s),
                Authorizer(config.signing_keys(), config.token_issuer),
                app.in_flight,
            )
        ],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.keepalive_time_ms", _ms(config.keepalive_s)),
            ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
            ("grpc.http2.ping_timeout_ms", _ms(config.keepalive_timeout_s)),  # chttp2 uses this
            ("grpc.keepalive_permit_without_calls", 1),  # idle connections too, both ways
            # gRPC stops pinging after 2 pings with no data between them by default, which
            # would leave a long-idle connection unchecked
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.min_client_ping_s)),
            *lifetime,
            *backlog,
        ],
        maximum_concurrent_rpcs=config.concurrent_rpc_cap,
    )
    rpc.add_RankingServicer_to_server(RankingService(app), server)
    rpc.add_SettingsServicer_to_server(SettingsService(app), server)
    rpc.add_AdminServicer_to_server(AdminService(app), server)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = listen or config.listen
    try:
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            files = CertificateFiles(
                config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
            )
            port = server.add_secure_port(address, files.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind to address"
        port = 0
    if port == 0:  # taken since the CLI checked it (the check cannot hold it for gRPC)
        raise ConfigError(f"PRIVRANK_LISTEN: cannot listen on {address}: in use or not bindable")
    return server, port


async def serve(
    config: Config,
    database_url: str,
    redis_url: str,
    on_ready: Callable[[int], None] | None = None,
    link: WorkerLink | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: NOT_SERVING at once, then drain in-flight calls and exit.

    With ``link`` this is one of ``serve --workers`` processes: it shares the port with its
    siblings (SO_REUSEPORT) and the parent serves the metrics of all of them."""
    app = await App.open(config, database_url, redis_url, link)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        app.stopping = True  # from now on: a warm-up still running must not say SERVING
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    app.follow_siblings(loop)
    try:
        server, port = create_server(app, reuse_port=link is not None)
        await app.update_health()
        if link is None:
            # health answers NOT_SERVING while warming up
            await server.start()
            metrics_port = app.metrics.serve_http(config.metrics_listen)
            log.info("listening on port %d (metrics on %d); warming up", port, metrics_port)
            await app.warm()
        else:
            # a worker joins the port's group only when warm: the kernel hands new
            # connections to every listener of the group, ready or not
            await app.warm()
            await server.start()
            log.info("worker %d listening on port %d", link.index, port)
        versions = await app.reload()
        if versions:
            log.info("SERVING: %s", ", ".join(f"{s}={v}" for s, v in versions.items()))
        else:
            log.warning(
                "NOT_SERVING: no snapshot published yet under %s; health turns SERVING once one "
                "is loaded (checked every %gs, or at once by Admin.Reload). Settings and Admin "
                "answer meanwhile",
                config.snapshot_dir,
                config.snapshot_poll_s,
            )
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
        log.info(
            "shutting down: NOT_SERVING, answering for %.1fs more, then draining for up to %.0fs",
            config.shutdown_delay_s,
            config.shutdown_grace_s,
        )
        app.stopping = True
        await app.update_health()
        # keep answering while clients and balancers see NOT_SERVING and move away
        await asyncio.sleep(config.shutdown_delay_s)
        await stop_server(app, server)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await app.close()


async def stop_server(app: App, server: aio.Server) -> None:
    """The end of a shutdown, once health has said NOT_SERVING for the delay: new calls are
    refused (UNAVAILABLE, retried elsewhere) while those in flight finish (InFlight), and
    ``server.stop`` gives what still runs the rest of ``PRIVRANK_SHUTDOWN_GRACE_S``.

    On chttp2 the refusal lasts only a moment: stop() drains in-flight calls itself but drops
    the ones gRPC core holds for the loop (CANCELLED), so they reach the refusal first. ph2's
    stop() drops every connection with its calls, so there it lasts until callers go quiet
    or the grace ends."""
    grace_s = app.config.shutdown_grace_s
    stopping = time.monotonic()
    flush_s = SHUTDOWN_FLUSH_S if app.transport == "chttp2" else math.inf
    left = await app.in_flight.close(min(grace_s, flush_s), SHUTDOWN_QUIET_S)
    log.info(
        "refused new calls for %.2fs (%d of them, UNAVAILABLE), %d calls still running",
        time.monotonic() - stopping,
        app.in_flight.refused,
        left,
    )
    await server.stop(max(grace_s - (time.monotonic() - stopping), 0.0))


def channel_ready_check(
    target: str,
    tls: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    *,
    live: bool = False,
) -> bool:
    """True if the health service at ``target`` says SERVING (for the Dockerfile probe), or,
    with ``live``, if it answers at all; over TLS with ``tls``, expecting a certificate for
    ``server_name`` (default: the target's host)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with (
        grpc.secure_channel(target, tls, options)
        if tls is not None
        else grpc.insecure_channel(target)
    ) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
    return live or bool(reply.status == SERVING)
