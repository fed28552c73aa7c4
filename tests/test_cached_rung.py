"""The cached rung and its refill: a stored value that is not a ranking is a miss, a cached
answer cut by exclusions ranks as the live one does, and a refill that had to skip users for
a passing reason does not call the version warm."""

from __future__ import annotations

import math
import types
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis

from features.cache import RankCache
from ranking import snapshot
from ranking.pipeline import LoadedScope, Ranker, Source
from ranking.profiles import Profile
from server.app import App
from server.config import Config

N_ITEMS, DIM = 300, 8


def _scope() -> str:
    return "cached" + uuid.uuid4().hex[:8]


class _EveryoneAllowed:
    personalization_enabled = True

    @property
    def personalizing(self) -> bool:
        return self.personalization_enabled

    def personalization_allowed(self, user_id: str) -> bool:
        return self.personalization_enabled

    def erased_at(self, user_id: str) -> float | None:
        return None


def _snapshot(scope: str) -> snapshot.Snapshot:
    rng = np.random.default_rng(7)
    return snapshot.in_memory(
        scope,
        {
            "item_ids": np.array([f"i{j:04d}" for j in range(N_ITEMS)]),
            "item_vectors": rng.normal(size=(N_ITEMS, DIM)).astype(np.float32),
            "item_bias": np.zeros(N_ITEMS, np.float32),
            "item_popularity": np.linspace(1, 0, N_ITEMS, dtype=np.float32),
            "item_recency": np.zeros(N_ITEMS, np.float32),
            "item_engagement": np.zeros(N_ITEMS, np.float32),
            "item_category": np.zeros(N_ITEMS, np.int32),
            "categories": np.array([""]),
            "user_ids": np.array(["u0"]),
            "user_vectors": rng.normal(size=(1, DIM)).astype(np.float32),
            "user_features": np.zeros((1, 3), np.float32),
            "seen_indptr": np.array([0, 0], np.int64),
            "seen_indices": np.array([], np.int64),
        },
    )


def _serving(ranker: Ranker, snap: snapshot.Snapshot) -> Ranker:
    ranker.install(ranker.prepare(LoadedScope.of(snap)))
    return ranker


async def test_a_stored_value_that_is_not_a_ranking_is_a_miss(
    cache: RankCache, redis_url: str
) -> None:
    """Six bytes where whole 12-byte records belong (cut short, or written by something else):
    the user is ranked live, where every Recommend of theirs failed INTERNAL until it expired."""
    scope = _scope()
    snap = _snapshot(scope)
    with redis.Redis.from_url(redis_url) as client:
        client.set(cache.keys.rank(scope, snap.version, "u0"), b"\x01\x00\x00\x00\x00\x00", ex=60)
    assert await cache.get(scope, snap.version, "u0") is None
    assert await cache.get_with_recent(scope, snap.version, "u0") == (None, [])
    answer = await _serving(Ranker(cache, _EveryoneAllowed()), snap).recommend(
        "u0", scope, 10, [], math.inf
    )
    assert answer.source == Source.LIVE


class _Holding:
    """A cache holding one ranking for everyone."""

    def __init__(self, hit: tuple[np.ndarray, np.ndarray]) -> None:
        self.hit = hit

    async def get_with_recent(self, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
        return self.hit, []

    async def recent(self, *args: Any, **kwargs: Any) -> list[str]:
        return []


async def test_a_diversified_cached_answer_cut_by_exclusions_is_the_live_one() -> None:
    """Diversity re-ranks the top 100 candidates: a cached ranking of 120 with 50 excluded
    holds 70, and re-ranking those answered otherwise than live (items 7 and 9 of 10)."""
    scope = _scope()
    snap = _snapshot(scope)
    stored = await _serving(Ranker(None, _EveryoneAllowed()), snap).recommend(
        "u0", scope, 120, [], math.inf
    )
    hit = (snap.lookup_items(stored.item_ids), np.array(stored.scores, np.float32))
    diverse = {scope: Profile(diversity=0.7, candidates=100)}
    cached = _serving(Ranker(_Holding(hit), _EveryoneAllowed(), profiles=diverse), snap)  # type: ignore[arg-type]
    live = _serving(Ranker(None, _EveryoneAllowed(), profiles=diverse), snap)
    excluded = stored.item_ids[:50]
    want = await live.recommend("u0", scope, 10, excluded, math.inf)
    got = await cached.recommend("u0", scope, 10, excluded, math.inf)
    assert got.item_ids == want.item_ids
    # and a cut that leaves the depth whole is still served from the cache
    assert (await cached.recommend("u0", scope, 10, stored.item_ids[:20], math.inf)).source == (
        Source.CACHED
    )


async def test_a_refill_that_skipped_users_for_a_passing_reason_leaves_the_version_cold(
    cache: RankCache,
) -> None:
    """The global switch goes off while the refill runs: the users after that are not ranked
    personally for the moment only, so the version must not be marked warm (the mark would
    keep them out of the cache for its whole TTL)."""
    scope = _scope()
    snap = _snapshot(scope)
    optouts = _EveryoneAllowed()
    now = datetime.now(UTC)
    pages = [
        [("a", ["i0001", "i0002"], [0.9, 0.8], now)],
        [("b", ["i0003", "i0004"], [0.7, 0.6], now)],
        [],
    ]

    class Stored:
        async def ranks_page(self, *args: Any, **kwargs: Any) -> list[Any]:
            page = pages.pop(0)
            optouts.personalization_enabled = not (page and page[0][0] == "b")
            return page

        async def not_personal(self, *args: Any, **kwargs: Any) -> set[str]:
            return set()

    app = types.SimpleNamespace(
        config=Config.from_env({}),
        pg=Stored(),
        cache=cache,
        optouts=optouts,
        ranker=Ranker(cache, optouts),  # type: ignore[arg-type]
    )
    await App._refill(app, scope, snap)  # type: ignore[arg-type]
    assert await cache.get(scope, snap.version, "a") is not None
    assert not await cache.is_warm(scope, snap.version)
