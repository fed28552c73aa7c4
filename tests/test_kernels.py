"""Oracle tests of ranking/kernels.py against plain numpy.

Inputs are small integer-valued float32 arrays, so every score is an exact float sum and many
scores tie exactly; the reference then orders by (-score, position), which is the kernels'
contract (higher score first, ties to the lower position, i.e. the lower item ID).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from features.errors import DeadlineExceeded
from ranking import kernels
from ranking.retrieval import scan_top_k

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)

# small integers: sums of at most 6 products of |x| <= 3 plus a bias are exact in float32
SMALL = st.integers(min_value=-3, max_value=3)

# (query float32[d], vectors float32[n, d], bias float32[n], excluded int64[e] sorted, k)
Problem = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def position_lists(n: int, max_size: int) -> st.SearchStrategy[list[int]]:
    """Lists of positions in ``range(n)``, duplicates allowed (empty when n is 0)."""
    if n == 0:
        return st.just([])
    return st.lists(st.integers(min_value=0, max_value=n - 1), max_size=max_size)


def _float32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


def _positions(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64)


def reference_scores(query: np.ndarray, vectors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """vectors @ query + bias with the kernel's float32 arithmetic and summation order: lane
    l of DOT_LANES sums the products of dimensions j % DOT_LANES == l in increasing j, from 0;
    then the lanes are added pairwise by halving (l + l+8, then + l+4, ...)."""
    lanes = np.zeros((vectors.shape[0], kernels.DOT_LANES), dtype=np.float32)
    for j in range(vectors.shape[1]):
        lane = j % kernels.DOT_LANES
        lanes[:, lane] = lanes[:, lane] + query[j] * vectors[:, j]
    width = kernels.DOT_LANES // 2
    while width >= 1:
        lanes = lanes[:, :width] + lanes[:, width : 2 * width]
        width //= 2
    return lanes[:, 0] + bias


def reference_topk(
    query: np.ndarray,
    vectors: np.ndarray,
    bias: np.ndarray,
    allowed: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of the ``allowed`` positions (unique), ordered by (-score, position)."""
    scores = reference_scores(query, vectors, bias)
    allowed = np.unique(_positions(allowed))
    picked = scores[allowed]
    order = np.lexsort((allowed, -picked))[:k]
    return allowed[order], picked[order]


def assert_topk_equal(
    got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]
) -> None:
    got_items, got_scores = got
    want_items, want_scores = want
    assert got_items.dtype == np.int64
    assert got_scores.dtype == np.float32
    np.testing.assert_array_equal(got_items, want_items)
    np.testing.assert_array_equal(got_scores, want_scores)


@st.composite
def problems(draw: st.DrawFn, max_items: int = 24) -> Problem:
    """A random (query, vectors, bias, excluded, k) with many exact ties."""
    n = draw(st.integers(min_value=0, max_value=max_items))
    d = draw(st.integers(min_value=1, max_value=6))
    vectors = draw(hnp.arrays(np.int8, (n, d), elements=SMALL))
    query = draw(hnp.arrays(np.int8, (d,), elements=SMALL))
    bias = draw(hnp.arrays(np.int8, (n,), elements=SMALL))
    if n and draw(st.booleans()):
        # every item excluded, some more than once
        excluded = sorted([*range(n), *draw(position_lists(n, 4))])
    else:
        excluded = sorted(draw(position_lists(n, 2 * n)))
    k = draw(st.integers(min_value=0, max_value=n + 5))
    return _float32(query), _float32(vectors), _float32(bias), _positions(excluded), k


@SETTINGS
@given(problems())
def test_topk_dense_matches_numpy(problem: Problem) -> None:
    query, vectors, bias, excluded, k = problem
    allowed = np.setdiff1d(np.arange(vectors.shape[0]), excluded)
    got = kernels.topk_dense(query, vectors, bias, excluded, k)
    assert_topk_equal(got, reference_topk(query, vectors, bias, allowed, k))
    assert not np.isin(got[0], excluded).any()
    assert len(got[0]) == min(k, len(allowed))


