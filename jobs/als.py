"""Implicit-feedback matrix factorization (Hu, Koren & Volinsky 2008) solved by alternating
least squares with a few conjugate-gradient steps per row (Takács et al. 2011), in numba.

Pure functions over arrays. ``indptr``/``indices``/``confidence`` describe a CSR matrix of
confidences c_ui - 1 (>= 0) for observed pairs; rows are users when solving users, items when
solving items. Factors are float32[rows, f]. Seeded and deterministic: every row is solved
independently, so the parallel loop gives the same result as a serial one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, inline="always")
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    acc = 0.0
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


@njit(cache=True, nogil=True, inline="always")
def _matvec(m: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    for i in range(m.shape[0]):
        acc = 0.0
        for j in range(m.shape[1]):
            acc += m[i, j] * v[j]
        out[i] = acc


@njit(cache=True, parallel=True, nogil=True)
def cg_half_step(
    indptr: np.ndarray,
    indices: np.ndarray,
    confidence: np.ndarray,
    solve: np.ndarray,
    fixed: np.ndarray,
    gram: np.ndarray,
    cg_steps: int,
) -> None:
    """Update ``solve`` (float32[rows, f]) in place against ``fixed`` (float32[cols, f]).

    Minimises sum_i c_ui (p_ui - x_u·y_i)^2 + reg |x_u|^2 with p_ui = 1 for observed pairs;
    ``gram`` is float64[f, f] = fixed^T fixed + reg I.
    """
    f = fixed.shape[1]
    for u in prange(solve.shape[0]):
        x = solve[u].astype(np.float64)
        r = np.empty(f)
        ap = np.empty(f)
        # residual r = b - A x, with A = gram + sum_i c'_ui y_i y_i^T and b = sum_i (1 + c'_ui) y_i
        _matvec(gram, x, r)
        for j in range(f):
            r[j] = -r[j]
        for ptr in range(indptr[u], indptr[u + 1]):
            y = fixed[indices[ptr]]
            c = confidence[ptr]
            weight = 1.0 + c - c * _dot(y, x)
            for j in range(f):
                r[j] += weight * y[j]
        p = r.copy()
        rs_old = _dot(r, r)
        for _ in range(cg_steps):
            if rs_old < 1e-20:
                break
            _matvec(gram, p, ap)
            for ptr in range(indptr[u], indptr[u + 1]):
                y = fixed[indices[ptr]]
                weight = confidence[ptr] * _dot(y, p)
                for j in range(f):
                    ap[j] += weight * y[j]
            alpha = rs_old / _dot(p, ap)
            for j in range(f):
                x[j] += alpha * p[j]
                r[j] -= alpha * ap[j]
            rs_new = _dot(r, r)
            for j in range(f):
                p[j] = r[j] + (rs_new / rs_old) * p[j]
            rs_old = rs_new
        for j in range(f):
            solve[u, j] = x[j]


def gram_matrix(fixed: np.ndarray, regularization: float) -> np.ndarray:
    """fixed^T fixed + reg I in float64 (numpy's BLAS; numba's needs scipy)."""
    gram = fixed.T.astype(np.float64) @ fixed.astype(np.float64)
    gram[np.diag_indices_from(gram)] += regularization
    return gram


@dataclass(frozen=True, slots=True)
class AlsParams:
    factors: int = 32
    regularization: float = 0.1
    alpha: float = 10.0  # confidence = 1 + alpha * log1p(strength)
    iterations: int = 15
    cg_steps: int = 3
    seed: int = 42


def to_csr(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO (int rows, int cols, float values) → CSR (indptr int64, indices int64, data float32),
    columns sorted within each row."""
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return (
        np.cumsum(indptr),
        cols[order].astype(np.int64),
        values[order].astype(np.float32),
    )


def train_als(
    users: np.ndarray,
    items: np.ndarray,
    strength: np.ndarray,
    n_users: int,
    n_items: int,
    params: AlsParams,
    progress: object = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Factorize the implicit-feedback matrix. ``users``/``items`` are int positions, aligned
    with ``strength`` (> 0). Returns (user_factors float32[u, f], item_factors float32[n, f]).
    ``progress``, if given, has ``update(1)`` called after each iteration."""
    rng = np.random.default_rng(params.seed)
    scale = 0.01
    user_factors = (rng.standard_normal((n_users, params.factors)) * scale).astype(np.float32)
    item_factors = (rng.standard_normal((n_items, params.factors)) * scale).astype(np.float32)
    confidence = (params.alpha * np.log1p(strength)).astype(np.float32)
    by_user = to_csr(users, items, confidence, n_users)
    by_item = to_csr(items, users, confidence, n_items)
    for _ in range(params.iterations):
        gram = gram_matrix(item_factors, params.regularization)
        cg_half_step(*by_user, user_factors, item_factors, gram, params.cg_steps)
        gram = gram_matrix(user_factors, params.regularization)
        cg_half_step(*by_item, item_factors, user_factors, gram, params.cg_steps)
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    return user_factors, item_factors
