"""The popular rung leaves out a user's recent items too (kept in the real Redis): a rule
scope ranks a user it does not know by its base scores, without what they just engaged with."""

from __future__ import annotations

import math
import time

import numpy as np

from features.cache import RankCache
from ranking import snapshot
from ranking.pipeline import LoadedScope, Ranker, Source
from ranking.profiles import Profile

N_ITEMS = 8
SCOPE = "recent-rules"


class _EveryoneAllowed:
    def personalization_allowed(self, user_id: str) -> bool:
        return True

    def erased_at(self, user_id: str) -> float | None:
        return None


def _rule_snapshot() -> snapshot.Snapshot:
    codes = np.arange(N_ITEMS, dtype=np.int32) % 2 + 1  # categories a and b, by turns
    arrays = {
        "item_ids": np.array([f"i{j}" for j in range(N_ITEMS)]),
        "item_vectors": np.eye(3, dtype=np.float32)[codes],
        "item_bias": np.zeros(N_ITEMS, np.float32),
        "item_popularity": np.linspace(1, 0, N_ITEMS, dtype=np.float32),
        "item_recency": np.zeros(N_ITEMS, np.float32),
        "item_engagement": np.zeros(N_ITEMS, np.float32),
        "item_category": codes,
        "categories": np.array(["", "a", "b"]),
        "user_ids": np.array(["u0"]),
        "user_vectors": np.zeros((1, 3), np.float32),
        "user_features": np.zeros((1, 3), np.float32),
        "seen_indptr": np.array([0, 0], np.int64),
        "seen_indices": np.array([], np.int64),
    }
    return snapshot.in_memory(SCOPE, arrays, extra={"model": "rules"})


async def test_a_stranger_in_a_rule_scope_is_not_served_their_recent_items(
    cache: RankCache,
) -> None:
    profile = Profile(model="rules", base_scores=(("a", 1.0), ("b", 0.5)))
    ranker = Ranker(cache, _EveryoneAllowed(), profiles={SCOPE: profile})
    ranker.install(ranker.prepare(LoadedScope.of(_rule_snapshot())))
    before = await ranker.recommend("stranger", SCOPE, N_ITEMS, [], math.inf)
    assert before.source == Source.POPULAR
    await cache.push_recent([(SCOPE, "stranger", before.item_ids[0])], at=time.time())
    after = await ranker.recommend("stranger", SCOPE, N_ITEMS, [], math.inf)
    assert after.source == Source.POPULAR
    assert after.item_ids == before.item_ids[1:]