@SETTINGS
@given(problems(), st.data())
def test_topk_candidates_matches_numpy(problem: Problem, data: st.DataObject) -> None:
    query, vectors, bias, excluded, k = problem
    n = vectors.shape[0]
    # unsorted, with duplicates
    candidates = _positions(data.draw(position_lists(n, 3 * n + 1), label="candidates"))
    allowed = np.setdiff1d(candidates, excluded)
    got = kernels.topk_candidates(query, vectors, bias, candidates, excluded, k)
    assert_topk_equal(got, reference_topk(query, vectors, bias, allowed, k))
    assert not np.isin(got[0], excluded).any()
    assert np.isin(got[0], candidates).all()
    assert len(np.unique(got[0])) == len(got[0]), "a duplicated candidate was returned twice"


@dataclass(frozen=True)
class BatchProblem:
    """Queries float32[b, d] over a catalog (vectors, bias), each with its exclusions:
    ``excluded`` as sorted lists, and the same as a CSR (``indptr``, ``indices``)."""

    vectors: np.ndarray
    bias: np.ndarray
    queries: np.ndarray
    excluded: list[list[int]]
    indptr: np.ndarray
    indices: np.ndarray


def draw_batch_problem(data: st.DataObject, max_queries: int) -> BatchProblem:
    n = data.draw(st.integers(min_value=0, max_value=20), label="n")
    d = data.draw(st.integers(min_value=1, max_value=5), label="d")
    b = data.draw(st.integers(min_value=0, max_value=max_queries), label="b")
    vectors = _float32(data.draw(hnp.arrays(np.int8, (n, d), elements=SMALL), label="vectors"))
    bias = _float32(data.draw(hnp.arrays(np.int8, (n,), elements=SMALL), label="bias"))
    queries = _float32(data.draw(hnp.arrays(np.int8, (b, d), elements=SMALL), label="queries"))
    rows = [sorted(data.draw(position_lists(n, n + 2), label=f"excluded[{r}]")) for r in range(b)]
    indptr = _positions(np.cumsum([0, *map(len, rows)]))
    indices = _positions([p for row in rows for p in row])
    return BatchProblem(vectors, bias, queries, rows, indptr, indices)


@SETTINGS
@given(st.data())
def test_topk_dense_batch_equals_single_per_row(data: st.DataObject) -> None:
    problem = draw_batch_problem(data, max_queries=6)
    vectors, bias, queries = problem.vectors, problem.bias, problem.queries
    rows, indptr, indices = problem.excluded, problem.indptr, problem.indices
    (n, d), b = vectors.shape, len(queries)
    k = data.draw(st.integers(min_value=0, max_value=n + 3), label="k")
    # from one-item tiles (every query visits every tile) to one tile for the whole catalog
    tile_bytes = data.draw(st.sampled_from([1, 4 * d, 12 * d, 1 << 18]), label="tile_bytes")

    if tile_bytes == 1 << 18:  # the default
        out_i, out_s, counts = kernels.topk_dense_batch(queries, vectors, bias, indptr, indices, k)
    else:
        out_i, out_s, counts = kernels.topk_dense_batch(
            queries, vectors, bias, indptr, indices, k, tile_bytes
        )

    width = min(k, n)
    assert out_i.shape == (b, width)
    assert out_s.shape == (b, width)
    assert counts.shape == (b,)
    for r in range(b):
        single_i, single_s = kernels.topk_dense(
            queries[r].copy(), vectors, bias, _positions(rows[r]), k
        )
        m = int(counts[r])
        assert m == len(single_i)
        np.testing.assert_array_equal(out_i[r, :m], single_i)
        np.testing.assert_array_equal(out_s[r, :m], single_s)
        # padding past the row's count
        assert (out_i[r, m:] == -1).all()
        assert (out_s[r, m:] == 0).all()


