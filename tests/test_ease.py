"""EASE: the trainer against its optimality conditions, serving against numpy, and the
snapshot carrying the item-item matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import SnapshotError
from jobs.ease import gram, train_ease
from ranking import snapshot
from ranking.itemitem import item_item_candidates, item_item_scores, item_item_top_k


def _interactions(seed: int, users: int = 60, items: int = 25, pairs: int = 400):
    rng = np.random.default_rng(seed)
    return rng.integers(0, users, pairs), rng.integers(0, items, pairs), users, items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_is_xtx_of_the_binary_matrix(seed: int) -> None:
    users, items, n_users, n_items = _interactions(seed)
    x = np.zeros((n_users, n_items))
    x[users, items] = 1.0  # repeats count once
    assert np.array_equal(gram(users, items, n_items), x.T @ x)


@pytest.mark.parametrize(("seed", "lam"), [(0, 1.0), (1, 10.0), (2, 100.0)])
def test_ease_meets_its_optimality_conditions(seed: int, lam: float) -> None:
    """B minimises ||X - XB||² + λ||B||² subject to diag(B) = 0: for each column j the
    gradient (G + λI) B[:, j] - G[:, j] vanishes everywhere but at row j (the multiplier)."""
    users, items, _, n_items = _interactions(seed)
    g = gram(users, items, n_items)
    b = train_ease(g, lam).astype(np.float64)
    assert np.all(np.diag(b) == 0)
    residual = (g + lam * np.eye(n_items)) @ b - g
    off_diagonal = residual[~np.eye(n_items, dtype=bool)]
    assert np.abs(off_diagonal).max() < 1e-3 * max(1.0, np.abs(g).max())


def _draw_model(n: int, data: st.DataObject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An n x n item-item matrix, a bias and a user's seen positions, all small integers:
    sums are exact, so ties are real and must break by position."""
    matrix = np.array(
        data.draw(
            st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=n, max_size=n)
        ),
        dtype=np.float32,
    )
    bias = np.array(
        data.draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n)), dtype=np.float32
    )
    seen = np.array(
        sorted(set(data.draw(st.lists(st.integers(0, n - 1), max_size=n)))), dtype=np.int64
    )
    return matrix, bias, seen


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(1, 12),
    data=st.data(),
)
def test_item_item_top_k_matches_numpy(n: int, data: st.DataObject) -> None:
    matrix, bias, seen = _draw_model(n, data)
    excluded = np.array(
        sorted(set(data.draw(st.lists(st.integers(0, n - 1), max_size=n)))), dtype=np.int64
    )
    k = data.draw(st.integers(0, n + 2))
    scores = item_item_scores(matrix, seen) + bias
    expected = sorted(
        (i for i in range(n) if i not in set(excluded.tolist())), key=lambda i: (-scores[i], i)
    )[:k]
    items, got = item_item_top_k(matrix, bias, seen, excluded, k)
    assert items.tolist() == expected
    assert got.tolist() == [scores[i] for i in expected]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 12), weight=st.sampled_from([1.0, 2.0, 0.5]), data=st.data())
def test_item_item_candidates_orders_them_as_the_full_ranking(
    n: int, weight: float, data: st.DataObject
) -> None:
    """RankCandidates on an EASE scope: the candidates (duplicates allowed) in the order and
    with the scores that item_item_top_k gives them over the whole catalog."""
    matrix, bias, seen = _draw_model(n, data)
    candidates = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n)), np.int64)
    k = data.draw(st.integers(0, n + 2))
    full_items, full_scores = item_item_top_k(matrix, bias, seen, np.empty(0, np.int64), n, weight)
    wanted = set(candidates.tolist())
    expected = [
        (i, s)
        for i, s in zip(full_items.tolist(), full_scores.tolist(), strict=True)
        if i in wanted
    ]
    items, scores = item_item_candidates(matrix, bias, seen, candidates, k, weight)
    assert list(zip(items.tolist(), scores.tolist(), strict=True)) == expected[:k]


def _arrays(n: int = 4) -> dict[str, np.ndarray]:
    return {
        "item_ids": np.array([f"i{j}" for j in range(n)]),
        "item_vectors": np.ones((n, 2), np.float32),
        "item_bias": np.zeros(n, np.float32),
        "item_popularity": np.zeros(n, np.float32),
        "user_ids": np.array(["u0"]),
        "user_vectors": np.ones((1, 2), np.float32),
        "user_features": np.zeros((1, 3), np.float32),
        "seen_indptr": np.array([0, 1], np.int64),
        "seen_indices": np.array([0], np.int64),
    }


def test_a_snapshot_carries_the_item_item_matrix(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["item_item"] = np.arange(16, dtype=np.float32).reshape(4, 4)
    version = snapshot.publish(tmp_path, "s", arrays, extra={"model": "ease"})
    loaded = snapshot.load(tmp_path / "s" / version)
    assert loaded.item_item is not None
    assert np.array_equal(loaded.item_item, arrays["item_item"])
    assert loaded.manifest["model"] == "ease"
    assert (
        snapshot.load(tmp_path / "s" / snapshot.publish(tmp_path, "s", _arrays())).item_item is None
    )


def test_a_misshapen_item_item_matrix_is_refused(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["item_item"] = np.zeros((4, 3), np.float32)
    with pytest.raises(SnapshotError, match="item_item"):
        snapshot.publish(tmp_path, "s", arrays)
