"""EASE (Steck 2019): a closed-form item-item model for implicit feedback.

    B = I - P · diagMat(1 / diag(P)),   P = (XᵀX + λI)⁻¹,   diag(B) = 0

``X`` is the binary user × item matrix. A user's scores are ``x_u B``: the sum of the rows of B
of the items they interacted with. Memory and time grow with n² and n³ in the catalog size n,
so it serves catalogs up to a few tens of thousands of items; above that the embedding model
and the ANN index take over.
"""

from __future__ import annotations

import numpy as np


def gram(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """XᵀX (float64[n, n]) of the binary matrix with ones at (users[k], items[k])."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    result = np.zeros((n_items, n_items), dtype=np.float64)
    rows = np.split(items, starts[1:])
    # accumulate X^T X in blocks of users through a dense 0/1 block and one matmul each
    block = 2048
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        dense = np.zeros((len(chunk), n_items), dtype=np.float64)
        for r, cols in enumerate(chunk):
            dense[r, np.unique(cols)] = 1.0
        result += dense.T @ dense
    return result


def train_ease(gram_matrix: np.ndarray, regularization: float) -> np.ndarray:
    """B (float32[n, n], zero diagonal) from XᵀX and λ."""
    g = gram_matrix.copy()
    g[np.diag_indices_from(g)] += regularization
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)
