"""Online metrics: Prometheus series for scraping, plus the same figures for Admin.GetMetrics.

Each server owns its registry (tests run several servers in one process). Latency percentiles
for GetMetrics come from a bounded window of recent ranking requests.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_WINDOW = 10_000
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
            "ranking answers by ladder rung and A/B variant",
            ["scope", "source", "variant"],
            registry=self.registry,
        )
        self._blocked = Counter(
            "privrank_personalization_blocked",
            "answers made non-personal by opt-out or flag",
            ["scope"],
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._by_source: Tally[str] = Tally()
        self._by_variant: Tally[str] = Tally()
        self._ranking_requests = 0
        self._blocked_total = 0

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self._requests.labels(name, code).inc()
        self._latency.labels(name).observe(seconds)
        if name in RANKING_METHODS:
            with self._lock:
                self._recent.append(seconds)
                self._ranking_requests += 1

    def observe_answer(self, scope: str, source: str, blocked: bool, variant: str) -> None:
        self._served.labels(scope, source, variant).inc()
        with self._lock:
            self._by_source[source] += 1
            self._by_variant[variant] += 1
            if blocked:
                self._blocked_total += 1
        if blocked:
            self._blocked.labels(scope).inc()

    def figures(self) -> OnlineFigures:
        with self._lock:
            recent = np.array(self._recent, dtype=np.float64) * 1000.0
            by_source = dict(self._by_source)
            by_variant = dict(self._by_variant)
            blocked = self._blocked_total
            requests = self._ranking_requests
        answers = sum(by_source.values())
        p50, p95, p99 = np.percentile(recent, [50, 95, 99]) if len(recent) else (0.0, 0.0, 0.0)
        personal = by_source.get("cached", 0) + by_source.get("live", 0)
        return OnlineFigures(
            requests=requests,
            p50_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            cache_hit_rate=by_source.get("cached", 0) / personal if personal else 0.0,
            fallback_rate=by_source.get("popular", 0) / answers if answers else 0.0,
            opt_out_rate=blocked / answers if answers else 0.0,
            served_by_source=by_source,
            served_by_variant=by_variant,
        )

    def serve_http(self, address: str) -> int:
        """Expose ``/metrics`` on ``address`` (HOST:PORT, port 0 picks one); returns the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return int(server.server_port)
