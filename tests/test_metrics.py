"""Tests of jobs/metrics.py against small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.metrics import (
    average_precision_at_k,
    catalog_coverage,
    evaluate_rankings,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

LOG2_3 = math.log2(3)  # discount of rank 2: 1 / log2(2 + 1)
LOG2_4 = 2.0  # discount of rank 3

# ranked best first; relevant items 1 and 2 sit at ranks 1 and 3
RANKED = [1, 3, 2, 4]
RELEVANT = {1, 2}


def test_precision_at_k() -> None:
    # top-2 = [1, 3]: one hit / 2
    assert precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.5)
    # top-3 = [1, 3, 2]: two hits / 3
    assert precision_at_k(RANKED, RELEVANT, 3) == pytest.approx(2 / 3)
    # top-1 = [1]: 1 / 1
    assert precision_at_k(RANKED, RELEVANT, 1) == pytest.approx(1.0)
    # k past the end of the list still divides by k: 2 hits / 10
    assert precision_at_k(RANKED, RELEVANT, 10) == pytest.approx(0.2)
    assert precision_at_k(RANKED, set(), 3) == 0.0
    assert precision_at_k([], {1}, 3) == 0.0


def test_recall_at_k() -> None:
    # top-2 finds 1 of the 2 relevant items
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.5)
    # top-3 finds both
    assert recall_at_k(RANKED, RELEVANT, 3) == pytest.approx(1.0)
    assert recall_at_k(RANKED, RELEVANT, 100) == pytest.approx(1.0)
    # three relevant, one of them (9) never ranked: 2 / 3 at any k >= 3
    assert recall_at_k(RANKED, {1, 2, 9}, 50) == pytest.approx(2 / 3)
    # nothing relevant: defined as 0, not a division by zero
    assert recall_at_k(RANKED, set(), 3) == 0.0
    assert recall_at_k([], {1}, 3) == 0.0


def test_ndcg_at_k() -> None:
    # k=3: DCG = 1/log2(2) + 1/log2(4) = 1 + 0.5 = 1.5 (hits at ranks 1 and 3)
    #      ideal (2 relevant, k=3) = 1 + 1/log2(3)
    assert ndcg_at_k(RANKED, RELEVANT, 3) == pytest.approx(1.5 / (1 + 1 / LOG2_3))
    # k=2: DCG = 1 (only rank 1 hits); ideal = 1 + 1/log2(3)
    assert ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / (1 + 1 / LOG2_3))
    # k=1: DCG = 1, ideal = 1
    assert ndcg_at_k(RANKED, RELEVANT, 1) == pytest.approx(1.0)
    # perfect ranking
    assert ndcg_at_k([2, 1, 7], RELEVANT, 3) == pytest.approx(1.0)
    # no hit in the top k
    assert ndcg_at_k([7, 8], RELEVANT, 2) == 0.0
    # k past the end: ranked [3, 1], relevant {1, 2}, k=5
    #   DCG = 1/log2(3) (hit at rank 2); ideal = 1 + 1/log2(3) (min(5, 2) = 2 relevant)
    assert ndcg_at_k([3, 1], RELEVANT, 5) == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))
    # 4 relevant, k=3, hits at ranks 2 and 4 but rank 4 is past k:
    #   DCG = 1/log2(3); ideal = 1 + 1/log2(3) + 1/log2(4)
    got = ndcg_at_k([9, 1, 8, 2], {1, 2, 3, 4}, 3)
    assert got == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3 + 1 / LOG2_4))
    assert ndcg_at_k(RANKED, set(), 3) == 0.0
    assert ndcg_at_k([], RELEVANT, 3) == 0.0
    assert isinstance(ndcg_at_k(RANKED, RELEVANT, 3), float)


def test_average_precision_at_k() -> None:
    # k=3: hits at ranks 1 (precision 1/1) and 3 (precision 2/3); / min(3, 2) = 2
    assert average_precision_at_k(RANKED, RELEVANT, 3) == pytest.approx((1 + 2 / 3) / 2)
    # k=2: one hit at rank 1 (1/1); / min(2, 2) = 2
    assert average_precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.5)
    # k=1: hit at rank 1; / min(1, 2) = 1
    assert average_precision_at_k(RANKED, RELEVANT, 1) == pytest.approx(1.0)
    # k past the end: ranked [4, 2], relevant {1, 2}: hit at rank 2 (1/2); / min(10, 2) = 2
    assert average_precision_at_k([4, 2], RELEVANT, 10) == pytest.approx(0.25)
    # ranked [5, 1, 6, 2, 3], relevant {1, 2, 3}, k=5:
    #   hits at ranks 2 (1/2), 4 (2/4), 5 (3/5) -> (0.5 + 0.5 + 0.6) / 3
    got = average_precision_at_k([5, 1, 6, 2, 3], {1, 2, 3}, 5)
    assert got == pytest.approx(1.6 / 3)
    assert average_precision_at_k(RANKED, set(), 3) == 0.0
    assert average_precision_at_k([], RELEVANT, 3) == 0.0


def test_catalog_coverage() -> None:
    rankings = [[0, 1, 2], [2, 3, 4], [0, 5]]
    # top-1 of each: {0, 2} -> 2 / 10
    assert catalog_coverage(rankings, 10, 1) == pytest.approx(0.2)
    # top-2: {0, 1, 2, 3, 5} -> 5 / 10
    assert catalog_coverage(rankings, 10, 2) == pytest.approx(0.5)
    # top-5 (longer than every list): {0, 1, 2, 3, 4, 5} -> 6 / 10
    assert catalog_coverage(rankings, 10, 5) == pytest.approx(0.6)
    assert catalog_coverage([], 10, 5) == 0.0
    assert catalog_coverage([[]], 10, 5) == 0.0
    # an empty catalog has no coverage (rather than a division by zero)
    assert catalog_coverage([], 0, 5) == 0.0


def test_evaluate_rankings() -> None:
    rankings = [[1, 3, 2, 4], [5, 6], [7]]
    relevant = [{1, 2}, {6}, set()]
    got = evaluate_rankings(rankings, relevant, n_items=20, ks=(1, 3))
    assert set(got) == {
        f"{name}@{k}" for k in (1, 3) for name in ("precision", "recall", "ndcg", "map", "coverage")
    }
    # @1: user 0 hits (1), user 1 misses (5), user 2 has nothing relevant
    assert got["precision@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert got["recall@1"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    assert got["ndcg@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert got["map@1"] == pytest.approx((1 + 0 + 0) / 3)
    # top-1 items {1, 5, 7} of 20
    assert got["coverage@1"] == pytest.approx(3 / 20)
    # @3: user 0 top [1, 3, 2] -> P 2/3, R 1, NDCG 1.5 / (1 + 1/log2 3), AP (1 + 2/3) / 2
    #     user 1 top [5, 6]    -> P 1/3, R 1, NDCG (1/log2 3) / 1,       AP (1/2) / 1
    #     user 2 top [7]       -> all 0
    assert got["precision@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert got["recall@3"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["ndcg@3"] == pytest.approx((1.5 / (1 + 1 / LOG2_3) + 1 / LOG2_3) / 3)
    assert got["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 3)
    # top-3 items {1, 2, 3, 5, 6, 7} of 20
    assert got["coverage@3"] == pytest.approx(6 / 20)
    assert all(isinstance(v, float) for v in got.values())


def test_evaluate_rankings_default_ks_and_no_users() -> None:
    got = evaluate_rankings([], [], n_items=5)
    assert set(got) == {
        f"{name}@{k}"
        for k in (5, 10, 20)
        for name in ("precision", "recall", "ndcg", "map", "coverage")
    }
    assert all(v == 0.0 for v in got.values())


def test_evaluate_rankings_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="zip"):
        evaluate_rankings([[1]], [{1}, {2}], n_items=5, ks=(1,))


@SETTINGS
@given(
    ranked=st.lists(st.integers(0, 30), unique=True, max_size=25),
    relevant=st.sets(st.integers(0, 30), max_size=12),
    k=st.integers(1, 30),
)
def test_metrics_are_within_unit_interval(ranked: list[int], relevant: set[int], k: int) -> None:
    for fn in (precision_at_k, recall_at_k, ndcg_at_k, average_precision_at_k):
        value = fn(ranked, relevant, k)
        assert 0.0 <= value <= 1.0 + 1e-12, f"{fn.__name__} = {value}"
    hits = [item for item in ranked[:k] if item in relevant]
    if relevant and len(hits) == min(k, len(relevant)) and ranked[: len(hits)] == hits:
        # every relevant slot filled, best first: an ideal ranking
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(1.0)
        assert average_precision_at_k(ranked, relevant, k) == pytest.approx(1.0)
    assert catalog_coverage([ranked], 31, k) == pytest.approx(len(ranked[:k]) / 31)


def test_intra_list_diversity_by_hand() -> None:
    from jobs.metrics import intra_list_diversity

    # items 0 and 1 point the same way (distance 0), item 2 is orthogonal to both (distance 1)
    unit = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # list [0, 1]: one pair at distance 0 -> 0; list [0, 2]: distance 1 -> 1; list [0, 1, 2]:
    # pairs (0,1)=0, (0,2)=1, (1,2)=1 -> 2/3; a single item -> 0
    assert intra_list_diversity([[0, 1]], unit, 10) == pytest.approx(0.0)
    assert intra_list_diversity([[0, 2]], unit, 10) == pytest.approx(1.0)
    assert intra_list_diversity([[0, 1, 2]], unit, 10) == pytest.approx(2 / 3)
    assert intra_list_diversity([[0, 1, 2], [2]], unit, 10) == pytest.approx(1 / 3)
    assert intra_list_diversity([[0, 2, 1]], unit, 2) == pytest.approx(1.0)  # only the top 2


def test_novelty_and_popularity_bias_by_hand() -> None:
    from jobs.metrics import novelty, popularity_bias

    share = np.array([0.5, 0.25, 0.0])
    # -log2(0.5) = 1, -log2(0.25) = 2; an unseen item is floored at 1/(10*3) -> log2(30)
    assert novelty([[0, 1]], share, 10) == pytest.approx(1.5)
    assert novelty([[2]], share, 10) == pytest.approx(np.log2(30))
    # ARP: mean share of recommended items (0.5 + 0.25) / 2
    assert popularity_bias([[0, 1]], share, 10) == pytest.approx(0.375)
    assert popularity_bias([], share, 10) == 0.0
