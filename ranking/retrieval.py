"""Retrieval behind one small interface: exact scan (the fallback and oracle) and faiss.

The faiss index holds each item as ``[vector, bias]`` and is queried with ``[query, 1]``, so
its inner product is exactly the kernel's score ``vector · query + bias``: the index retrieves
by the same score the kernel ranks by. The candidates are then re-scored exactly by the
kernel (which also applies the exclusions and the ID tie-break).

The index is built with the bias of the scope's profile at build time (the snapshot's
``item_bias``). A profile or A/B variant that serves another bias (ranking/scoring.py) shares
the index through ``with_bias``: candidates still come from the index by the build-time bias,
but the popular head is taken and every candidate re-scored by the serve-time bias, so the
answer's scores and order are exact among the candidates; only recall can differ (an item
that the new weights alone lift into a top k, outside the new head, can be missed).

The index ``build_index`` makes, chosen by measurement (tests/bench/retrieval.py): IVF-Flat
over the augmented vectors with about sqrt(n) lists, plus a *popular head*: the ``head``
items of highest bias are re-scored for every query whatever the index returns. On a
clustered catalog with popularity-skewed bias almost every item IVF misses is such a popular
item, lifted into a user's top k by its bias while its vector sits in a list the query does
not probe; re-scoring the head catches them for ``head`` dot products. HNSW (the earlier
choice) reached lower recall at several times the cost on the same data and builds ~10x
slower; HNSW indexes written by earlier builds still load and are searched as before.

Cold items, those whose vector is all zero (no interactions to learn one from yet; a real
catalog holds many), are left out of the IVF index: their score is their bias whatever the
query, so the best of them are the same for every query, and the retriever adds the
``k + excluded`` cold items of highest bias to every query's candidates, which is exact for
them. In the index they would share one list that nearly every query probes, since its
centroid scores high for every query: at 35 % cold items that made each query scan a third
of the catalog.

How hard to search (lists probed, HNSW beam width, head size) is a ``SearchParams``;
``tune_search`` picks the cheapest one that reaches a recall target on sample queries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from features.errors import DeadlineExceeded, SnapshotError
from ranking import kernels
from ranking.snapshot import INDEX_FILE, Snapshot

log = logging.getLogger(__name__)

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
# IVF lists: about sqrt(n), with at least IVF_MIN_POINTS_PER_LIST items to train each one
IVF_MIN_POINTS_PER_LIST = 39
IVF_TRAIN_POINTS_PER_LIST = 64  # k-means trains on a sample of this many items per list
# untuned defaults (tune_search measures better ones): lists probed and popular-head size
IVF_DEFAULT_NPROBE = 8
DEFAULT_HEAD = 1000
# MANIFEST key under which a build job may record tuned SearchParams (see retriever_for)
SEARCH_PARAMS_KEY = "search"
ONE_ROW = np.zeros(1, dtype=np.int64)  # ``rows`` of a one-query batch


class Retriever(Protocol):
    name: str

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` items for ``query`` (float32[d]) by vector · query + bias, minus
        ``excluded`` (sorted int64 positions): (positions int64[k'], scores float32[k']).
        A scan of the catalog stops with DeadlineExceeded once ``deadline`` (a
        ``time.monotonic()`` value) has passed (see ``scan_top_k``)."""
        ...

    def with_bias(self, bias: np.ndarray) -> Retriever:
        """The same retriever ranking by ``bias`` (float32[n]) instead (a profile's
        serve-time bias); an index is shared, not rebuilt."""
        ...

    def top_k_batch(
        self, queries: np.ndarray, excluded_indptr: np.ndarray, excluded_indices: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``top_k`` for each row of ``queries`` (float32[b, d]), row r excluding
        ``excluded_indices[excluded_indptr[r]:excluded_indptr[r + 1]]`` (CSR, rows sorted):
        (positions int64[b, k], scores float32[b, k], counts int64[b]), row r holding
        ``counts[r]`` results, the same as ``top_k`` gives for that row."""
        ...


@dataclass(frozen=True)
class SearchParams:
    """How hard a faiss index is searched.

    ``nprobe``: IVF lists probed (0: the index's own ``nprobe``). ``ef_search``: HNSW beam
    width (0: the earlier rule, ``max(4 * (k + excluded), 64)``). ``head``: how many items of
    highest bias are re-scored for every query on top of the index's candidates.
    """

    nprobe: int = 0
    ef_search: int = 0
    head: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchParams:
        return cls(**{f: int(data[f]) for f in ("nprobe", "ef_search", "head") if f in data})


class ExactRetriever:
    """Scores every item with the fused kernel."""

    name = "exact"

    def __init__(self, vectors: np.ndarray, bias: np.ndarray) -> None:
        self._vectors = vectors
        self._bias = bias

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return scan_top_k(query, self._vectors, self._bias, excluded, k, deadline)

    def with_bias(self, bias: np.ndarray) -> ExactRetriever:
        return ExactRetriever(self._vectors, bias)

    def top_k_batch(
        self, queries: np.ndarray, excluded_indptr: np.ndarray, excluded_indices: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result: tuple[np.ndarray, np.ndarray, np.ndarray] = kernels.topk_dense_batch(
            queries, self._vectors, self._bias, excluded_indptr, excluded_indices, k
        )
        return result


SCAN_CHUNK_ITEMS = 65_536  # items scored between two deadline checks: a few ms of work


def scan_top_k(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    excluded: np.ndarray,
    k: int,
    deadline: float | None = None,
    chunk_items: int = SCAN_CHUNK_ITEMS,
) -> tuple[np.ndarray, np.ndarray]:
    """``kernels.topk_dense``, in chunks of ``chunk_items`` items with ``deadline`` (a
    ``time.monotonic()`` value) checked before each: DeadlineExceeded once it has passed, so
    a request its caller gave up on stops costing CPU. One heap runs across the chunks, so
    the result is the single pass's, bit for bit."""
    n = len(vectors)
    if deadline is None or n <= chunk_items:
        result: tuple[np.ndarray, np.ndarray] = kernels.topk_dense(
            query, vectors, bias, excluded, k
        )
        return result
    heap_s, heap_i = kernels.topk_init(k)
    size = 0
    for start in range(0, n, chunk_items):
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's time budget ran out while scoring")
        stop = min(start + chunk_items, n)
        size = kernels.topk_dense_chunk(
            query, vectors, bias, excluded, k, start, stop, heap_s, heap_i, size
        )
    chunked: tuple[np.ndarray, np.ndarray] = kernels.topk_finalize(heap_s, heap_i, size)
    return chunked


def popular_order(bias: np.ndarray) -> np.ndarray:
    """All positions (int64[n]) by bias descending, ties to the lower position."""
    return np.argsort(-np.asarray(bias, dtype=np.float64), kind="stable").astype(np.int64)


def cold_positions(vectors: np.ndarray) -> np.ndarray:
    """Positions (int64, ascending) of the items whose vector (row of float32[n, d]) is all
    zero: their score is their bias, whatever the query."""
    return np.flatnonzero(~np.any(np.asarray(vectors) != 0, axis=1)).astype(np.int64)


def popular_head(bias: np.ndarray, size: int, by_bias: np.ndarray | None = None) -> np.ndarray:
    """Positions (int64, ascending) of the ``size`` items of highest bias, ties to the lower
    position; ``by_bias`` is ``popular_order(bias)`` if already computed."""
    size = max(0, min(size, len(bias)))
    if size == 0:
        return np.empty(0, dtype=np.int64)
    order = popular_order(bias) if by_bias is None else by_bias
    return np.sort(order[:size]).astype(np.int64)


def default_params(index: faiss.Index) -> SearchParams:
    """What an index is searched with when nobody tuned it: IVF gets its own ``nprobe`` and
    the default popular head; any other index (HNSW from earlier builds) the earlier rule."""
    if isinstance(index, faiss.IndexIVF):
        return SearchParams(nprobe=int(index.nprobe), head=DEFAULT_HEAD)
    return SearchParams()


class FaissRetriever:
    """faiss candidates plus the popular head, exactly re-scored; falls back to the exact
    scan if the index fails or yields too few items."""

    def __init__(
        self,
        index: faiss.Index,
        vectors: np.ndarray,
        bias: np.ndarray,
        *,
        oversample: int = 4,
        params: SearchParams | None = None,
        by_bias: np.ndarray | None = None,
        cold: np.ndarray | None = None,
    ) -> None:
        """``by_bias``: all positions ordered by bias descending (``popular_order(bias)``),
        and ``cold``: ``cold_positions(vectors)``, if the caller has them, to save computing
        them."""
        self._index = index
        self._vectors = vectors
        self._bias = bias
        self._oversample = oversample
        self._exact = ExactRetriever(vectors, bias)
        self.params = params if params is not None else default_params(index)
        self._head = popular_head(bias, self.params.head, by_bias)
        self._cold = cold_positions(vectors) if cold is None else cold
        # the cold items by bias descending, ties to the lower position (the kernels' order)
        order = np.argsort(-np.asarray(bias)[self._cold].astype(np.float64), kind="stable")
        self._cold_by_bias = self._cold[order]
        # a contiguous copy of the head's rows: scanned like a small catalog (same bits)
        self._head_vectors = np.ascontiguousarray(vectors[self._head], dtype=np.float32)
        self._head_bias = np.ascontiguousarray(bias[self._head], dtype=np.float32)
        if isinstance(index, faiss.IndexIVF):
            self.name = "faiss-ivf"
        elif isinstance(index, faiss.IndexHNSW):
            self.name = "faiss-hnsw"
        else:
            self.name = "faiss"

    def with_bias(self, bias: np.ndarray) -> FaissRetriever:
        """The index keeps the bias it was built with (its candidates are found by that
        score); the popular head and the exact re-score use ``bias``. Exact when ``bias`` is
        the build's; otherwise an item that only the new bias lifts into a top k can be
        missed, unless it is in the new head (the items of highest new bias)."""
        return FaissRetriever(
            self._index,
            self._vectors,
            bias,
            oversample=self._oversample,
            params=self.params,
            cold=self._cold,
        )

    @property
    def _oversampling(self) -> int:
        """How many results a search asks faiss for per candidate wanted."""
        if isinstance(self._index, faiss.IndexIVF):
            return 1
        if isinstance(self._index, faiss.IndexHNSW) and self.params.ef_search:
            return 1
        return self._oversample  # HNSW by the earlier rule, and any other index

    def _hnsw_beam(self, results: int | np.ndarray) -> Any:
        """HNSW's efSearch for a search asked for ``results``: tuned, at least as wide as the
        results; by the earlier rule, at least 64."""
        return np.maximum(self.params.ef_search or 64, results)

    def _search(self, augmented: np.ndarray, wanted: int) -> np.ndarray:
        """faiss's candidates (int64[b, wanted * _oversampling], may hold -1) for augmented
        queries (float32[b, d + 1]), each row best first."""
        params = self.params
        wanted *= self._oversampling
        if isinstance(self._index, faiss.IndexIVF):
            search = faiss.SearchParametersIVF()
            search.nprobe = params.nprobe or int(self._index.nprobe)
        elif isinstance(self._index, faiss.IndexHNSW):
            search = faiss.SearchParametersHNSW(efSearch=int(self._hnsw_beam(wanted)))  # type: ignore[attr-defined]
        else:
            search = None
        _, found = self._index.search(augmented, wanted, params=search)
        candidates: np.ndarray = found
        return candidates

    def top_k(
        self, query: np.ndarray, excluded: np.ndarray, k: int, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            return self._exact.top_k(query, excluded, 0)
        # excluded items may take slots among the index's answers
        wanted = k + len(excluded)
        queries = query.reshape(1, -1)
        try:
            found = self._search(_augment(queries), wanted)
        except (RuntimeError, ValueError):
            log.exception("faiss search failed; using the exact scan")
            return self._exact.top_k(query, excluded, k, deadline)
        indptr = np.array([0, len(excluded)], dtype=np.int64)
        items, scores, counts = self._rescore(
            queries, ONE_ROW, found, np.array([found.shape[1]]), indptr, excluded, k, deadline
        )
        return items[0, : counts[0]], scores[0, : counts[0]]

    def top_k_batch(
        self, queries: np.ndarray, excluded_indptr: np.ndarray, excluded_indices: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """faiss searches for the batch (faiss spreads each over its threads), then each row
        cut to the candidates ``top_k`` would have asked for and re-scored as it does. Rows
        are searched in size classes (k plus their exclusions, to the next power of two): a
        search costs with the number of results it is asked for, and one user with thousands
        of seen items would otherwise set that number for the whole batch. On HNSW, by the
        beam each row's own search would use."""
        b = len(queries)
        k = min(k, len(self._vectors))
        out_i = np.full((b, k), -1, dtype=np.int64)
        out_s = np.zeros((b, k), dtype=np.float32)
        counts = np.zeros(b, dtype=np.int64)
        if b == 0 or k <= 0:
            return out_i, out_s, counts
        wanted = k + np.diff(excluded_indptr)
        size_class = np.ceil(np.log2(wanted)).astype(np.int64)
        if isinstance(self._index, faiss.IndexHNSW):
            # HNSW's beam widens with the results asked for, and a wider beam finds other
            # candidates: rows share a search only where their own would use the same beam
            size_class = self._hnsw_beam(wanted * self._oversampling)
        try:
            augmented = _augment(queries)
            for members in (np.flatnonzero(size_class == c) for c in np.unique(size_class)):
                found = self._search(augmented[members], int(wanted[members].max()))
                out_i[members], out_s[members], counts[members] = self._rescore(
                    queries,
                    members,
                    found,
                    wanted[members] * self._oversampling,
                    excluded_indptr,
                    excluded_indices,
                    k,
                )
        except (RuntimeError, ValueError):
            log.exception("faiss search failed; using the exact scan")
            return self._exact.top_k_batch(queries, excluded_indptr, excluded_indices, k)
        return out_i, out_s, counts

    def _rescore(
        self,
        queries: np.ndarray,
        rows: np.ndarray,
        found: np.ndarray,
        found_counts: np.ndarray,
        excluded_indptr: np.ndarray,
        excluded_indices: np.ndarray,
        k: int,
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact top k among faiss's candidates (row i: ``found[i, :found_counts[i]]``
        for query ``rows[i]``), the popular head and the best cold items
        (``kernels.topk_rescore``); the exact scan for a row where they hold too few."""
        items, scores, counts = kernels.topk_rescore(
            queries,
            rows,
            found,
            found_counts,
            self._vectors,
            self._bias,
            self._head,
            self._head_vectors,
            self._head_bias,
            self._cold_by_bias,
            excluded_indptr,
            excluded_indices,
            k,
        )
        n = len(self._vectors)
        for i in np.flatnonzero(counts < min(k, n)):
            r = rows[i]
            excluded = excluded_indices[excluded_indptr[r] : excluded_indptr[r + 1]]
            # exclusions may repeat (the kernels' contract): count the items they remove
            if counts[i] >= min(k, n - len(np.unique(excluded))):
                continue
            exact_items, exact_scores = self._exact.top_k(queries[r], excluded, k, deadline)
            items[i, : len(exact_items)], scores[i, : len(exact_items)] = exact_items, exact_scores
            counts[i] = len(exact_items)
        return items, scores, counts


def _augment(queries: np.ndarray) -> np.ndarray:
    """``[query, 1]`` rows (float32[b, d + 1], C order): the index's inner product is then
    vector · query + bias, the kernel's score."""
    ones = np.ones((len(queries), 1), dtype=np.float32)
    return np.ascontiguousarray(np.hstack([np.asarray(queries, dtype=np.float32), ones]))


def ivf_lists(n: int) -> int:
    """IVF lists for n items: about sqrt(n), each with enough items to train it."""
    return max(1, min(math.isqrt(max(n, 1)), n // IVF_MIN_POINTS_PER_LIST))


def build_index(
    vectors: np.ndarray,
    bias: np.ndarray,
    *,
    kind: str = "ivf",
    nlist: int | None = None,
    hnsw_neighbours: int = HNSW_NEIGHBOURS,
) -> faiss.Index:
    """An inner-product index over ``[vectors, bias]`` (float32[n, d + 1]); its IDs are the
    items' positions.

    ``kind="ivf"`` (the default): IVF-Flat over the items that are not cold (see
    ``cold_positions``), with ``nlist`` lists (default ``ivf_lists`` of their count), k-means
    trained on a fixed-seed sample, ``nprobe`` preset to ``IVF_DEFAULT_NPROBE``
    (``tune_search`` measures a better one). ``kind="hnsw"``: HNSW-Flat over every item, as
    earlier builds made.
    """
    dim = vectors.shape[1] + 1
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_neighbours, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(_augmented_items(vectors, bias, np.arange(len(vectors), dtype=np.int64)))
        return index
    if kind != "ivf":
        raise ValueError(f"unknown index kind {kind!r} (known: ivf, hnsw)")
    warm = np.setdiff1d(np.arange(len(vectors), dtype=np.int64), cold_positions(vectors))
    if len(warm) == 0:  # nothing to train on: an empty exact index
        return faiss.IndexFlatIP(dim)
    return ivf_index(vectors, bias, warm, nlist or ivf_lists(len(warm)))


def _augmented_items(vectors: np.ndarray, bias: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``[vector, bias]`` rows (float32[m, d + 1], C order) of the items ``ids`` (int64[m])."""
    return np.hstack([vectors[ids], bias[ids].reshape(-1, 1)]).astype(np.float32)


def ivf_index(
    vectors: np.ndarray, bias: np.ndarray, ids: np.ndarray, nlist: int
) -> faiss.IndexIVFFlat:
    """IVF-Flat over ``[vector, bias]`` of the items ``ids`` (int64[m], m >= 1), stored under
    their positions: ``nlist`` lists, k-means trained on a fixed-seed sample of them,
    ``nprobe`` preset to ``IVF_DEFAULT_NPROBE``."""
    augmented = _augmented_items(vectors, bias, ids)
    m, dim = augmented.shape
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train_size = min(m, nlist * IVF_TRAIN_POINTS_PER_LIST)
    sample = np.random.default_rng(0).choice(m, size=train_size, replace=False)
    ivf.train(augmented[np.sort(sample)])
    ivf.add_with_ids(augmented, ids)
    ivf.nprobe = min(IVF_DEFAULT_NPROBE, nlist)
    return ivf


def search_recall(
    index: faiss.Index,
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    params: SearchParams,
    truth: np.ndarray | None = None,
    by_bias: np.ndarray | None = None,
) -> float:
    """Mean recall@k of ``FaissRetriever(index, ..., params=params)`` against the exact scan
    over ``queries`` (float32[q, d]), no exclusions. ``truth``: the exact top-k positions
    (int64[q, k]) if already known; ``by_bias``: ``popular_order(bias)`` if known."""
    recalls = query_recalls(index, vectors, bias, queries, k, params, truth, by_bias)
    return float(recalls.mean()) if len(recalls) else 1.0


def query_recalls(
    index: faiss.Index,
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    params: SearchParams,
    truth: np.ndarray | None = None,
    by_bias: np.ndarray | None = None,
    excluded: Sequence[np.ndarray] | None = None,
    cold: np.ndarray | None = None,
) -> np.ndarray:
    """``search_recall`` per query (float64[q]); ``excluded[row]`` (sorted int64) are the
    positions query ``row`` excludes, as serving does with a user's seen items; ``cold``:
    ``cold_positions(vectors)`` if known."""
    if truth is None:
        truth = exact_top_k(vectors, bias, queries, k, excluded)
    retriever = FaissRetriever(index, vectors, bias, params=params, by_bias=by_bias, cold=cold)
    none = np.empty(0, dtype=np.int64)
    recalls = np.ones(len(queries))
    for row, (query, want) in enumerate(zip(queries, truth, strict=True)):
        mask = none if excluded is None else excluded[row]
        want = want[want >= 0]
        got, _ = retriever.top_k(np.ascontiguousarray(query), mask, k)
        if len(want):
            recalls[row] = len(np.intersect1d(got, want)) / len(want)
    return recalls


def exact_top_k(
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    excluded: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """The exact top-k positions for each query (int64[q, min(k, n)], -1 padded), minus
    ``excluded[row]`` (sorted int64) for query ``row`` if given."""
    rows = excluded if excluded is not None else [np.empty(0, np.int64)] * len(queries)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate([*rows, np.empty(0, np.int64)]).astype(np.int64)
    items, _, _ = kernels.topk_dense_batch(
        np.ascontiguousarray(queries, dtype=np.float32), vectors, bias, indptr, indices, k
    )
    truth: np.ndarray = items
    return truth


@dataclass(frozen=True)
class Tuning:
    """What ``tune_search`` chose and measured: ``params`` reached mean ``recall`` on the
    sample (``recall_low``: that less ``margin_se`` standard errors) at ``ms_per_query`` (one
    thread, batch of one). ``met`` is False if no setting tried reached the target; ``params``
    is then the one of highest recall."""

    params: SearchParams
    recall: float
    recall_low: float
    ms_per_query: float
    met: bool


def tune_search(
    index: faiss.Index,
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    target_recall: float = 0.95,
    *,
    heads: tuple[int, ...] = (0, 250, 500, 1000, 2000, 4000),
    margin_se: float = 1.645,
    excluded: Sequence[np.ndarray] | None = None,
) -> SearchParams:
    """The cheapest ``SearchParams`` whose recall@k on ``queries`` reaches ``target_recall``.

    ``queries`` (float32[q, d]) should be a sample of real ones (user vectors), a few hundred.
    A setting qualifies when its mean recall on the sample, less ``margin_se`` standard errors
    of that mean, reaches the target, so that queries outside the sample reach it too (1.645:
    one-sided 95 %; 0 to take the sample at its word). For each head size the smallest
    ``nprobe`` (IVF) or ``ef_search`` (HNSW) that qualifies is found (recall grows with both,
    so the search stops there); of those, the one of lowest measured time per query (one
    faiss thread, batch of one) wins. ``tune_search_report`` also returns the measurements.
    ``excluded[row]``: what query ``row`` excludes when served (a user's seen items), so
    recall is measured as requests are answered.
    """
    return tune_search_report(
        index,
        vectors,
        bias,
        queries,
        k,
        target_recall,
        heads=heads,
        margin_se=margin_se,
        excluded=excluded,
    ).params


def _knob_values(index: faiss.Index, k: int) -> list[SearchParams]:
    if isinstance(index, faiss.IndexIVF):
        values = sorted(
            {min(p, index.nlist) for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)}
            | {p for p in (192, 256, 384, 512, 1024, 2048, 4096) if p < index.nlist}
            | {index.nlist}
        )
        return [SearchParams(nprobe=p) for p in values]
    if isinstance(index, faiss.IndexHNSW):
        widths = sorted({max(k, int(k * f)) for f in (1, 1.5, 2, 3, 4, 6, 8, 12, 16)})
        return [SearchParams(ef_search=w) for w in widths]
    raise ValueError(f"cannot tune a {type(index).__name__}")


def tune_search_report(
    index: faiss.Index,
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    target_recall: float = 0.95,
    *,
    heads: tuple[int, ...] = (0, 250, 500, 1000, 2000, 4000),
    margin_se: float = 1.645,
    excluded: Sequence[np.ndarray] | None = None,
) -> Tuning:
    """``tune_search`` with its measurements."""
    truth = exact_top_k(vectors, bias, queries, k, excluded)
    by_bias, cold = popular_order(bias), cold_positions(vectors)
    heads = tuple(sorted({min(h, len(bias)) for h in heads}))
    feasible: list[tuple[SearchParams, float, float]] = []
    best: tuple[float, float, SearchParams] | None = None
    for head in heads:
        for knob in _knob_values(index, k):
            params = SearchParams(nprobe=knob.nprobe, ef_search=knob.ef_search, head=head)
            recalls = query_recalls(
                index, vectors, bias, queries, k, params, truth, by_bias, excluded, cold
            )
            mean = float(recalls.mean()) if len(recalls) else 1.0
            spread = float(recalls.std(ddof=1)) if len(recalls) > 1 else 0.0
            low = mean - margin_se * spread / math.sqrt(max(1, len(recalls)))
            if best is None or low > best[1]:
                best = (mean, low, params)
            if low >= target_recall:
                feasible.append((params, mean, low))
                break
    if not feasible:
        assert best is not None
        mean, low, params = best
        ms = time_per_query(index, vectors, bias, queries, k, params, by_bias, cold)
        log.warning("no search setting reached recall %.3f; best %s", target_recall, params)
        return Tuning(params, mean, low, ms, met=False)
    timed = [
        (time_per_query(index, vectors, bias, queries, k, p, by_bias, cold), p, mean, low)
        for p, mean, low in feasible
    ]
    ms, params, mean, low = min(timed, key=lambda t: t[0])
    log.info("tuned %s: recall@%d %.3f (>= %.3f) at %.3f ms per query", params, k, mean, low, ms)
    return Tuning(params, mean, low, ms, met=True)


def time_per_query(
    index: faiss.Index,
    vectors: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    params: SearchParams,
    by_bias: np.ndarray | None = None,
    cold: np.ndarray | None = None,
) -> float:
    """Median milliseconds of ``FaissRetriever.top_k`` per query, one faiss thread, batch of
    one, no exclusions (timing is noisy on a busy machine: use a few hundred queries)."""
    retriever = FaissRetriever(index, vectors, bias, params=params, by_bias=by_bias, cold=cold)
    none = np.empty(0, dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        retriever.top_k(np.ascontiguousarray(queries[0]), none, k)  # warm
        times = []
        for query in queries:
            q = np.ascontiguousarray(query)
            start = time.perf_counter()
            retriever.top_k(q, none, k)
            times.append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times) * 1e3)


def read_index(path: Path) -> faiss.Index:
    """The index at ``path``, memory-mapped where faiss can (IVF-Flat: its lists stay in the
    page cache, shared by every worker, not copied into each process), else read."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def retriever_for(snapshot: Snapshot) -> Retriever:
    """The retriever a loaded snapshot calls for: faiss if it ships an index, else exact.

    Search settings come from the manifest's ``SEARCH_PARAMS_KEY`` entry if the build
    recorded one (``SearchParams.to_dict()``), else from ``default_params``.
    """
    path = snapshot.path / INDEX_FILE
    if INDEX_FILE in snapshot.manifest.get("files", {}):  # so loading verified its checksum
        try:
            index = read_index(path)
        except RuntimeError as exc:  # e.g. written by a faiss this one cannot read
            raise SnapshotError(f"{path}: faiss cannot read it: {exc}") from exc
        cold = cold_positions(snapshot.item_vectors)
        # every item (earlier builds, HNSW) or every item that is not cold (IVF)
        sizes = (snapshot.n_items, snapshot.n_items - len(cold))
        if index.ntotal in sizes and index.d == snapshot.dim + 1:
            recorded = snapshot.manifest.get(SEARCH_PARAMS_KEY)
            params = SearchParams.from_dict(recorded) if isinstance(recorded, dict) else None
            return FaissRetriever(
                index, snapshot.item_vectors, snapshot.item_bias, params=params, cold=cold
            )
        log.error("index %s does not match its snapshot; using the exact scan", path)
    return ExactRetriever(snapshot.item_vectors, snapshot.item_bias)
