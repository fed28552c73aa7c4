"""Scoring kernels: pure numba functions over arrays. No I/O, no logging, no globals.

Conventions for every kernel here:
- ``vectors`` is float32[n, d] C-contiguous (item embeddings), ``query`` float32[d];
- ``bias`` is float32[n], a per-item additive score (popularity, recency boosts);
- ``excluded`` is int64[e], sorted ascending (duplicates allowed), positions never returned;
- item positions are ordered by item ID in a snapshot, so "ties break by ID" means the lower
  position wins an equal score; results are deterministic;
- results come best first as (positions int64[k'], scores float32[k']) with k' <= k.

The score of item i is ``dot(query, vectors[i]) + bias[i]`` in float32, with the dot product
summed in one fixed order (see ``_dot_intrinsic``): every kernel and every array layout computes the
same bits for the same item, so the single, batched, chunked and candidate kernels agree
exactly, and a plain numpy reference can reproduce them (tests/test_kernels.py).

The top-k uses a bounded min-heap of size k: one pass, no full sort, no catalog-sized
temporary. Once the heap is full, an item is only offered if its score reaches the worst kept
score (one compare), so the heap is touched for a vanishing share of a large catalog.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

# The dot product's summation order, part of the score's definition (not a tunable): lane l
# of 16 sums the products of the dimensions j with j % 16 == l in increasing j, then the lanes
# are added pairwise (l + l+8, then + l+4, + l+2, + l+1). Changing it changes scores' low bits.
DOT_LANES = 16


def _element_pointer(
    context: Any, builder: ir.IRBuilder, ty: types.Array, arr: Any, indices: list[ir.Value]
) -> ir.Value:
    return cgutils.get_item_pointer2(
        context,
        builder,
        data=arr.data,
        shape=cgutils.unpack_tuple(builder, arr.shape),
        strides=cgutils.unpack_tuple(builder, arr.strides),
        layout=ty.layout,
        inds=indices,
        wraparound=False,
    )


def _dot_intrinsic(typingctx: Any, query: Any, vectors: Any, row: Any) -> Any:
    """float32 dot product of ``query`` (float32[d]) and ``vectors[row]`` (float32[n, d]).

    Summed in DOT_LANES float32 lanes (an explicit SIMD vector, so the inner loop is
    vectorized without fastmath): lane l accumulates ``query[j] * vectors[row, j]`` for
    ``j % DOT_LANES == l`` in increasing j, starting from +0.0; the lanes are then reduced by
    pairwise halving. Multiplies and adds are separate IEEE float32 operations (no FMA), so
    the result is the same on every CPU. C-contiguous inputs load 16 floats at a time; any
    other layout gives the same result through scalar loads. Uses the first
    ``min(len(query), vectors.shape[1])`` dimensions; ``row`` must be in range.
    """
    for name, arg, ndim in (("query", query, 1), ("vectors", vectors, 2)):
        if not (isinstance(arg, types.Array) and arg.ndim == ndim and arg.dtype == types.float32):
            raise TypingError(f"_dot: {name} must be a float32 array of {ndim} dimension(s)")
    if not isinstance(row, types.Integer):
        raise TypingError("_dot: row must be an integer")
    sig = types.float32(query, vectors, row)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> ir.Value:
        q_ty, v_ty, row_ty = signature.args
        q = context.make_array(q_ty)(context, builder, args[0])
        v = context.make_array(v_ty)(context, builder, args[1])
        row_index = context.cast(builder, args[2], row_ty, types.intp)
        intp = context.get_value_type(types.intp)
        i32 = ir.IntType(32)
        vec = ir.VectorType(ir.FloatType(), DOT_LANES)
        d_q = builder.extract_value(q.shape, 0)
        d_v = builder.extract_value(v.shape, 1)
        d = builder.select(builder.icmp_signed("<", d_q, d_v), d_q, d_v)
        n_full = builder.sdiv(d, ir.Constant(intp, DOT_LANES))
        done = builder.mul(n_full, ir.Constant(intp, DOT_LANES))
        acc = cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * DOT_LANES))

        def q_ptr(j: ir.Value) -> ir.Value:
            return _element_pointer(context, builder, q_ty, q, [j])

        def v_ptr(j: ir.Value) -> ir.Value:
            return _element_pointer(context, builder, v_ty, v, [row_index, j])

        def add_product(lane: ir.Value, j: ir.Value) -> None:
            product = builder.fmul(builder.load(q_ptr(j)), builder.load(v_ptr(j)))
            lanes = builder.load(acc)
            total = builder.fadd(builder.extract_element(lanes, lane), product)
            builder.store(builder.insert_element(lanes, total, lane), acc)

        contiguous = q_ty.layout == "C" and v_ty.layout == "C"
        with cgutils.for_range(builder, n_full) as chunk:
            start = builder.mul(chunk.index, ir.Constant(intp, DOT_LANES))
            if contiguous:
                q_vec = builder.load(builder.bitcast(q_ptr(start), vec.as_pointer()), align=4)
                v_vec = builder.load(builder.bitcast(v_ptr(start), vec.as_pointer()), align=4)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(q_vec, v_vec)), acc)
            else:
                for lane in range(DOT_LANES):
                    add_product(ir.Constant(i32, lane), builder.add(start, ir.Constant(intp, lane)))
        with cgutils.for_range(builder, builder.sub(d, done)) as tail:
            add_product(builder.trunc(tail.index, i32), builder.add(done, tail.index))

        lanes = builder.load(acc)
        width = DOT_LANES // 2
        while width >= 1:
            low = ir.Constant(ir.VectorType(i32, width), list(range(width)))
            high = ir.Constant(ir.VectorType(i32, width), list(range(width, 2 * width)))
            lanes = builder.fadd(
                builder.shuffle_vector(lanes, lanes, low),
                builder.shuffle_vector(lanes, lanes, high),
            )
            width //= 2
        return builder.extract_element(lanes, ir.Constant(i32, 0))

    return sig, codegen


# called from njit code as ``_dot(query, vectors, row) -> float32``
_dot = cast(Callable[..., Any], intrinsic(_dot_intrinsic))


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


@njit(cache=True, nogil=True, error_model="numpy")
def _scan(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    start: int,
    stop: int,
    heap_s: np.ndarray,
    heap_i: np.ndarray,
    size: int,
    k: int,
) -> int:
    """Offer every item in [start, stop) (none excluded) to the heap; returns the new size."""
    item = start
    while size < k and item < stop:
        score = _dot(query, vectors, item) + bias[item]
        size = _heap_offer(heap_s, heap_i, size, k, score, item)
        item += 1
    for i in range(item, stop):
        score = _dot(query, vectors, i) + bias[i]
        # the heap is full: most items fail this one compare against the worst kept score
        if score >= heap_s[0] and _better(score, i, heap_s[0], heap_i[0]):
            heap_s[0] = score
            heap_i[0] = i
            _sift_down(heap_s, heap_i, size, 0)
    return size


@njit(cache=True, nogil=True)
def topk_init(k: int) -> tuple[np.ndarray, np.ndarray]:
    """An empty top-k heap for ``topk_dense_chunk``: (scores float32[max(k, 1)],
    positions int64[max(k, 1)]), holding 0 items."""
    capacity = max(k, 1)
    return np.empty(capacity, dtype=np.float32), np.empty(capacity, dtype=np.int64)


@njit(cache=True, nogil=True, error_model="numpy")
def topk_dense_chunk(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    excluded: np.ndarray,
    k: int,
    start: int,
    stop: int,
    heap_s: np.ndarray,
    heap_i: np.ndarray,
    size: int,
) -> int:
    """Offer the items at positions [start, stop) to a top-k heap; returns the heap's new size.

    The same inputs as ``topk_dense`` plus a heap from ``topk_init(k)`` (``heap_s``
    float32[>= k], ``heap_i`` int64[>= k]) holding ``size`` items. Scanning [0, n) in
    disjoint chunks, in any order and with the same ``k`` and ``excluded`` every call, then
    calling ``topk_finalize`` gives
    exactly ``topk_dense``'s answer; a caller can check a deadline between chunks. ``stop``
    is clipped to n, ``k`` to the heap's capacity; a chunk costs about (stop - start) * d
    multiply-adds and reads (stop - start) * d * 4 bytes.
    """
    k = min(k, heap_s.shape[0])
    stop = min(stop, vectors.shape[0])
    start = max(start, 0)
    if k <= 0 or start >= stop:
        return size
    n_excluded = excluded.shape[0]
    e = np.searchsorted(excluded, start)
    item = start
    while item < stop:
        while e < n_excluded and excluded[e] < item:
            e += 1
        if e < n_excluded and excluded[e] == item:
            item += 1
            continue
        end = stop
        if e < n_excluded and excluded[e] < stop:
            end = excluded[e]
        size = _scan(query, vectors, bias, item, end, heap_s, heap_i, size, k)
        item = end
    return size


@njit(cache=True, nogil=True)
def topk_finalize(
    heap_s: np.ndarray, heap_i: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The heap's items best first: (positions int64[size], scores float32[size]). Consumes
    the heap (its arrays are left in an unspecified state)."""
    return _drain(heap_s, heap_i, size)


