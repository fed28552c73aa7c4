"""Serving an item-item model (EASE): a user's scores are the sum of the rows of the item-item
matrix for the items they interacted with; the fused top-k kernel then selects over that row
(a one-column "vector" per item) with the same exclusion mask and ID tie-break as every other
ranking. Pure functions over arrays."""

from __future__ import annotations

import numpy as np

from ranking import kernels

_ONE = np.ones(1, dtype=np.float32)


def item_item_scores(matrix: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Σ matrix[j] over the positions ``seen`` (int64[m]): float32[n]; zeros if m = 0."""
    if len(seen) == 0:
        return np.zeros(matrix.shape[1], dtype=np.float32)
    return np.asarray(matrix[seen].sum(axis=0, dtype=np.float32))


def _as_dense(matrix: np.ndarray, seen: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The user's summed rows as the kernels' input: (query float32[1], vectors float32[n, 1])."""
    row = item_item_scores(matrix, seen).reshape(-1, 1)
    query = _ONE if weight == 1.0 else np.full(1, weight, dtype=np.float32)
    return query, row


def item_item_top_k(
    matrix: np.ndarray,
    bias: np.ndarray,
    seen: np.ndarray,
    excluded: np.ndarray,
    k: int,
    weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` items by ``weight`` × item-item score + bias, minus ``excluded`` (sorted
    int64)."""
    query, row = _as_dense(matrix, seen, weight)
    result: tuple[np.ndarray, np.ndarray] = kernels.topk_dense(query, row, bias, excluded, k)
    return result


def item_item_candidates(
    matrix: np.ndarray,
    bias: np.ndarray,
    seen: np.ndarray,
    candidates: np.ndarray,
    k: int,
    weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of ``candidates`` (int64[m] positions) by the score ``item_item_top_k``
    ranks with, so that they come in the order Recommend gives them."""
    query, row = _as_dense(matrix, seen, weight)
    result: tuple[np.ndarray, np.ndarray] = kernels.topk_candidates(
        query, row, bias, candidates, np.empty(0, dtype=np.int64), k
    )
    return result
