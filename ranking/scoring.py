"""Serve-time scoring: how a scope's profile, or an A/B variant of it, turns a snapshot into
the additive item bias and the query the kernels score with.

A snapshot stores only what does not depend on a profile, per item: normalised log
popularity, recency, engagement rate and a category code (with the category names). ``item_bias``
is the one function that weighs them; the build job (for the faiss index), precompute,
evaluate and serving all call it, and serving calls it once per scope and variant when a
snapshot is installed, never per request.

    learned scopes: score = relevance_weight × model score + bias
    rule scopes:    score = base[c] × (1 + engagement_weight × E[user, c]) + bias
    bias = popularity_weight × popularity + recency_weight × recency + boosts[c]
           + engagement_weight × engagement   (learned scopes)
           + base[c]                          (rule scopes)

where c is the item's category and E[user, c] the share of the user's engagement that went to
category c (a rule snapshot's user vectors; aggregates only). A rule snapshot's item vectors
are the one-hot category codes, so the rule score is the kernels' ``vector · query + bias``
with ``query = engagement_weight × base ⊙ E[user]``: rule scopes run on the same kernels.
The model score is scaled through the query too (``relevance_weight × user vector``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ranking.itemitem import item_item_top_k
from ranking.profiles import Profile
from ranking.retrieval import ExactRetriever, Retriever
from ranking.snapshot import Snapshot

log = logging.getLogger(__name__)

DENSE, ITEM_ITEM, RULES = "dense", "item_item", "rules"


def category_weights(table: tuple[tuple[str, float], ...], categories: np.ndarray) -> np.ndarray:
    """float64[C]: the weight ``table`` gives each category name (0 where it names none)."""
    weights = dict(table)
    return np.array([weights.get(str(name), 0.0) for name in categories], dtype=np.float64)


def item_bias(
    profile: Profile,
    popularity: np.ndarray,
    recency: np.ndarray,
    engagement: np.ndarray,
    category: np.ndarray,
    categories: np.ndarray,
    *,
    rules: bool = False,
) -> np.ndarray:
    """The additive bias of every item (float32[n]) under ``profile``.

    ``popularity``, ``recency``, ``engagement``: float32[n] in [0, 1]; ``category``: int[n]
    codes into ``categories`` (str[C], code 0 = no category). Summed in float64 in a fixed
    order, so the same inputs give the same bits in the build job and in every server.
    With ``rules``, the item's base score takes the place of the engagement term (whose
    weight then scales the user's engagement instead, in the query).
    """
    bias = profile.popularity_weight * popularity.astype(np.float64)
    bias += profile.recency_weight * recency.astype(np.float64)
    if rules:
        bias += category_weights(profile.base_scores, categories)[category]
    else:
        bias += profile.engagement_weight * engagement.astype(np.float64)
    if profile.boosts:
        bias += category_weights(profile.boosts, categories)[category]
    return bias.astype(np.float32)


def snapshot_bias(snap: Snapshot, profile: Profile) -> np.ndarray:
    """``item_bias`` over a snapshot's item components. A snapshot older than the components
    serves the bias it was built with (its profile's weights, no boosts)."""
    if snap.item_recency is None or snap.item_engagement is None or snap.item_category is None:
        return snap.item_bias
    assert snap.categories is not None
    return item_bias(
        profile,
        snap.item_popularity,
        snap.item_recency,
        snap.item_engagement,
        snap.item_category,
        snap.categories,
        rules=snap.manifest.get("model") == RULES,
    )


@dataclass(frozen=True, eq=False)
class Scoring:
    """How one scope variant scores a snapshot's items. Shapes: n items, d dimensions.

    ``kind``: ``dense`` (user vector · item vectors, exactly or through the faiss index),
    ``item_item`` (the user's rows of the EASE matrix) or ``rules``. ``weight``: what a user
    vector is multiplied by to make the query (a scalar, or float32[d] for rules).
    ``popular`` / ``popular_scores``: the non-personalized order (positions) and each
    position's score (popularity plus boosts; a rule scope's base scores and boosts).
    ``cacheable``: the variant scores exactly as control, so control's precomputed rankings
    are its rankings too.
    """

    kind: str
    bias: np.ndarray  # float32[n], read-only
    weight: float | np.ndarray
    popular: np.ndarray  # int64[n]
    popular_scores: np.ndarray  # float32[n], by position
    cacheable: bool = True
    retriever: Retriever | None = None
    relevance: float = 1.0  # the item-item model's score multiplier

    def query(self, user_vector: np.ndarray) -> np.ndarray:
        """The kernels' query for a user vector (float32[d], C-contiguous)."""
        return np.ascontiguousarray(np.asarray(user_vector) * self.weight, dtype=np.float32)

    def queries(self, user_vectors: np.ndarray) -> np.ndarray:
        """``query`` of each row (float32[b, d])."""
        return np.ascontiguousarray(np.asarray(user_vectors) * self.weight, dtype=np.float32)


def _kind(snap: Snapshot, profile: Profile, where: str) -> str:
    if snap.manifest.get("model") == RULES:
        if profile.model != RULES:
            log.warning("%s: the snapshot is rule-based; serving it by its rules", where)
        return RULES
    if profile.model == RULES:
        log.warning("%s: profile says rules but the snapshot has a learned model", where)
    if profile.model == "embeddings" or snap.item_item is None:
        if profile.model == ITEM_ITEM:
            log.warning("%s: no item-item matrix in the snapshot; serving embeddings", where)
        return DENSE
    return ITEM_ITEM


def scoring_for(
    snap: Snapshot,
    profile: Profile,
    *,
    control: Profile | None = None,
    retriever: Retriever | None = None,
    where: str = "",
) -> Scoring:
    """The scoring of ``profile`` (a scope's or a variant's settings) over ``snap``.

    ``control``: the scope's own profile, to tell whether this one scores the same (and may
    be served control's cached rankings). ``retriever``: the snapshot's retriever (built
    with the snapshot's stored bias); it is re-biased for this profile. Without one, an exact
    retriever is made."""
    where = where or snap.scope
    kind = _kind(snap, profile, where)
    bias = snapshot_bias(snap, profile)
    bias.setflags(write=False)
    if kind == RULES:
        assert snap.categories is not None
        weight: float | np.ndarray = (
            profile.engagement_weight * category_weights(profile.base_scores, snap.categories)
        ).astype(np.float32)
        # non-personalized: base scores and boosts only, ties to the lower position (ID)
        popular = np.argsort(-bias.astype(np.float64), kind="stable").astype(np.int64)
        popular_scores = bias
    else:
        weight = float(profile.relevance_weight)
        popular, popular_scores = snap.popular, snap.item_popularity
        if profile.boosts and snap.item_category is not None and snap.categories is not None:
            # boosts and demotions hold for the non-personalized ranking too
            boosts = category_weights(profile.boosts, snap.categories)[snap.item_category]
            popular_scores = (snap.item_popularity + boosts).astype(np.float32)
            popular = np.argsort(-popular_scores.astype(np.float64), kind="stable").astype(np.int64)
    if retriever is None:
        retriever = ExactRetriever(snap.item_vectors, bias)
    elif not np.array_equal(bias, snap.item_bias):
        retriever = retriever.with_bias(bias)
    cacheable = control is None or profile.scores_like(control)
    return Scoring(
        kind,
        bias,
        weight,
        popular,
        popular_scores,
        cacheable,
        retriever,
        relevance=float(profile.relevance_weight),
    )


def top_k_batch(
    snap: Snapshot,
    scoring: Scoring,
    users: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k for snapshot user positions ``users`` (int64[b]) minus the CSR rows
    ``seen_indptr`` / ``seen_indices`` (their seen items): (items int64[b, k], scores
    float32[b, k], counts int64[b]). What serving answers: dense scoring goes through
    ``scoring.retriever`` (batched; row by row the same as its single-query path)."""
    if scoring.kind == ITEM_ITEM:
        assert snap.item_item is not None
        k = min(k, snap.n_items)
        out_i = np.full((len(users), k), -1, dtype=np.int64)
        out_s = np.zeros((len(users), k), dtype=np.float32)
        counts = np.zeros(len(users), dtype=np.int64)
        for r in range(len(users)):
            seen = seen_indices[seen_indptr[r] : seen_indptr[r + 1]]
            items, scores = item_item_top_k(
                snap.item_item, scoring.bias, seen, seen, k, scoring.relevance
            )
            out_i[r, : len(items)], out_s[r, : len(items)], counts[r] = items, scores, len(items)
        return out_i, out_s, counts
    retriever = scoring.retriever or ExactRetriever(snap.item_vectors, scoring.bias)
    return retriever.top_k_batch(
        scoring.queries(snap.user_vectors[users]), seen_indptr, seen_indices, k
    )