@SETTINGS
@given(st.data())
def test_topk_rescore_matches_numpy(data: st.DataObject) -> None:
    # the ANN re-score: per row, the exact top k over faiss's candidates, the head's best k
    # and the first k + e cold items, computed here set by set in plain numpy
    p = draw_batch_problem(data, max_queries=5)
    n, b = len(p.vectors), len(p.queries)
    rows = _positions(
        data.draw(st.lists(st.integers(0, b - 1), max_size=6), label="rows") if b else []
    )
    width = data.draw(st.integers(min_value=0, max_value=n + 2), label="width")
    found = _positions(
        data.draw(
            hnp.arrays(np.int64, (len(rows), width), elements=st.integers(-1, max(n - 1, -1))),
            label="found",
        )
    )
    found_counts = _positions(
        [data.draw(st.integers(0, width), label=f"found_counts[{i}]") for i in range(len(rows))]
    )
    head = _positions(sorted(set(data.draw(position_lists(n, n), label="head"))))
    cold = _positions(data.draw(st.permutations(range(n)), label="cold")[: n // 2])
    k = data.draw(st.integers(min_value=0, max_value=n + 3), label="k")

    out_i, out_s, counts = kernels.topk_rescore(
        p.queries, rows, found, found_counts, p.vectors, p.bias, head,
        _float32(p.vectors[head]), _float32(p.bias[head]), cold, p.indptr, p.indices, k,
    )  # fmt: skip

    assert out_i.shape == out_s.shape == (len(rows), min(k, n))
    for i, r in enumerate(rows.tolist()):
        excluded = _positions(p.excluded[r])
        local_excluded = np.flatnonzero(np.isin(head, excluded))
        head_allowed = np.setdiff1d(np.arange(len(head)), local_excluded)
        head_best, _ = reference_topk(p.queries[r], p.vectors[head], p.bias[head], head_allowed, k)
        candidates = np.concatenate(
            [found[i, : found_counts[i]], head[head_best], cold[: k + len(excluded)]]
        )
        allowed = np.setdiff1d(candidates[candidates >= 0], excluded)
        want = reference_topk(p.queries[r], p.vectors, p.bias, allowed, k)
        m = int(counts[i])
        assert_topk_equal((out_i[i, :m], out_s[i, :m]), want)
        assert (out_i[i, m:] == -1).all()


@SETTINGS
@given(problems(), st.data())
def test_chunked_scan_equals_single_pass(problem: Problem, data: st.DataObject) -> None:
    query, vectors, bias, excluded, k = problem
    n = vectors.shape[0]
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=n), max_size=5), label="cuts")
    bounds = [0, *sorted(cuts), n]
    # disjoint chunks covering [0, n), visited in any order; the last may run past n
    chunks = list(itertools.pairwise(bounds))
    chunks[-1] = (chunks[-1][0], n + data.draw(st.integers(0, 3), label="overshoot"))
    chunks = data.draw(st.permutations(chunks), label="order")
    heap_s, heap_i = kernels.topk_init(k)
    size = 0
    for start, stop in chunks:
        size = kernels.topk_dense_chunk(
            query, vectors, bias, excluded, k, start, stop, heap_s, heap_i, size
        )
        assert 0 <= size <= k
    got = kernels.topk_finalize(heap_s, heap_i, size)
    assert_topk_equal(got, kernels.topk_dense(query, vectors, bias, excluded, k))


@SETTINGS
@given(problems(), st.integers(min_value=1, max_value=8))
def test_deadline_checked_scan_equals_single_pass(problem: Problem, chunk_items: int) -> None:
    query, vectors, bias, excluded, k = problem
    future = time.monotonic() + 60
    got = scan_top_k(query, vectors, bias, excluded, k, future, chunk_items=chunk_items)
    assert_topk_equal(got, kernels.topk_dense(query, vectors, bias, excluded, k))


def test_a_scan_past_its_deadline_stops_before_scoring() -> None:
    rng = np.random.default_rng(3)
    vectors = _float32(rng.standard_normal((100, 4)))
    bias, query = _float32(np.zeros(100)), _float32(rng.standard_normal(4))
    with pytest.raises(DeadlineExceeded):
        scan_top_k(query, vectors, bias, _positions([]), 5, time.monotonic() - 1, chunk_items=10)
    # small enough for one chunk, or no deadline: one pass, as the caller checked the deadline
    scan_top_k(query, vectors, bias, _positions([]), 5, time.monotonic() - 1, chunk_items=100)
    scan_top_k(query, vectors, bias, _positions([]), 5, None, chunk_items=10)


