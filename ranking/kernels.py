"""Scoring kernels: pure numba functions over arrays. No I/O, no logging, no globals.

Conventions for every kernel here:
- ``vectors`` is float32[n, d] C-contiguous (item embeddings), ``query`` float32[d];
- ``bias`` is float32[n], a per-item additive score (popularity, recency boosts);
- ``excluded`` is int64[e], sorted ascending (duplicates allowed), positions never returned;
- item positions are ordered by item ID in a snapshot, so "ties break by ID" means the lower
  position wins an equal score; results are deterministic;
- results come best first as (positions int64[k'], scores float32[k']) with k' <= k.

The top-k uses a bounded min-heap of size k: one pass, no full sort, no catalog-sized
temporary.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _better(s1: float, i1: int, s2: float, i2: int) -> bool:
    """True if (s1, i1) ranks above (s2, i2): higher score, then lower position."""
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(cache=True, nogil=True)
def _sift_down(heap_s: np.ndarray, heap_i: np.ndarray, size: int, pos: int) -> None:
    # min-heap on rank: the root is the worst of the kept items
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        worst = left
        right = left + 1
        if right < size and _better(heap_s[worst], heap_i[worst], heap_s[right], heap_i[right]):
            worst = right
        if _better(heap_s[pos], heap_i[pos], heap_s[worst], heap_i[worst]):
            heap_s[pos], heap_s[worst] = heap_s[worst], heap_s[pos]
            heap_i[pos], heap_i[worst] = heap_i[worst], heap_i[pos]
            pos = worst
        else:
            return


@njit(cache=True, nogil=True)
def _heap_offer(
    heap_s: np.ndarray, heap_i: np.ndarray, size: int, k: int, score: float, item: int
) -> int:
    """Offer (score, item) to a heap holding ``size`` of at most ``k``; returns the new size."""
    if size < k:
        pos = size
        heap_s[pos] = score
        heap_i[pos] = item
        while pos > 0:
            parent = (pos - 1) // 2
            if _better(heap_s[parent], heap_i[parent], heap_s[pos], heap_i[pos]):
                heap_s[pos], heap_s[parent] = heap_s[parent], heap_s[pos]
                heap_i[pos], heap_i[parent] = heap_i[parent], heap_i[pos]
                pos = parent
            else:
                break
        return size + 1
    if _better(score, item, heap_s[0], heap_i[0]):
        heap_s[0] = score
        heap_i[0] = item
        _sift_down(heap_s, heap_i, size, 0)
    return size


@njit(cache=True, nogil=True)
def _drain(heap_s: np.ndarray, heap_i: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty the heap into arrays ordered best first."""
    out_i = np.empty(size, dtype=np.int64)
    out_s = np.empty(size, dtype=np.float32)
    for slot in range(size - 1, -1, -1):
        out_s[slot] = heap_s[0]
        out_i[slot] = heap_i[0]
        last = slot
        heap_s[0] = heap_s[last]
        heap_i[0] = heap_i[last]
        _sift_down(heap_s, heap_i, last, 0)
    return out_i, out_s


@njit(cache=True, nogil=True)
def _dot(query: np.ndarray, vectors: np.ndarray, row: int) -> np.float32:
    acc = np.float32(0.0)
    for j in range(query.shape[0]):
        acc += query[j] * vectors[row, j]
    return acc


@njit(cache=True, nogil=True)
def topk_dense(
    query: np.ndarray, vectors: np.ndarray, bias: np.ndarray, excluded: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every item by ``vectors @ query + bias``, skipping ``excluded`` positions."""
    n = vectors.shape[0]
    k = min(k, n)
    heap_s = np.empty(max(k, 1), dtype=np.float32)
    heap_i = np.empty(max(k, 1), dtype=np.int64)
    size = 0
    next_excluded = 0
    for item in range(n):
        while next_excluded < excluded.shape[0] and excluded[next_excluded] < item:
            next_excluded += 1
        if next_excluded < excluded.shape[0] and excluded[next_excluded] == item:
            continue
        if k == 0:
            continue
        score = _dot(query, vectors, item) + bias[item]
        size = _heap_offer(heap_s, heap_i, size, k, score, item)
    return _drain(heap_s, heap_i, size)


@njit(cache=True, nogil=True)
def topk_candidates(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    candidates: np.ndarray,
    excluded: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among ``candidates`` (int64[m] positions, duplicates allowed and scored once)."""
    k = min(k, candidates.shape[0])
    heap_s = np.empty(max(k, 1), dtype=np.float32)
    heap_i = np.empty(max(k, 1), dtype=np.int64)
    size = 0
    ordered = np.sort(candidates)
    previous = -1
    for c in range(ordered.shape[0]):
        item = ordered[c]
        if item == previous or k == 0:
            continue
        previous = item
        slot = np.searchsorted(excluded, item)
        if slot < excluded.shape[0] and excluded[slot] == item:
            continue
        score = _dot(query, vectors, item) + bias[item]
        size = _heap_offer(heap_s, heap_i, size, k, score, item)
    return _drain(heap_s, heap_i, size)


@njit(cache=True, nogil=True)
def topk_dense_batch(
    queries: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    excluded_indptr: np.ndarray,
    excluded_indices: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``topk_dense`` for each row of ``queries`` (float32[b, d]).

    Row r excludes ``excluded_indices[excluded_indptr[r]:excluded_indptr[r + 1]]`` (CSR, each
    row sorted). Returns (positions int64[b, k], scores float32[b, k], counts int64[b]); row r
    holds ``counts[r]`` results, identical to the single-query kernel's.
    """
    b = queries.shape[0]
    k = min(k, vectors.shape[0])
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_s = np.zeros((b, k), dtype=np.float32)
    counts = np.zeros(b, dtype=np.int64)
    for r in range(b):
        excluded = excluded_indices[excluded_indptr[r] : excluded_indptr[r + 1]]
        items, scores = topk_dense(queries[r], vectors, bias, excluded, k)
        m = items.shape[0]
        out_i[r, :m] = items
        out_s[r, :m] = scores
        counts[r] = m
    return out_i, out_s, counts


def warm_up() -> None:
    """Compile and run every kernel once, so no request pays for JIT compilation."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 4)).astype(np.float32)
    bias = np.zeros(8, dtype=np.float32)
    excluded = np.array([1, 3], dtype=np.int64)
    query = vectors[0].copy()
    topk_dense(query, vectors, bias, excluded, 3)
    topk_candidates(query, vectors, bias, np.array([0, 2, 2, 5], dtype=np.int64), excluded, 3)
    topk_dense_batch(vectors[:2].copy(), vectors, bias, np.array([0, 2, 2]), excluded, 3)
