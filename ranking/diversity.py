"""Diversity re-ranking by maximal marginal relevance (Carbonell & Goldstein 1998).

Greedily picks, from a best-first candidate list, the item maximising

    (1 - strength) · relevance(i) - strength · max_{j picked} cos(i, j)

with relevance min-max scaled to [0, 1] over the candidates. ``strength`` 0 keeps the input
order; higher values trade relevance for dissimilarity to what is already on the list. Ties go
to the better-ranked candidate, so the result is deterministic. Pure numpy; touches only the
final candidates (C ≤ a few hundred).
"""

from __future__ import annotations

import numpy as np


def mmr(
    candidates: np.ndarray, relevance: np.ndarray, unit: np.ndarray, k: int, strength: float
) -> np.ndarray:
    """Indices into ``candidates`` (int64[c], best first; ``relevance`` float[c]) of the k
    picked items, in pick order. ``unit`` float32[n, d] holds the items' unit vectors."""
    count = min(k, len(candidates))
    if strength <= 0.0 or count <= 1:
        return np.arange(count, dtype=np.int64)
    rel = relevance.astype(np.float64)
    spread = rel.max() - rel.min()
    rel = (rel - rel.min()) / spread if spread > 0 else np.ones_like(rel)
    vectors = unit[candidates].astype(np.float64)
    similarity = vectors @ vectors.T
    picked = [0]
    closest = similarity[0].copy()  # max similarity of each candidate to the picked ones
    available = np.ones(len(candidates), dtype=bool)
    available[0] = False
    for _ in range(count - 1):
        gain = (1.0 - strength) * rel - strength * closest
        gain[~available] = -np.inf
        best = int(np.argmax(gain))  # argmax takes the first of equals: the better-ranked
        picked.append(best)
        available[best] = False
        closest = np.maximum(closest, similarity[best])
    return np.array(picked, dtype=np.int64)