@njit(cache=True, nogil=True, error_model="numpy")
def topk_dense(
    query: np.ndarray, vectors: np.ndarray, bias: np.ndarray, excluded: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every item by ``vectors @ query + bias``, skipping ``excluded`` positions.

    One pass over ``vectors`` (n * d * 4 bytes), fused: score, skip, keep the best k.
    """
    n = vectors.shape[0]
    k = min(k, n)
    heap_s, heap_i = topk_init(k)
    size = topk_dense_chunk(query, vectors, bias, excluded, k, 0, n, heap_s, heap_i, 0)
    return _drain(heap_s, heap_i, size)


@njit(cache=True, nogil=True, error_model="numpy")
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
    heap_s, heap_i = topk_init(k)
    size = 0
    if k > 0:
        size = _offer_sorted(
            query, vectors, bias, np.sort(candidates), excluded, NONE, heap_s, heap_i, size, k
        )
    return _drain(heap_s, heap_i, size)


NONE = np.empty(0, dtype=np.int64)  # no positions to pass over (``_offer_sorted``'s ``skip``)


@njit(cache=True, nogil=True, error_model="numpy")
def _offer_sorted(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    ordered: np.ndarray,
    excluded: np.ndarray,
    skip: np.ndarray,
    heap_s: np.ndarray,
    heap_i: np.ndarray,
    size: int,
    k: int,
) -> int:
    """Offer each position of ``ordered`` (int64, ascending, duplicates allowed) once to a
    top-k heap holding ``size``, passing over those in ``excluded`` or ``skip`` (both
    ascending); returns the heap's new size."""
    previous = -1
    at_excluded = 0
    at_skip = 0
    for c in range(ordered.shape[0]):
        item = ordered[c]
        if item == previous:
            continue
        previous = item
        # positions ascend, so both cursors only move forward
        while at_excluded < excluded.shape[0] and excluded[at_excluded] < item:
            at_excluded += 1
        if at_excluded < excluded.shape[0] and excluded[at_excluded] == item:
            continue
        while at_skip < skip.shape[0] and skip[at_skip] < item:
            at_skip += 1
        if at_skip < skip.shape[0] and skip[at_skip] == item:
            continue
        score = _dot(query, vectors, item) + bias[item]
        if size < k or score >= heap_s[0]:
            size = _heap_offer(heap_s, heap_i, size, k, score, item)
    return size


@njit(cache=True, nogil=True, error_model="numpy")
def topk_rescore(
    queries: np.ndarray,
    rows: np.ndarray,
    found: np.ndarray,
    found_counts: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    head: np.ndarray,
    head_vectors: np.ndarray,
    head_bias: np.ndarray,
    cold: np.ndarray,
    excluded_indptr: np.ndarray,
    excluded_indices: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ANN search's candidates re-scored exactly, for rows ``rows`` (int64[m]) of
    ``queries`` (float32[b, d]) and of the exclusion CSR (as in ``topk_dense_batch``).

    Row i of the answer is ``topk_candidates`` for query ``rows[i]`` over the union of
    ``found[i, :found_counts[i]]`` (int64[m, w], the index's candidates, -1 for none), the
    popular head ``head`` (int64[h] ascending positions, whose rows are ``head_vectors``
    float32[h, d] and ``head_bias`` float32[h]) and ``cold[:k + e]`` (int64[c], zero-vector
    items by bias descending: at most e of them are excluded, e being the row's exclusion
    count). Returns (positions int64[m, min(k, n)], scores float32[m, min(k, n)], counts
    int64[m]).

    One heap per row: the head is scanned first (contiguous rows, its exclusions skipped),
    then the other candidates are offered once each, in position order, skipping the head's
    and the excluded ones.
    """
    m = rows.shape[0]
    width = max(min(k, vectors.shape[0]), 0)
    out_i = np.full((m, width), -1, dtype=np.int64)
    out_s = np.zeros((m, width), dtype=np.float32)
    counts = np.zeros(m, dtype=np.int64)
    if width == 0:
        return out_i, out_s, counts
    h = head.shape[0]
    heap_s, heap_i = topk_init(width)
    for i in range(m):
        r = rows[i]
        query = queries[r]
        excluded = excluded_indices[excluded_indptr[r] : excluded_indptr[r + 1]]
        e = excluded.shape[0]
        # the exclusions that fall in the head, as head slots (ascending, as they are)
        local = np.empty(e, dtype=np.int64)
        n_local = 0
        slot = 0
        for x in range(e):
            while slot < h and head[slot] < excluded[x]:
                slot += 1
            if slot < h and head[slot] == excluded[x]:
                local[n_local] = slot
                n_local += 1
        size = topk_dense_chunk(
            query, head_vectors, head_bias, local[:n_local], width, 0, h, heap_s, heap_i, 0
        )
        for j in range(size):  # head slots to positions: the same order, so still a heap
            heap_i[j] = head[heap_i[j]]
        n_cold = min(cold.shape[0], k + e)
        others = np.empty(found_counts[i] + n_cold, dtype=np.int64)
        n_others = 0
        for j in range(found_counts[i]):
            if found[i, j] >= 0:
                others[n_others] = found[i, j]
                n_others += 1
        others[n_others : n_others + n_cold] = cold[:n_cold]
        ordered = np.sort(others[: n_others + n_cold])
        size = _offer_sorted(
            query, vectors, bias, ordered, excluded, head, heap_s, heap_i, size, width
        )
        items, scores = _drain(heap_s, heap_i, size)
        out_i[i, :size] = items
        out_s[i, :size] = scores
        counts[i] = size
    return out_i, out_s, counts


@njit(cache=True, nogil=True, error_model="numpy")
def topk_dense_batch(
    queries: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    excluded_indptr: np.ndarray,
    excluded_indices: np.ndarray,
    k: int,
    tile_bytes: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``topk_dense`` for each row of ``queries`` (float32[b, d]).

    Row r excludes ``excluded_indices[excluded_indptr[r]:excluded_indptr[r + 1]]`` (CSR, each
    row sorted). Returns (positions int64[b, k], scores float32[b, k], counts int64[b]); row r
    holds ``counts[r]`` results, identical to the single-query kernel's.

    Items are scanned in tiles of about ``tile_bytes`` bytes of ``vectors`` (keep it within the
    L2 cache), each tile scored for every query while it is cached, so memory traffic is one
    pass over ``vectors`` for the whole batch instead of one per query.
    """
    b = queries.shape[0]
    n = vectors.shape[0]
    k = min(k, n)
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_s = np.zeros((b, k), dtype=np.float32)
    counts = np.zeros(b, dtype=np.int64)
    heaps_s = np.empty((b, max(k, 1)), dtype=np.float32)
    heaps_i = np.empty((b, max(k, 1)), dtype=np.int64)
    tile = max(1, tile_bytes // max(1, 4 * vectors.shape[1]))
    for start in range(0, n, tile):
        for r in range(b):
            excluded = excluded_indices[excluded_indptr[r] : excluded_indptr[r + 1]]
            counts[r] = topk_dense_chunk(
                queries[r],
                vectors,
                bias,
                excluded,
                k,
                start,
                start + tile,
                heaps_s[r],
                heaps_i[r],
                counts[r],
            )
    for r in range(b):
        items, scores = _drain(heaps_s[r], heaps_i[r], counts[r])
        m = items.shape[0]
        out_i[r, :m] = items
        out_s[r, :m] = scores
    return out_i, out_s, counts


def warm_up() -> None:
    """Compile and run every kernel once, so no request pays for JIT compilation.

    Each kernel runs on writable and on read-only arrays in common mixes (a loaded
    snapshot's arrays are read-only memory maps, a distinct signature to numba; a query row
    of them meets writable item arrays in the retriever's popular head). The exact mixes a
    loaded snapshot's paths pass are compiled when it is prepared
    (``ranking.pipeline.warm_paths``).
    """
    rng = np.random.default_rng(0)
    writable = rng.standard_normal((8, 4)).astype(np.float32)
    read_only = writable.copy()
    read_only.setflags(write=False)
    excluded = np.array([1, 3], dtype=np.int64)
    candidates = np.array([0, 2, 2, 5], dtype=np.int64)
    indptr = np.array([0, 2, 2], dtype=np.int64)
    for vectors in (writable, read_only):
        bias = vectors[:, 0].copy()
        bias.setflags(write=vectors.flags.writeable)
        for query in (writable[0], read_only[0]):
            topk_dense(query, vectors, bias, excluded, 3)
            topk_candidates(query, vectors, bias, candidates, excluded, 3)
            heap_s, heap_i = topk_init(3)
            size = topk_dense_chunk(query, vectors, bias, excluded, 3, 0, 4, heap_s, heap_i, 0)
            size = topk_dense_chunk(query, vectors, bias, excluded, 3, 4, 8, heap_s, heap_i, size)
            topk_finalize(heap_s, heap_i, size)
        topk_dense_batch(vectors[:2].copy(), vectors, bias, indptr, excluded, 3)
        found = np.array([[2, -1, 6], [0, 1, 7]], dtype=np.int64)
        head = np.array([0, 4], dtype=np.int64)
        for queries in (writable[:2], read_only[:2]):
            topk_rescore(
                queries,
                np.arange(2, dtype=np.int64),
                found,
                np.array([3, 2], dtype=np.int64),
                vectors,
                bias,
                head,
                writable[head],
                bias[head].copy(),
                np.array([5, 3], dtype=np.int64),
                indptr,
                excluded,
                3,
            )