@pytest.mark.parametrize("d", [1, 5, 12, 16, 17, 33, 64, 100])
def test_topk_dense_real_valued_scores_match_float32_reference(d: int) -> None:
    # non-integer inputs: same float32 summation order, so the scores agree bit for bit (d
    # below, at and past multiples of the lane count: full lanes, a partial tail, both)
    rng = np.random.default_rng(7)
    vectors = _float32(rng.standard_normal((500, d)))
    bias = _float32(rng.standard_normal(500) * 0.1)
    excluded = _positions(np.sort(rng.choice(500, size=40, replace=False)))
    allowed = np.setdiff1d(np.arange(500), excluded)
    for _ in range(10):
        query = _float32(rng.standard_normal(d))
        got = kernels.topk_dense(query, vectors, bias, excluded, 25)
        assert_topk_equal(got, reference_topk(query, vectors, bias, allowed, 25))
        # every item's score, through the candidate kernel
        everything = kernels.topk_candidates(
            query, vectors, bias, _positions(range(500)), _positions([]), 500
        )
        want_scores = reference_scores(query, vectors, bias)
        np.testing.assert_array_equal(everything[1], want_scores[everything[0]])


@pytest.mark.parametrize("d", [3, 16, 40])
def test_any_layout_and_read_only_arrays_give_the_same_bits(d: int) -> None:
    # strided views take the kernel's scalar path, read-only arrays (a loaded snapshot's memory
    # maps) a separate compilation: both must score exactly like contiguous writable arrays
    rng = np.random.default_rng(11)
    wide = _float32(rng.standard_normal((300, 2 * d)))
    vectors = np.ascontiguousarray(wide[:, ::2])
    queries = _float32(rng.standard_normal((2, 2 * d)))
    bias = _float32(rng.standard_normal(300))
    excluded = _positions([4, 9, 9, 250])
    want = kernels.topk_dense(queries[0, ::2].copy(), vectors, bias, excluded, 30)
    assert_topk_equal(kernels.topk_dense(queries[0, ::2], wide[:, ::2], bias, excluded, 30), want)
    frozen = [a.copy() for a in (queries[0, ::2], vectors, bias)]
    for a in frozen:
        a.setflags(write=False)
    assert_topk_equal(kernels.topk_dense(*frozen, excluded, 30), want)


def test_all_equal_scores_return_lowest_positions_first() -> None:
    # every score is 0: the answer is positions 0..k-1 minus the excluded ones, ascending
    vectors = np.zeros((10, 3), dtype=np.float32)
    bias = np.zeros(10, dtype=np.float32)
    query = np.ones(3, dtype=np.float32)
    excluded = _positions([0, 0, 2, 7])
    items, scores = kernels.topk_dense(query, vectors, bias, excluded, 4)
    np.testing.assert_array_equal(items, [1, 3, 4, 5])
    np.testing.assert_array_equal(scores, np.zeros(4, dtype=np.float32))


def test_hand_computed_example() -> None:
    # scores = vectors @ query + bias = [1+0, 0+2, 1+1, 2+0, 1-1] = [1, 2, 2, 2, 0]
    vectors = _float32([[1, 0], [0, 1], [1, 0], [1, 1], [1, 0]])
    query = _float32([1, 2])
    bias = _float32([0, 0, 1, -1, -1])
    none = _positions([])
    items, scores = kernels.topk_dense(query, vectors, bias, none, 3)
    # three-way tie at 2 broken by position
    np.testing.assert_array_equal(items, [1, 2, 3])
    np.testing.assert_array_equal(scores, [2, 2, 2])
    items, scores = kernels.topk_dense(query, vectors, bias, _positions([2]), 10)
    np.testing.assert_array_equal(items, [1, 3, 0, 4])
    np.testing.assert_array_equal(scores, [2, 2, 1, 0])
    items, _ = kernels.topk_candidates(query, vectors, bias, _positions([4, 0, 4, 3]), none, 10)
    np.testing.assert_array_equal(items, [3, 0, 4])


@pytest.mark.parametrize("k", [0, 1, 5, 50])
def test_empty_results_have_the_right_types(k: int) -> None:
    vectors = np.ones((5, 2), dtype=np.float32)
    bias = np.zeros(5, dtype=np.float32)
    query = np.ones(2, dtype=np.float32)
    everything = _positions(range(5))
    for items, scores in (
        kernels.topk_dense(query, vectors, bias, everything, k),
        kernels.topk_candidates(query, vectors, bias, _positions([]), _positions([]), k),
        kernels.topk_candidates(query, vectors, bias, _positions([1, 1, 3]), everything, k),
    ):
        assert items.dtype == np.int64
        assert scores.dtype == np.float32
        assert items.shape == scores.shape == (0,)


def test_warm_up_runs() -> None:
    kernels.warm_up()
