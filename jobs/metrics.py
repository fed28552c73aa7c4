"""Offline ranking metrics. Pure functions; ``ranked`` is a best-first list of item positions,
``relevant`` the set of held-out items of one user. Each returns a value in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def precision_at_k(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    return sum(1 for item in ranked[:k] if item in relevant) / k


def recall_at_k(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    if not relevant:
        return 0.0
    return sum(1 for item in ranked[:k] if item in relevant) / len(relevant)


def ndcg_at_k(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    """Binary-relevance NDCG: DCG / ideal DCG with gains 1/log2(rank + 1)."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / np.log2(r + 2) for r, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(relevant))))
    return float(dcg / ideal)


def average_precision_at_k(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    """AP@k normalised by min(k, |relevant|)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for r, item in enumerate(ranked[:k]):
        if item in relevant:
            hits += 1
            total += hits / (r + 1)
    return total / min(k, len(relevant))


def catalog_coverage(rankings: Sequence[Sequence[int]], n_items: int, k: int) -> float:
    """Share of the catalog that appears in at least one top-k list."""
    if n_items == 0:
        return 0.0
    shown = {item for ranked in rankings for item in ranked[:k]}
    return len(shown) / n_items


def evaluate_rankings(
    rankings: Sequence[Sequence[int]],
    relevant: Sequence[set[int]],
    n_items: int,
    ks: Sequence[int] = (5, 10, 20),
    *,
    unit_vectors: np.ndarray | None = None,
    item_share: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean precision, recall, NDCG and MAP at each k, catalog coverage at each k, and — given
    item vectors / item shares — intra-list diversity, novelty and popularity bias at each k."""
    result: dict[str, float] = {}
    functions = {
        "precision": precision_at_k,
        "recall": recall_at_k,
        "ndcg": ndcg_at_k,
        "map": average_precision_at_k,
    }
    for k in ks:
        for name, fn in functions.items():
            values = [fn(r, rel, k) for r, rel in zip(rankings, relevant, strict=True)]
            result[f"{name}@{k}"] = float(np.mean(values)) if values else 0.0
        result[f"coverage@{k}"] = catalog_coverage(rankings, n_items, k)
        if unit_vectors is not None:
            result[f"diversity@{k}"] = intra_list_diversity(rankings, unit_vectors, k)
        if item_share is not None:
            result[f"novelty@{k}"] = novelty(rankings, item_share, k)
            result[f"popularity_bias@{k}"] = popularity_bias(rankings, item_share, k)
    return result


def intra_list_diversity(
    rankings: Sequence[Sequence[int]], unit_vectors: np.ndarray, k: int
) -> float:
    """Mean over lists of the average pairwise cosine distance (1 - cos) of the top-k items;
    ``unit_vectors`` float[n, d] has rows of norm 1 (or 0). Lists shorter than 2 count 0."""
    values = []
    for ranked in rankings:
        top = list(ranked[:k])
        if len(top) < 2:
            values.append(0.0)
            continue
        vectors = unit_vectors[top].astype(np.float64)
        cos = vectors @ vectors.T
        pairs = len(top) * (len(top) - 1)
        values.append(float((pairs - (cos.sum() - np.trace(cos))) / pairs))
    return float(np.mean(values)) if values else 0.0


def novelty(rankings: Sequence[Sequence[int]], item_share: np.ndarray, k: int) -> float:
    """Mean self-information -log2(share) of recommended items, where ``item_share`` float[n]
    is the share of users who interacted with each item (floored at 1/ (10 * n))."""
    floor = 1.0 / (10 * max(len(item_share), 1))
    bits = [-np.log2(max(float(item_share[i]), floor)) for r in rankings for i in r[:k]]
    return float(np.mean(bits)) if bits else 0.0


def popularity_bias(rankings: Sequence[Sequence[int]], item_share: np.ndarray, k: int) -> float:
    """Average recommendation popularity (ARP): the mean ``item_share`` of recommended items."""
    shares = [float(item_share[i]) for r in rankings for i in r[:k]]
    return float(np.mean(shares)) if shares else 0.0
