"""Tests of jobs/als.py: the CG half step against a closed-form numpy solve, CSR building and
the determinism of training."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.als import AlsParams, cg_half_step, gram_matrix, to_csr, train_als

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def reference_half_step(
    indptr: np.ndarray,
    indices: np.ndarray,
    confidence: np.ndarray,
    fixed: np.ndarray,
    regularization: float,
) -> np.ndarray:
    """Exact implicit-ALS solve of every row, slowly, in float64.

    For row u: (YtY + reg I + sum_i c_ui y_i y_i^T) x_u = sum_i (1 + c_ui) y_i, where c_ui is the
    CSR value (the confidence minus one) and the sums run over the row's observed columns.
    """
    y = fixed.astype(np.float64)
    f = y.shape[1]
    base = y.T @ y + regularization * np.eye(f)
    out = np.zeros((len(indptr) - 1, f))
    for u in range(len(indptr) - 1):
        a = base.copy()
        b = np.zeros(f)
        for ptr in range(indptr[u], indptr[u + 1]):
            yi = y[indices[ptr]]
            c = float(confidence[ptr])
            a += c * np.outer(yi, yi)
            b += (1.0 + c) * yi
        out[u] = np.linalg.solve(a, b)
    return out


def random_problem(
    seed: int, rows: int, cols: int, f: int, density: float
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, cols)) < density
    r, c = np.nonzero(mask)
    strength = rng.integers(1, 5, size=len(r)).astype(np.float64)
    confidence = 2.0 * np.log1p(strength)
    csr = to_csr(r.astype(np.int64), c.astype(np.int64), confidence, rows)
    solve = (rng.standard_normal((rows, f)) * 0.1).astype(np.float32)
    fixed = (rng.standard_normal((cols, f)) * 0.5).astype(np.float32)
    return csr, solve, fixed


@pytest.mark.parametrize(
    ("seed", "rows", "cols", "f", "density"),
    [(0, 12, 9, 4, 0.4), (1, 20, 15, 8, 0.25), (2, 7, 30, 6, 0.6), (3, 10, 5, 3, 0.0)],
)
def test_cg_half_step_converges_to_the_closed_form(
    seed: int, rows: int, cols: int, f: int, density: float
) -> None:
    csr, solve, fixed = random_problem(seed, rows, cols, f, density)
    regularization = 0.1
    want = reference_half_step(*csr, fixed, regularization)
    gram = gram_matrix(fixed, regularization)
    # CG on an f x f SPD system is exact after f steps in exact arithmetic; allow 2f here
    cg_half_step(*csr, solve, fixed, gram, 2 * f)
    assert solve.dtype == np.float32
    np.testing.assert_allclose(solve, want, rtol=1e-4, atol=1e-5)


def test_cg_half_step_with_f_steps_is_close_to_the_closed_form() -> None:
    csr, solve, fixed = random_problem(4, 15, 12, 5, 0.3)
    want = reference_half_step(*csr, fixed, 0.5)
    cg_half_step(*csr, solve, fixed, gram_matrix(fixed, 0.5), 5)
    assert np.allclose(solve, want, rtol=1e-3, atol=1e-4)


def test_cg_half_step_rows_without_interactions_go_to_zero() -> None:
    # b = 0 for an empty row, so the minimiser is x = 0 whatever the start
    csr, solve, fixed = random_problem(5, 6, 8, 4, 0.0)
    assert (csr[0] == 0).all()
    cg_half_step(*csr, solve, fixed, gram_matrix(fixed, 0.1), 8)
    np.testing.assert_allclose(solve, 0.0, atol=1e-6)


def test_cg_half_step_with_zero_steps_leaves_the_factors_unchanged() -> None:
    csr, solve, fixed = random_problem(6, 8, 8, 4, 0.5)
    before = solve.copy()
    cg_half_step(*csr, solve, fixed, gram_matrix(fixed, 0.1), 0)
    np.testing.assert_array_equal(solve, before)


def test_gram_matrix() -> None:
    fixed = np.array([[1, 2], [3, 4], [0, -1]], dtype=np.float32)
    # [[1+9+0, 2+12+0], [2+12+0, 4+16+1]] + 0.5 I
    want = np.array([[10.5, 14.0], [14.0, 21.5]])
    got = gram_matrix(fixed, 0.5)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


def test_to_csr_hand_example() -> None:
    rows = np.array([2, 0, 2, 0, 3, 2])
    cols = np.array([5, 4, 1, 0, 2, 3])
    values = np.array([1.5, 2.0, 3.0, 4.0, 5.0, 6.0])
    indptr, indices, data = to_csr(rows, cols, values, 5)
    # row 0: cols 0, 4; row 1: none; row 2: cols 1, 3, 5; row 3: col 2; row 4: none
    np.testing.assert_array_equal(indptr, [0, 2, 2, 5, 6, 6])
    np.testing.assert_array_equal(indices, [0, 4, 1, 3, 5, 2])
    np.testing.assert_array_equal(data, np.array([4.0, 2.0, 3.0, 6.0, 1.5, 5.0], np.float32))
    assert indptr.dtype == np.int64
    assert indices.dtype == np.int64
    assert data.dtype == np.float32


def test_to_csr_empty() -> None:
    empty = np.array([], dtype=np.int64)
    indptr, indices, data = to_csr(empty, empty, np.array([], dtype=np.float64), 3)
    np.testing.assert_array_equal(indptr, [0, 0, 0, 0])
    assert indices.shape == data.shape == (0,)


@SETTINGS
@given(
    st.integers(min_value=1, max_value=8).flatmap(
        lambda n_rows: st.tuples(
            st.just(n_rows),
            st.lists(
                st.tuples(st.integers(0, n_rows - 1), st.integers(0, 9)),
                unique=True,
                max_size=40,
            ),
        )
    )
)
def test_to_csr_matches_dense(problem: tuple[int, list[tuple[int, int]]]) -> None:
    n_rows, pairs = problem
    rows = np.array([r for r, _ in pairs], dtype=np.int64)
    cols = np.array([c for _, c in pairs], dtype=np.int64)
    values = np.arange(1, len(pairs) + 1, dtype=np.float64)  # distinct, non-zero
    indptr, indices, data = to_csr(rows, cols, values, n_rows)

    assert indptr[0] == 0
    assert indptr[-1] == len(pairs)
    assert (np.diff(indptr) >= 0).all()
    dense = np.zeros((n_rows, 10))
    dense[rows, cols] = values
    rebuilt = np.zeros((n_rows, 10))
    for r in range(n_rows):
        row_cols = indices[indptr[r] : indptr[r + 1]]
        assert (np.diff(row_cols) > 0).all(), "columns must be sorted within a row"
        rebuilt[r, row_cols] = data[indptr[r] : indptr[r + 1]]
    np.testing.assert_array_equal(rebuilt, dense)


def interactions() -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Two blocks: users 0-9 use items 0-7, users 10-19 use items 8-15 (most pairs)."""
    rng = np.random.default_rng(11)
    users, items = [], []
    for u in range(20):
        block = range(0, 8) if u < 10 else range(8, 16)
        for i in block:
            if rng.random() < 0.7:
                users.append(u)
                items.append(i)
    strength = rng.integers(1, 4, size=len(users)).astype(np.float64)
    return np.array(users), np.array(items), strength, 20, 16


