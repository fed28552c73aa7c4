"""Online metrics: Prometheus series for scraping, plus the same figures for Admin.GetMetrics.

Each server owns its registry (tests run several servers in one process). The counts for
GetMetrics are read back from the Prometheus series, so the two never disagree. Latency
percentiles come from a bounded window of recent ranking requests; under ``serve --workers``
(prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` set) every figure is summed
over all workers' series and the percentiles are interpolated from the latency histogram's
buckets, as Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
from collections import Counter as Tally
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc._cython import cygrpc  # channelz in-process, as grpcio-channelz reads it
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_WINDOW = 10_000
CORE_RESULTS = ("started", "succeeded", "failed")  # privrank_grpc_calls' result label
RANKING_METHODS = ("Recommend", "RankCandidates", "SimilarItems")


@dataclass(frozen=True, slots=True)
class OnlineFigures:
    requests: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cache_hit_rate: float
    fallback_rate: float
    opt_out_rate: float
    served_by_source: dict[str, int]
    served_by_variant: dict[str, int]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_cpu_seconds_total & co.: a serving process near its CPU allowance is where
        # gRPC core starts shedding calls, which no handler sees
        ProcessCollector(registry=self.registry)
        self._requests = Counter(
            "privrank_requests", "RPCs handled", ["method", "code"], registry=self.registry
        )
        self._latency = Histogram(
            "privrank_request_seconds",
            "RPC latency",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self._served = Counter(
            "privrank_served",
            "ranking answers by method, ladder rung and A/B variant",
            ["method", "scope", "source", "variant"],
            registry=self.registry,
        )
        self._blocked = Counter(
            "privrank_personalization_blocked",
            "answers made non-personal by opt-out or flag",
            ["scope"],
            registry=self.registry,
        )
        self._core_calls = Counter(
            "privrank_grpc_calls",
            "calls gRPC core started, succeeded, failed (channelz; chttp2 transport only); "
            "started - succeeded - failed: in flight, or shed or expired in core before any "
            "handler saw them",
            ["result"],
            registry=self.registry,
        )
        self._core_seen: dict[str, int] = {}
        self._loop_lag = Histogram(
            "privrank_event_loop_lag_seconds",
            "how late a timer on the serving event loop fires: stalls of the loop (code "
            "blocking it), which hold up every call in flight",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self._connections = Gauge(
            "privrank_grpc_connections",
            "client connections to the gRPC port: open (channelz), and the most one process "
            "holds (PRIVRANK_MAX_CONNECTIONS)",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._pool = Gauge(
            "privrank_pg_pool_connections",
            "PostgreSQL pool connections: open, idle, and the configured maximum",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._rpc_series: dict[tuple[str, str], tuple[Any, Any, bool]] = {}

    def observe_rpc(self, method: str, code: str, seconds: float | None) -> None:
        """Count a call by method and status code; its latency goes into the histogram and,
        for a ranking method, the percentile window, unless the call was CANCELLED (how long
        that took is the caller's doing, not the server's) or ``seconds`` is None: a call
        refused before any work, whose zeros would hide how long the answered calls took
        just when the server is overloaded."""
        series = self._rpc_series.get((method, code))
        if series is None:  # the label lookups, once per method and code
            name = method.rsplit("/", 1)[-1]
            series = self._rpc_series[(method, code)] = (
                self._requests.labels(name, code),
                self._latency.labels(name),
                name in RANKING_METHODS,
            )
        requests, latency, ranking = series
        requests.inc()
        if code == "CANCELLED" or seconds is None:
            return
        latency.observe(seconds)
        if ranking:
            with self._lock:
                self._recent.append(seconds)

    def observe_answer(
        self, method: str, scope: str, source: str, blocked: bool, variant: str
    ) -> None:
        """Count an answer of ``method`` (Recommend, RankCandidates or SimilarItems)."""
        self._served.labels(method, scope, source, variant).inc()
        if blocked:
            self._blocked.labels(scope).inc()

    def follow_core_calls(self, calls: Mapping[str, int]) -> None:
        """Bring ``privrank_grpc_calls`` up to gRPC core's own counts (``core_calls``).

        Only where core counts them: its promise-based transport (``ph2``) does not count a
        server's calls in channelz, and a series of zeros would say nothing was shed."""
        for result, total in calls.items():
            delta = total - self._core_seen.get(result, 0)
            series = self._core_calls.labels(result)  # every series from the first call, at 0
            if delta > 0:
                series.inc(delta)
            self._core_seen[result] = total

    def observe_connections(self, open_: int, maximum: int) -> None:
        for state, value in (("open", open_), ("max", maximum)):
            self._connections.labels(state).set(value)

    def observe_loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(max(seconds, 0.0))

    def observe_pool(self, open_: int, idle: int, maximum: int) -> None:
        for state, value in (("open", open_), ("idle", idle), ("max", maximum)):
            self._pool.labels(state).set(value)

    def _families(self) -> Iterable[Metric]:
        """The series GetMetrics' figures come from: this process's (only those, not the
        process collector's, which reads /proc), or every worker's under ``serve --workers``."""
        if self._shared_dir is None:
            own = (self._served, self._blocked, self._requests, self._latency)
            return itertools.chain.from_iterable(m.collect() for m in own)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._shared_dir)
        return registry.collect()

    def figures(self, scope: str | None = None) -> OnlineFigures:
        """The figures of ``scope``'s answers (by rung, by variant, the rates; every scope's
        if None), beside the server's ranking requests and latencies, which are counted per
        method, not per scope."""
        by_source: Tally[str] = Tally()
        by_variant: Tally[str] = Tally()
        # the rates are of answers for a user (SimilarItems' are about an item: never
        # personal, never blocked), the cache's of Recommend's, the one method it serves
        for_users: Tally[str] = Tally()
        recommended: Tally[str] = Tally()
        buckets: defaultdict[float, float] = defaultdict(float)
        blocked = requests = 0.0
        for family in self._families():
            for sample in family.samples:
                labels, value = sample.labels, sample.value
                if scope is not None and labels.get("scope", scope) != scope:
                    continue
                if sample.name == "privrank_served_total":
                    by_source[labels["source"]] += int(value)
                    by_variant[labels["variant"]] += int(value)
                    if labels["method"] != "SimilarItems":
                        for_users[labels["source"]] += int(value)
                    if labels["method"] == "Recommend":
                        recommended[labels["source"]] += int(value)
                elif sample.name == "privrank_personalization_blocked_total":
                    blocked += value
                elif labels.get("method") not in RANKING_METHODS:
                    continue
                elif sample.name == "privrank_requests_total":
                    requests += value
                elif sample.name == "privrank_request_seconds_bucket":
                    buckets[float(labels["le"])] += value
        if self._shared_dir is None:
            with self._lock:
                recent = np.array(self._recent, dtype=np.float64) * 1000.0
            p50, p95, p99 = np.percentile(recent, [50, 95, 99]) if len(recent) else (0.0, 0.0, 0.0)
        else:
            p50, p95, p99 = (1000.0 * q for q in bucket_quantiles(buckets, (0.5, 0.95, 0.99)))
        answers = sum(for_users.values())
        personal = recommended.get("cached", 0) + recommended.get("live", 0)
        return OnlineFigures(
            requests=int(requests),
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            cache_hit_rate=recommended.get("cached", 0) / personal if personal else 0.0,
            fallback_rate=for_users.get("popular", 0) / answers if answers else 0.0,
            opt_out_rate=blocked / answers if answers else 0.0,
            served_by_source=dict(by_source),
            served_by_variant=dict(by_variant),
        )

    def serve_http(self, address: str) -> int:
        """Expose ``/metrics`` on ``address`` (HOST:PORT, port 0 picks one); returns the port."""
        return _serve_http(address, self.registry)


