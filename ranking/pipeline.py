"""The rank pipeline: opt-out gate → cached ranking → live ranking → popular in scope.

The pipeline is I/O-free except through two small interfaces it is handed: a cache of
precomputed rankings and a view of who opted out. Each request pins one ``LoadedScope`` at its
start, so an answer never mixes two snapshot versions even while a swap happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from features.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    StoreUnavailable,
)
from ranking import kernels
from ranking.diversity import mmr
from ranking.itemitem import item_item_candidates, item_item_top_k
from ranking.profiles import CONTROL, DEFAULT_PROFILE, Profile
from ranking.retrieval import Retriever, retriever_for, scan_top_k
from ranking.scoring import ITEM_ITEM, RULES, Scoring, scoring_for
from ranking.snapshot import Snapshot

log = logging.getLogger(__name__)

EMPTY = np.empty(0, dtype=np.int64)


class Source(enum.IntEnum):
    """Which rung of the ladder produced an answer (values match the proto enum)."""

    CACHED = 1
    LIVE = 2
    POPULAR = 3
    CONTEXT = 4
    RECENT = 5


class RankingCache(Protocol):
    async def get_with_recent(
        self, scope: str, model_version: str, user_id: str, *, after: float | None = None
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, list[str]]:
        """The user's precomputed ranking (positions, scores) or None, and ``recent``, in
        one round trip."""
        ...

    async def recent(self, scope: str, user_id: str, *, after: float | None = None) -> list[str]:
        """The item IDs of the user's events since the model was built, newest first; with
        ``after`` (unix seconds) only those received after it."""
        ...


class OptOutView(Protocol):
    def personalization_allowed(self, user_id: str) -> bool:
        """False if personalization is globally off, the user opted out, or their state
        cannot be confirmed (fail closed)."""
        ...

    def erased_at(self, user_id: str) -> float | None:
        """When the user's data was erased (unix seconds), or None."""
        ...


@dataclass(frozen=True, slots=True)
class Ranked:
    """An answer: item IDs with scores, best first, and where it came from."""

    item_ids: list[str]
    scores: list[float]
    model_version: str
    source: Source
    personalization_blocked: bool = False
    variant: str = CONTROL


@dataclass(frozen=True, eq=False)
class LoadedScope:
    """A snapshot with its retriever and, once installed, the scoring of each A/B variant
    of the scope's profile (computed once, at install)."""

    snapshot: Snapshot
    retriever: Retriever
    scorings: Mapping[str, Scoring] = field(default_factory=dict)

    @classmethod
    def of(cls, snapshot: Snapshot) -> LoadedScope:
        return cls(snapshot, retriever_for(snapshot))

    def with_profile(self, profile: Profile) -> LoadedScope:
        """This snapshot with the scoring of every variant of ``profile``."""
        scope = self.snapshot.scope
        scorings = {
            name: scoring_for(
                self.snapshot,
                profile.for_variant(name),
                control=profile,
                retriever=self.retriever,
                where=f"scope {scope} variant {name}",
            )
            for name in profile.variant_names
        }
        return dataclasses.replace(self, scorings=scorings)

    def scoring(self, variant: str) -> Scoring:
        return self.scorings.get(variant) or self.scorings[CONTROL]