def test_train_als_is_deterministic_per_seed() -> None:
    data = interactions()
    params = AlsParams(factors=6, iterations=4, cg_steps=3, seed=3)
    u1, i1 = train_als(*data, params)
    u2, i2 = train_als(*data, params)
    assert u1.dtype == i1.dtype == np.float32
    assert u1.shape == (20, 6)
    assert i1.shape == (16, 6)
    assert np.array_equal(u1, u2)
    assert np.array_equal(i1, i2)
    u3, i3 = train_als(*data, AlsParams(factors=6, iterations=4, cg_steps=3, seed=4))
    assert not np.array_equal(u1, u3)
    assert not np.array_equal(i1, i3)


def test_train_als_reports_progress_once_per_iteration() -> None:
    class Counter:
        def __init__(self) -> None:
            self.total = 0

        def update(self, n: int) -> None:
            self.total += n

    counter = Counter()
    train_als(*interactions(), AlsParams(factors=4, iterations=5), progress=counter)
    assert counter.total == 5


def test_train_als_learns_the_block_structure() -> None:
    users, items, strength, n_users, n_items = interactions()
    user_f, item_f = train_als(
        users, items, strength, n_users, n_items, AlsParams(factors=4, iterations=10, seed=1)
    )
    scores = user_f @ item_f.T
    in_block = np.zeros((n_users, n_items), dtype=bool)
    in_block[:10, :8] = True
    in_block[10:, 8:] = True
    for u in range(n_users):
        own, other = scores[u, in_block[u]].mean(), scores[u, ~in_block[u]].mean()
        assert own > other + 0.3, f"user {u}: in-block mean {own}, out-of-block mean {other}"


def test_train_als_single_step_matches_reference() -> None:
    # one iteration with enough CG steps: the user half step is the exact solve against the
    # initial item factors (drawn from the seeded generator exactly as train_als does)
    users, items, strength, n_users, n_items = interactions()
    params = AlsParams(factors=5, regularization=0.2, alpha=3.0, iterations=1, cg_steps=10)
    rng = np.random.default_rng(params.seed)
    rng.standard_normal((n_users, params.factors))
    item_init = (rng.standard_normal((n_items, params.factors)) * 0.01).astype(np.float32)
    confidence = (params.alpha * np.log1p(strength)).astype(np.float32)
    by_user = to_csr(users, items, confidence, n_users)
    want_users = reference_half_step(*by_user, item_init, params.regularization)

    user_f, _ = train_als(users, items, strength, n_users, n_items, params)
    np.testing.assert_allclose(user_f, want_users, rtol=1e-3, atol=1e-4)
