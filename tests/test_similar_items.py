"""SimilarItems in the pipeline: the scope's exclusions hold, and an item nobody has interacted
with yet (no embedding) gets the scope's popular items rather than arbitrary ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from features.errors import NotFound
from ranking import snapshot
from ranking.pipeline import LoadedScope, Ranker, Source
from ranking.profiles import Profile

N_ITEMS = 12
COLD = "i05"  # no interactions: a zero vector, as build makes for an item nobody touched


class _EveryoneAllowed:
    def personalization_allowed(self, user_id: str) -> bool:
        return True

    def erased_at(self, user_id: str) -> float | None:
        return None


def _ranker(exclude_items: tuple[str, ...] = ()) -> Ranker:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((N_ITEMS, 4)).astype(np.float32)
    vectors[int(COLD[1:])] = 0.0
    arrays = {
        "item_ids": np.array([f"i{j:02d}" for j in range(N_ITEMS)]),
        "item_vectors": vectors,
        "item_bias": np.zeros(N_ITEMS, np.float32),
        "item_popularity": rng.random(N_ITEMS).astype(np.float32),
        "user_ids": np.array(["u0"]),
        "user_vectors": np.ones((1, 4), np.float32),
        "user_features": np.zeros((1, 3), np.float32),
        "seen_indptr": np.array([0, 1], np.int64),
        "seen_indices": np.array([0], np.int64),
    }
    ranker = Ranker(None, _EveryoneAllowed(), profiles={"s": Profile(exclude_items=exclude_items)})
    ranker.install(ranker.prepare(LoadedScope.of(snapshot.in_memory("s", arrays))))
    return ranker


async def test_similar_items_never_serve_the_scopes_excluded_items() -> None:
    everything = await _ranker().similar_items("i00", "s", N_ITEMS, math.inf)
    assert everything.source == Source.LIVE
    nearest = [i for i in everything.item_ids if i != COLD][:2]
    ranker = _ranker(exclude_items=tuple(nearest))
    answer = await ranker.similar_items("i00", "s", N_ITEMS, math.inf)
    assert answer.item_ids == [i for i in everything.item_ids if i not in nearest]
    # an excluded item is never served, so it has no similar items to ask for either
    with pytest.raises(NotFound):
        await ranker.similar_items(nearest[0], "s", 5, math.inf)


async def test_an_item_without_interactions_gets_the_scopes_popular_items() -> None:
    ranker = _ranker(exclude_items=("i07",))
    snap = ranker.scope("s").snapshot
    answer = await ranker.similar_items(COLD, "s", 4, math.inf)
    assert answer.source == Source.POPULAR
    popular = [str(snap.item_ids[p]) for p in snap.popular]
    assert answer.item_ids == [i for i in popular if i not in (COLD, "i07")][:4]