def _check_deadline(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's time budget ran out")


def _answer(
    snap: Snapshot, items: np.ndarray, scores: np.ndarray, source: Source, blocked: bool = False
) -> Ranked:
    return Ranked(
        item_ids=[str(i) for i in snap.item_ids[items]],
        scores=[float(s) for s in scores],
        model_version=snap.version,
        source=source,
        personalization_blocked=blocked,
    )


@dataclass(frozen=True, slots=True)
class _Work:
    """One ranking computation, ``fn(*args)`` → (positions, scores): about ``size``
    multiply-adds. Each path below builds its own, for requests and warm-up alike."""

    size: int
    fn: Callable[..., tuple[np.ndarray, np.ndarray]]
    args: tuple[object, ...]

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fn(*self.args)


def _live(
    snap: Snapshot, scoring: Scoring, user: int, excluded: np.ndarray, depth: int, deadline: float
) -> _Work:
    """Recommend's live top ``depth`` for snapshot user ``user`` minus ``excluded``."""
    if scoring.kind == ITEM_ITEM:  # EASE: the user's items' rows of the item-item matrix
        assert snap.item_item is not None
        seen = snap.seen(user)
        args = (snap.item_item, scoring.bias, seen, excluded, depth, scoring.relevance)
        return _Work(len(seen) * snap.n_items, item_item_top_k, args)
    assert scoring.retriever is not None
    query = scoring.query(snap.user_vectors[user])
    return _Work(
        snap.n_items * snap.dim, scoring.retriever.top_k, (query, excluded, depth, deadline)
    )


def _candidates(
    snap: Snapshot, scoring: Scoring, user: int | None, candidates: np.ndarray, limit: int
) -> _Work:
    """RankCandidates' top ``limit`` of ``candidates`` for snapshot user ``user``, or by the
    non-personalized scores for None."""
    work = len(candidates) * snap.dim
    args: tuple[object, ...]
    if user is None:
        query = np.zeros(snap.dim, dtype=np.float32)
        args = (query, snap.item_vectors, scoring.popular_scores, candidates, EMPTY, limit)
        return _Work(work, kernels.topk_candidates, args)
    if scoring.kind == ITEM_ITEM:
        assert snap.item_item is not None
        seen = snap.seen(user)
        args = (snap.item_item, scoring.bias, seen, candidates, limit, scoring.relevance)
        return _Work(len(seen) * snap.n_items + len(candidates), item_item_candidates, args)
    query = scoring.query(snap.user_vectors[user])
    args = (query, snap.item_vectors, scoring.bias, candidates, EMPTY, limit)
    return _Work(work, kernels.topk_candidates, args)


def _nearest(
    snap: Snapshot, query: np.ndarray, excluded: np.ndarray, limit: int, deadline: float
) -> _Work:
    """The top ``limit`` items by ``query`` (float32[d]) · their unit vectors, minus
    ``excluded``: cosine similarity for a unit ``query``."""
    args = (query, snap.item_unit, snap.zero_bias, excluded, limit, deadline)
    return _Work(snap.n_items * snap.dim, scan_top_k, args)


def _recent_query(snap: Snapshot, recent: np.ndarray) -> np.ndarray:
    """Σ_j cos(item_j, i) = (Σ_j unit_j) · unit_i: one query (float32[d]) scores every item
    by its summed similarity to the ``recent`` positions."""
    return np.ascontiguousarray(snap.item_unit[recent].sum(axis=0), dtype=np.float32)


class Ranker:
    """Serves rankings from the loaded snapshots of every scope."""

    def __init__(
        self,
        cache: RankingCache | None,
        optouts: OptOutView,
        *,
        executor: Executor | None = None,
        offload_min_work: int = 1_000_000,
        profiles: Mapping[str, Profile] | None = None,
    ) -> None:
        self._cache = cache
        self._optouts = optouts
        self._executor = executor
        self._offload_min_work = offload_min_work
        self._profiles = dict(profiles or {})
        self._scopes: dict[str, LoadedScope] = {}

    # -- snapshots ------------------------------------------------------------------------

    def prepare(self, loaded: LoadedScope) -> LoadedScope:
        """``loaded`` with the scoring of each variant of its scope's profile, each ranking
        path run once on it: an install's costly part (catalog-sized passes, e.g. 0.12 s a
        variant at 1M items; numba compiling a kernel for array types or flags it has not
        met yet, seconds), so that it can run off the event loop."""
        prepared = loaded.with_profile(self._profile(loaded.snapshot.scope))
        warm_paths(prepared)
        return prepared

    def install(self, loaded: LoadedScope) -> None:
        """Make ``loaded``, as ``prepare`` returned it, the scope's serving snapshot: one
        reference swap."""
        self._scopes = {**self._scopes, loaded.snapshot.scope: loaded}

    def loaded(self) -> dict[str, LoadedScope]:
        return dict(self._scopes)

    def scope(self, name: str) -> LoadedScope:
        """The scope's loaded snapshot; NotReady (UNAVAILABLE) while none at all is loaded, as on
        a new deployment before its first nightly, InvalidInput for a scope nobody published."""
        loaded = self._scopes.get(name)
        if loaded is None:
            if not self._scopes:
                raise NotReady(
                    "no snapshot loaded yet: this server ranks once `privrank jobs nightly` "
                    "has published one; retry later"
                )
            raise InvalidInput(f"unknown scope {name!r} (known: {', '.join(sorted(self._scopes))})")
        return loaded

    def holders(self, user_id: str) -> int:
        """How many loaded snapshots hold a vector of the user that no erasure masks yet."""
        return sum(
            ls.snapshot.user_position(user_id) is not None
            and not self._erased(user_id, ls.snapshot)
            for ls in self._scopes.values()
        )

    def _erased(self, user_id: str, snap: Snapshot) -> bool:
        """Whether the user was erased since ``snap``'s data was read: their vector in it stays
        masked, however late it was built."""
        erased_at = self._optouts.erased_at(user_id)
        return erased_at is not None and snap.data_as_of <= erased_at

    def personal(self, user_id: str, snap: Snapshot) -> bool:
        """Whether the user may be ranked personally from ``snap``: the opt-out view allows
        it (personalization globally on, the user's opt-out confirmed off), and the user not
        erased since ``snap``'s data was read."""
        if self._erased(user_id, snap):
            return False
        return self._optouts.personalization_allowed(user_id)

    # -- the rungs ------------------------------------------------------------------------

    @staticmethod
    def popular(
        snap: Snapshot,
        excluded: np.ndarray,
        limit: int,
        blocked: bool = False,
        segment: int | None = None,
        scoring: Scoring | None = None,
    ) -> Ranked:
        """The non-personalized ranking, minus ``excluded``: the most popular items of the
        request's context segment (daypart x device) if the snapshot has them, topped up with
        the most popular of the scope (``scoring``'s non-personalized order if given: a rule
        scope's base scores)."""
        picked = np.empty(0, dtype=np.int64)
        scores = np.empty(0, dtype=np.float32)
        if segment is not None and snap.segment_items is not None:
            assert snap.segment_scores is not None
            row = snap.segment_items[segment]
            keep = (row >= 0) & ~np.isin(row, excluded)
            picked, scores = row[keep][:limit], snap.segment_scores[segment][keep][:limit]
        source = Source.CONTEXT if len(picked) else Source.POPULAR
        if len(picked) < limit:
            order = snap.popular if scoring is None else scoring.popular
            by_position = snap.item_popularity if scoring is None else scoring.popular_scores
            head = order[: limit + len(excluded) + len(picked)]
            head = head[~np.isin(head, excluded) & ~np.isin(head, picked)]
            head = head[: limit - len(picked)]
            # top-ups rank below every context pick: scale scope popularity under the last one
            floor = float(scores[-1]) if len(scores) else 1.0
            picked = np.concatenate([picked, head])
            scores = np.concatenate([scores, by_position[head] * floor])
        return _answer(snap, picked, scores, source, blocked)

    async def _recent_neighbours(
        self, snap: Snapshot, recent: np.ndarray, excluded: np.ndarray, limit: int, deadline: float
    ) -> Ranked | None:
        """For a user the model does not know yet: the items most similar to the items of
        their events since the model was built (``recent``, positions)."""
        if len(recent) == 0:
            return None
        query = _recent_query(snap, recent)
        items, scores = await self._compute(
            deadline, _nearest(snap, query, excluded, limit, deadline)
        )
        return _answer(snap, items, scores, Source.RECENT) if len(items) else None

    async def _lookup(
        self, snap: Snapshot, user_id: str, ranking: bool
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
        """From the cache, in one round trip: the user's precomputed ranking if ``ranking``
        (else None), and the positions of their recent items (sorted int64); (None, EMPTY)
        while Redis is unreachable (its socket timeout bounds the wait, its breaker skips a
        dead one)."""
        if self._cache is None:
            return None, EMPTY
        after = self._optouts.erased_at(user_id)  # none from before an erasure whose purge failed
        try:
            if ranking:
                hit, recent = await self._cache.get_with_recent(
                    snap.scope, snap.version, user_id, after=after
                )
            else:
                hit, recent = None, await self._cache.recent(snap.scope, user_id, after=after)
        except StoreUnavailable as exc:
            log.debug("rank cache unavailable: %s", exc)
            return None, EMPTY
        return hit, snap.item_positions(recent)

    @staticmethod
    def _cached(
        snap: Snapshot,
        hit: tuple[np.ndarray, np.ndarray],
        excluded: np.ndarray,
        limit: int,
        depth: int,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The precomputed ranking ``hit`` minus ``excluded``, if it still holds ``limit``
        and, where the exclusions cut it, the ``depth`` the live ranking would re-rank
        (diversity re-ranks that many: fewer would answer otherwise than live does), cut to
        ``depth`` (precompute stores some more, for the exclusions)."""
        items, scores = hit
        if len(items) and (items.max() >= snap.n_items or items.min() < 0):
            log.warning("cached ranking for scope %s does not fit its snapshot", snap.scope)
            return None
        whole = len(items)
        if len(excluded):
            keep = ~np.isin(items, excluded)
            items, scores = items[keep], scores[keep]
        if len(items) < max(limit, min(depth, whole)):
            return None
        return items[:depth], scores[:depth]

    def _finish(
        self,
        snap: Snapshot,
        items: np.ndarray,
        scores: np.ndarray,
        limit: int,
        source: Source,
        profile: Profile,
    ) -> Ranked:
        """Cut a best-first list to ``limit``, diversified by the profile's MMR strength."""
        strength = profile.diversity
        if strength > 0 and len(items) > 1:
            order = mmr(items, scores, snap.item_unit, limit, strength)
            items, scores = items[order], scores[order]
        return _answer(snap, items[:limit], scores[:limit], source)

    def _profile(self, scope: str) -> Profile:
        return self._profiles.get(scope, DEFAULT_PROFILE)

    def variant(self, scope: str, user_id: str) -> tuple[str, Profile]:
        """The user's A/B variant in the scope and the settings it serves with."""
        base = self._profile(scope)
        name = base.variant_of(scope, user_id)
        return name, base.for_variant(name)

    # -- the RPCs -------------------------------------------------------------------------

    async def recommend(
        self,
        user_id: str,
        scope: str,
        limit: int,
        exclude_ids: Sequence[str],
        deadline: float,
        segment: int | None = None,
    ) -> Ranked:
        """``segment`` is the request's context segment (features.schema.context_segment)."""
        loaded = self.scope(scope)
        variant, profile = self.variant(scope, user_id)
        answer = await self._recommend(
            loaded, user_id, limit, exclude_ids, deadline, segment, profile, loaded.scoring(variant)
        )
        return dataclasses.replace(answer, variant=variant)

    async def _recommend(
        self,
        loaded: LoadedScope,
        user_id: str,
        limit: int,
        exclude_ids: Sequence[str],
        deadline: float,
        segment: int | None,
        profile: Profile,
        scoring: Scoring,
    ) -> Ranked:
        snap = loaded.snapshot
        caller_excluded = snap.item_positions([*exclude_ids, *profile.exclude_items])
        if scoring.kind == RULES:
            segment = None  # a rule scope's non-personalized ranking is its base scores
        if not self.personal(user_id, snap):
            return self.popular(
                snap, caller_excluded, limit, blocked=True, segment=segment, scoring=scoring
            )
        user = snap.user_position(user_id)
        # precompute ranks as control scores: a variant that scores otherwise skips the cache
        hit, recent = await self._lookup(snap, user_id, user is not None and scoring.cacheable)
        # the user's events since the model was built are interactions too: never served
        fresh_excluded = np.union1d(caller_excluded, recent).astype(np.int64)
        if user is None:
            neighbours = None
            if scoring.kind != RULES:
                neighbours = await self._recent_neighbours(
                    snap, recent, fresh_excluded, limit, deadline
                )
            return neighbours or self.popular(
                snap, fresh_excluded, limit, segment=segment, scoring=scoring
            )
        depth = profile.ranking_depth(limit)
        cached = None if hit is None else self._cached(snap, hit, fresh_excluded, limit, depth)
        if cached is not None:
            return self._finish(snap, *cached, limit, Source.CACHED, profile)
        excluded = np.union1d(snap.seen(user), fresh_excluded).astype(np.int64)
        work = _live(snap, scoring, user, excluded, depth, deadline)
        items, scores = await self._compute(deadline, work)
        if len(items) == 0:
            return self.popular(snap, excluded, limit, scoring=scoring)
        return self._finish(snap, items, scores, limit, Source.LIVE, profile)

    async def rank_candidates(
        self, user_id: str, scope: str, candidate_ids: Sequence[str], limit: int, deadline: float
    ) -> Ranked:
        """Order the caller's candidates for the user, scored as Recommend scores (the
        variant's model and bias); unknown candidates are dropped."""
        loaded = self.scope(scope)
        snap = loaded.snapshot
        variant, profile = self.variant(scope, user_id)
        scoring = loaded.scoring(variant)
        candidates = snap.item_positions(list(candidate_ids))
        excluded = snap.item_positions(list(profile.exclude_items))
        candidates = candidates[~np.isin(candidates, excluded)]
        limit = limit or len(candidates)
        personal = self.personal(user_id, snap)
        user = snap.user_position(user_id) if personal else None
        work = _candidates(snap, scoring, user, candidates, limit)
        items, scores = await self._compute(deadline, work)
        if user is None:
            answer = _answer(snap, items, scores, Source.POPULAR, blocked=not personal)
        else:
            answer = _answer(snap, items, scores, Source.LIVE)
        return dataclasses.replace(answer, variant=variant)

    async def similar_items(self, item_id: str, scope: str, limit: int, deadline: float) -> Ranked:
        """Items nearest to ``item_id`` by cosine similarity of their embeddings, never the
        item itself nor the scope's ``exclude_items``. An item nobody has interacted with yet
        has no embedding (a zero vector, near to nothing): it gets the scope's popular items.
        An excluded item is NotFound, like one the scope does not hold: it is never served."""
        loaded = self.scope(scope)
        snap = loaded.snapshot
        pos = snap.item_position(item_id)
        excluded = snap.item_positions(list(self._profile(scope).exclude_items))
        if pos is None or pos in excluded:
            raise NotFound(f"item {item_id!r} is not in scope {scope!r}")
        excluded = np.union1d(excluded, [pos]).astype(np.int64)
        query = snap.item_unit[pos]
        if not query.any():
            return self.popular(snap, excluded, limit, scoring=loaded.scoring(CONTROL))
        items, scores = await self._compute(
            deadline, _nearest(snap, query, excluded, limit, deadline)
        )
        return _answer(snap, items, scores, Source.LIVE)

    async def _compute(self, deadline: float, work: _Work) -> tuple[np.ndarray, np.ndarray]:
        """Run CPU work (a kernel or a retrieval) unless the deadline has passed: inline when
        small, else on the kernel pool, so the event loop answers other calls meanwhile (on
        another core where there is one)."""
        _check_deadline(deadline)
        if self._executor is None or work.size < self._offload_min_work:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)


def warm_paths(loaded: LoadedScope) -> None:
    """Run every ranking path once on ``loaded`` (with its scorings), as requests run them.

    numba compiles a kernel for each combination of its arguments' types and flags, and a
    snapshot's arrays are read-only memory maps where a variant's scores or a request's
    query are not: only the paths' own arrays compile exactly what requests will call, so no
    request compiles (seconds, holding every other call up)."""
    snap = loaded.snapshot
    if snap.n_items == 0:
        return
    some = np.arange(min(2, snap.n_items), dtype=np.int64)  # as exclusions and candidates are
    _nearest(snap, snap.item_unit[0], some, 1, math.inf)()  # SimilarItems
    _nearest(snap, _recent_query(snap, some), some, 1, math.inf)()  # a newcomer's recent items
    for scoring in loaded.scorings.values():
        _candidates(snap, scoring, None, some, 1)()
        if snap.n_users:
            _live(snap, scoring, 0, some, 1, math.inf)()
            _candidates(snap, scoring, 0, some, 1)()
