"""Online figures: read back from the Prometheus series; percentiles from histogram buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.metrics import ServiceMetrics, bucket_quantiles


def test_bucket_quantiles_by_hand() -> None:
    buckets = {0.001: 2.0, 0.002: 4.0, math.inf: 4.0}
    assert bucket_quantiles(buckets, (0.5, 0.75, 1.0)) == pytest.approx([0.001, 0.0015, 0.002])
    assert bucket_quantiles({}, (0.5, 0.99)) == [0.0, 0.0]
    # ranks past the last finite bound get that bound
    assert bucket_quantiles({0.01: 1.0, math.inf: 3.0}, (0.9,)) == [0.01]


@given(st.lists(st.floats(0.0001, 2.0), min_size=1, max_size=200), st.floats(0.01, 1.0))
def test_bucket_quantiles_fall_in_the_right_bucket(values: list[float], q: float) -> None:
    bounds = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf)
    data = np.array(values)
    buckets = {b: float((data <= b).sum()) for b in bounds}
    (estimate,) = bucket_quantiles(buckets, (q,))
    exact = float(np.quantile(data, q, method="inverted_cdf"))
    upper = min(b for b in bounds if b >= exact)
    lower = max([0.0, *(b for b in bounds if b < exact)])
    assert lower <= estimate <= upper


def test_figures_count_what_was_observed() -> None:
    metrics = ServiceMetrics()
    # latencies are given, not timed: the figures are arithmetic on them
    for seconds in (0.001, 0.002, 0.003):
        metrics.observe_rpc("/privrank.v1.Ranking/Recommend", "OK", seconds)
    metrics.observe_rpc("/privrank.v1.Admin/GetMetrics", "OK", 0.5)
    metrics.observe_answer("Recommend", "default", "cached", blocked=False, variant="control")
    metrics.observe_answer("Recommend", "default", "live", blocked=False, variant="b")
    metrics.observe_answer("Recommend", "default", "popular", blocked=True, variant="control")
    figures = metrics.figures()
    assert figures.requests == 3
    assert figures.p50_ms == pytest.approx(2.0)
    assert figures.served_by_source == {"cached": 1, "live": 1, "popular": 1}
    assert figures.served_by_variant == {"control": 2, "b": 1}
    assert figures.cache_hit_rate == pytest.approx(0.5)
    assert figures.fallback_rate == pytest.approx(1 / 3)
    assert figures.opt_out_rate == pytest.approx(1 / 3)


def test_the_rates_are_of_answers_for_users() -> None:
    """SimilarItems' answers are about an item (always LIVE, never blocked): counted by rung,
    left out of the rates; the cache hit rate is Recommend's, the one method it serves."""
    metrics = ServiceMetrics()
    metrics.observe_answer("Recommend", "default", "cached", blocked=False, variant="control")
    metrics.observe_answer("Recommend", "default", "cached", blocked=False, variant="control")
    metrics.observe_answer("Recommend", "default", "live", blocked=False, variant="control")
    metrics.observe_answer("RankCandidates", "default", "popular", blocked=True, variant="control")
    for _ in range(5):
        metrics.observe_answer("SimilarItems", "default", "live", blocked=False, variant="control")
    figures = metrics.figures()
    assert figures.served_by_source == {"cached": 2, "live": 6, "popular": 1}
    assert figures.cache_hit_rate == pytest.approx(2 / 3)
    assert figures.fallback_rate == pytest.approx(1 / 4)
    assert figures.opt_out_rate == pytest.approx(1 / 4)


def test_refusals_are_counted_but_not_timed() -> None:
    """Calls refused before any work (admission full, stopping) would otherwise put zeros in
    the percentiles and the histogram just when the answered calls are slow."""
    metrics = ServiceMetrics()
    recommend = "/privrank.v1.Ranking/Recommend"
    metrics.observe_rpc(recommend, "OK", 0.2)  # given, not timed, as above
    for _ in range(10):
        metrics.observe_rpc(recommend, "RESOURCE_EXHAUSTED", None)
    figures = metrics.figures()
    assert figures.requests == 11
    assert figures.p50_ms == pytest.approx(200.0)
    refused = {"method": "Recommend", "code": "RESOURCE_EXHAUSTED"}
    assert metrics.registry.get_sample_value("privrank_requests_total", refused) == 10
    timed = metrics.registry.get_sample_value(
        "privrank_request_seconds_count", {"method": "Recommend"}
    )
    assert timed == 1


def test_figures_of_a_scope_count_only_its_answers() -> None:
    metrics = ServiceMetrics()
    metrics.observe_rpc("/privrank.v1.Ranking/Recommend", "OK", 0.001)
    metrics.observe_answer("Recommend", "default", "cached", blocked=False, variant="control")
    metrics.observe_answer("Recommend", "shop", "popular", blocked=True, variant="control")
    metrics.observe_answer("Recommend", "shop", "live", blocked=False, variant="b")
    shop = metrics.figures("shop")
    assert shop.served_by_source == {"popular": 1, "live": 1}
    assert shop.served_by_variant == {"control": 1, "b": 1}
    assert (shop.cache_hit_rate, shop.fallback_rate, shop.opt_out_rate) == (0.0, 0.5, 0.5)
    default = metrics.figures("default")
    assert default.served_by_source == {"cached": 1}
    assert (default.cache_hit_rate, default.opt_out_rate) == (1.0, 0.0)
    assert metrics.figures("nosuch").served_by_source == {}
    # requests and latencies carry no scope: the server's, whichever scope is asked for
    assert shop.requests == default.requests == 1
    assert sum(metrics.figures().served_by_source.values()) == 3


def test_the_process_own_figures_are_exported() -> None:
    cpu = ServiceMetrics().registry.get_sample_value("process_cpu_seconds_total")
    assert cpu is not None
    assert cpu > 0
