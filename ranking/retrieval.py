"""Retrieval behind one small interface: exact scan (the fallback and oracle) and faiss HNSW.

The faiss index holds each item as ``[vector, bias]`` and is queried with ``[query, 1]``, so
its inner product is exactly the kernel's score ``vector · query + bias``: the index retrieves
by the same score the kernel ranks by. The candidates are then re-scored exactly by the
kernel (which also applies the exclusions and the ID tie-break).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from ranking import kernels
from ranking.snapshot import INDEX_FILE, Snapshot

log = logging.getLogger(__name__)

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80


class Retriever(Protocol):
    name: str

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` items for ``query`` (float32[d]) by vector · query + bias, minus
        ``excluded`` (sorted int64 positions): (positions int64[k'], scores float32[k'])."""
        ...


class ExactRetriever:
    """Scores every item with the fused kernel."""

    name = "exact"

    def __init__(self, vectors: np.ndarray, bias: np.ndarray) -> None:
        self._vectors = vectors
        self._bias = bias

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        result: tuple[np.ndarray, np.ndarray] = kernels.topk_dense(
            query, self._vectors, self._bias, excluded, k
        )
        return result


class FaissRetriever:
    """HNSW candidates, exactly re-scored; falls back to the exact scan if the index fails."""

    name = "faiss-hnsw"

    def __init__(
        self, index: faiss.Index, vectors: np.ndarray, bias: np.ndarray, *, oversample: int = 4
    ) -> None:
        self._index = index
        self._vectors = vectors
        self._bias = bias
        self._oversample = oversample
        self._exact = ExactRetriever(vectors, bias)

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            return self._exact.top_k(query, excluded, 0)
        wanted = (k + len(excluded)) * self._oversample
        try:
            # faiss's bundled stubs predate SearchParametersHNSW
            params = faiss.SearchParametersHNSW(efSearch=max(wanted, 64))  # type: ignore[attr-defined]
            augmented = np.append(query, np.float32(1.0)).reshape(1, -1)
            _, found = self._index.search(augmented, wanted, params=params)
        except (RuntimeError, ValueError):
            log.exception("faiss search failed; using the exact scan")
            return self._exact.top_k(query, excluded, k)
        candidates = found[0][found[0] >= 0].astype(np.int64)
        items, scores = kernels.topk_candidates(
            query, self._vectors, self._bias, candidates, excluded, k
        )
        if len(items) < min(k, len(self._vectors) - len(excluded)):
            return self._exact.top_k(query, excluded, k)
        return items, scores


def build_index(vectors: np.ndarray, bias: np.ndarray) -> faiss.Index:
    """An inner-product HNSW index over ``[vectors, bias]`` (float32[n, d + 1])."""
    augmented = np.hstack([vectors, bias.reshape(-1, 1)]).astype(np.float32)
    index = faiss.IndexHNSWFlat(augmented.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(augmented)
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def retriever_for(snapshot: Snapshot) -> Retriever:
    """The retriever a loaded snapshot calls for: faiss if it ships an index, else exact."""
    path = snapshot.path / INDEX_FILE
    if path.exists():
        index = faiss.read_index(str(path))
        if index.ntotal == snapshot.n_items and index.d == snapshot.dim + 1:
            return FaissRetriever(index, snapshot.item_vectors, snapshot.item_bias)
        log.error("index %s does not match its snapshot; using the exact scan", path)
    return ExactRetriever(snapshot.item_vectors, snapshot.item_bias)