def core_calls() -> tuple[dict[str, int], list[int]]:
    """Calls gRPC core has started, and finished OK / not OK, summed over this process's
    servers (one, outside tests), from channelz; and those servers' channelz ids. A call that
    core shed under overload (``Config.max_pending_rpcs``) or that expired there counts as
    started, and neither succeeded nor failed.

    It holds the event loop about 23 us per open connection: gRPC core renders every
    connection's counters to total a server's."""
    counts = dict.fromkeys(CORE_RESULTS, 0)
    server_ids = []
    for server in _channelz_servers():
        data = server.get("data", {})
        for result in counts:
            counts[result] += int(data.get("calls" + result.capitalize(), 0))
        server_ids.append(int(server["ref"]["serverId"]))
    return counts, server_ids


def core_connections(server_ids: Iterable[int]) -> int:
    """Client connections open to the servers with these channelz ids (both transports keep
    them). About 1 us per connection."""
    total = 0
    for server_id in server_ids:
        start = 0
        while True:
            page = json.loads(cygrpc.channelz_get_server_sockets(server_id, start, 100_000))
            sockets = page.get("socketRef", ())
            total += len(sockets)
            if page.get("end", True) or not sockets:
                break
            start = int(sockets[-1]["socketId"]) + 1
    return total


def _channelz_servers() -> Iterator[dict[str, Any]]:
    """Channelz's record of each gRPC server of this process, page by page."""
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_servers(start))
        servers = page.get("server", ())
        for server in servers:
            yield server
            start = int(server["ref"]["serverId"]) + 1
        if page.get("end", True) or not servers:
            return


def bucket_quantiles(buckets: Mapping[float, float], quantiles: Sequence[float]) -> list[float]:
    """Quantiles of a cumulative histogram {upper bound: count <= bound}, interpolated
    linearly inside the bucket that holds each rank (0 for an empty histogram). A rank in the
    +Inf bucket gets the highest finite bound."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    out = []
    for q in quantiles:
        rank, lower, below, value = q * total, 0.0, 0.0, 0.0
        for bound in bounds:
            count = buckets[bound]
            if total and count >= rank:
                if math.isinf(bound):
                    value = lower
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    value = lower + (bound - lower) * share
                break
            lower, below = bound, count
        out.append(value)
    return out


def serve_multiprocess_http(address: str, path: str) -> int:
    """Expose ``/metrics`` summed over every process writing series under ``path``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return _serve_http(address, registry)


def _serve_http(address: str, registry: CollectorRegistry) -> int:
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    return int(server.server_port)
