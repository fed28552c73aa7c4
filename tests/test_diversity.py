"""MMR re-ranking: identity at strength 0, fewer near-duplicates as strength grows."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.metrics import intra_list_diversity
from ranking.diversity import mmr


def _clusters(seed: int, clusters: int = 5, per: int = 8, dim: int = 16) -> np.ndarray:
    """Unit vectors in tight clusters: items of a cluster are near-duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = np.repeat(centres, per, axis=0) + 0.05 * rng.standard_normal((clusters * per, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _near_duplicate_share(order: list[int], unit: np.ndarray, threshold: float = 0.9) -> float:
    pairs = [(a, b) for n, a in enumerate(order) for b in order[n + 1 :]]
    return sum(float(unit[a] @ unit[b]) > threshold for a, b in pairs) / len(pairs)


def test_strength_zero_keeps_the_order() -> None:
    unit = _clusters(0)
    candidates = np.arange(40, dtype=np.int64)
    assert mmr(candidates, -np.arange(40.0), unit, 10, 0.0).tolist() == list(range(10))


def test_diversity_lowers_the_near_duplicate_share() -> None:
    unit = _clusters(1)
    # relevance favours the first cluster strongly: a plain top 10 is mostly near-duplicates
    candidates = np.arange(40, dtype=np.int64)
    relevance = np.linspace(1.0, 0.0, 40)
    shares, diversities = [], []
    for strength in (0.0, 0.5, 0.9):
        picked = candidates[mmr(candidates, relevance, unit, 10, strength)].tolist()
        shares.append(_near_duplicate_share(picked, unit))
        diversities.append(intra_list_diversity([picked], unit, 10))
    assert shares[0] > shares[1] >= shares[2]
    # intra-list diversity rises over the plain ranking (its order between two positive
    # strengths depends on how far apart the clusters happen to lie)
    assert diversities[0] < min(diversities[1:])
    # the best candidate always leads
    assert mmr(candidates, relevance, unit, 10, 0.7)[0] == 0


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 30), st.integers(0, 12), st.floats(0.0, 1.0), st.integers(0, 10**6))
def test_mmr_picks_distinct_candidates(c: int, k: int, strength: float, seed: int) -> None:
    unit = _clusters(seed % 7)
    rng = np.random.default_rng(seed)
    candidates = rng.choice(len(unit), size=min(c, len(unit)), replace=False).astype(np.int64)
    relevance = np.sort(rng.random(len(candidates)))[::-1]
    picked = mmr(candidates, relevance, unit, k, strength)
    assert len(picked) == min(k, len(candidates))
    assert len(set(picked.tolist())) == len(picked)
    assert picked.tolist() == mmr(candidates, relevance, unit, k, strength).tolist()
