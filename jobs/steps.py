"""The steps of the nightly pipeline. Each takes the job context and a scope, is idempotent, and
returns a one-line summary; failures raise from the error tree.

    refresh-features → train → build → precompute → evaluate → cleanup
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from features.cache import RECENT_ITEMS, RankCache
from features.errors import JobError
from features.postgres import PgStore, RanksReplacement, TrainingPairs
from features.privacy import retract_not_personal
from features.schema import CONTEXT_SEGMENTS, context_segment, user_digest
from jobs.als import AlsParams, to_csr, train_als
from jobs.ease import gram, train_ease
from jobs.metrics import evaluate_rankings, ndcg_at_k
from ranking import kernels, snapshot
from ranking.diversity import mmr
from ranking.itemitem import item_item_top_k
from ranking.profiles import CONTROL, DEFAULT_PROFILE, Profile
from ranking.retrieval import (
    SEARCH_PARAMS_KEY,
    build_index,
    retriever_for,
    tune_search,
    write_index,
)
from ranking.scoring import RULES, Scoring, item_bias, scoring_for, top_k_batch
from server.config import Config

log = logging.getLogger(__name__)

RECENCY_DAYS = 7.0
HOLDOUT_FRACTION = 0.2
EVAL_USERS = 2000
EVAL_KS = (5, 10, 20)
BATCH_USERS = 1024
TUNE_REGULARIZATION = (0.01, 0.1, 1.0)
TUNE_ALPHA = (1.0, 4.0, 10.0, 40.0)
TUNE_MAX_PAIRS = 2_000_000
TUNE_MIN_USERS = 20
TUNE_MAX_USERS = 2_000  # validation users scored per candidate setting (a seeded sample)
EASE_MAX_ITEMS = 10_000  # n² floats in memory, n³ to train
EASE_LAMBDA = (50.0, 200.0, 800.0, 3200.0)
RECALL_TARGET = 0.95  # of the ANN index's top-k against the exact scan
TUNE_QUERIES = 300
TUNE_K = 10  # Recommend's default limit: the short lists are the hard ones to get right
SEGMENT_DEPTH = 200
SEGMENT_MIN_WEIGHT = 50.0


@dataclass(frozen=True)
class JobContext:
    config: Config
    pg: PgStore
    cache: RankCache

    def model_path(self, scope: str) -> Path:
        return self.config.model_dir / scope / "model.npz"

    def als_params(self) -> AlsParams:
        return AlsParams(factors=self.config.embedding_dim)


async def _as_of(ctx: JobContext, scope: str) -> datetime:
    """The reference time of a scope's windows: now, or the newest event of an older log."""
    now = datetime.now(UTC)
    latest = await ctx.pg.latest_event_time(scope)
    return min(now, latest) if latest else now


@dataclass(frozen=True)
class _Factorized:
    user_ids: np.ndarray  # str[u], sorted
    item_ids: np.ndarray  # str[n], sorted
    user_vectors: np.ndarray  # float32[u, f]
    item_vectors: np.ndarray  # float32[n, f]
    seen_indptr: np.ndarray  # int64[u + 1]
    seen_indices: np.ndarray  # int64[nnz], positions in item_ids


def _factorize(
    pairs: TrainingPairs, params: AlsParams, label: str, *, progress: bool = True
) -> _Factorized:
    if not np.any(pairs.strength > 0):
        raise JobError("no positive interactions to train on")
    user_ids, users = np.unique(pairs.user_ids, return_inverse=True)
    item_ids, items = np.unique(pairs.item_ids, return_inverse=True)
    positive = pairs.strength > 0
    show = None if progress else True  # tqdm: None = only on a terminal, True = never
    with tqdm(total=params.iterations, desc=label, unit="iter", disable=show) as bar:
        user_vectors, item_vectors = train_als(
            users[positive],
            items[positive],
            pairs.strength[positive],
            len(user_ids),
            len(item_ids),
            params,
            bar,
        )
    indptr, indices, _ = to_csr(users, items, np.ones(len(users), np.float32), len(user_ids))
    return _Factorized(user_ids, item_ids, user_vectors, item_vectors, indptr, indices)


async def refresh_features(ctx: JobContext, scope: str) -> str:
    rows = await ctx.pg.refresh_features(scope, now=await _as_of(ctx, scope))
    return f"{rows} user feature vectors refreshed"


def _subset(pairs: TrainingPairs, keep: np.ndarray) -> TrainingPairs:
    return TrainingPairs(
        pairs.user_ids[keep], pairs.item_ids[keep], pairs.strength[keep], pairs.last_at[keep]
    )


def _validation_split(
    pairs: TrainingPairs, fraction: float
) -> tuple[TrainingPairs, dict[str, set[str]]]:
    """Carve a validation set out of training data: for each user with at least three
    positive pairs, the most recent ``fraction`` of them (by last interaction) is held out."""
    positive = np.flatnonzero(pairs.strength > 0)
    order = positive[np.lexsort((pairs.last_at[positive], pairs.user_ids[positive]))]
    keep = np.ones(len(pairs.strength), dtype=bool)
    held: dict[str, set[str]] = {}
    users = pairs.user_ids[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        count = end - start
        if count < 3:
            continue
        last = order[end - max(1, int(count * fraction)) : end]
        keep[last] = False
        held[str(users[start])] = set(pairs.item_ids[last].tolist())
    return _subset(pairs, keep), held


def _rank(
    model: _Factorized, users: np.ndarray, k: int, bias: np.ndarray | None = None
) -> list[list[int]]:
    """Top-k item positions for model user positions ``users``, their training items excluded."""
    indptr, indices = select_rows(model.seen_indptr, model.seen_indices, users)
    zeros = np.zeros(len(model.item_ids), np.float32)
    items, _, counts = kernels.topk_dense_batch(
        np.ascontiguousarray(model.user_vectors[users]),
        model.item_vectors,
        zeros if bias is None else bias,
        indptr,
        indices,
        k,
    )
    return [items[r, : counts[r]].tolist() for r in range(len(users))]


@dataclass(frozen=True)
class _Validation:
    """A validation split carved from training pairs, and the scores models reach on it."""

    train: TrainingPairs
    held: dict[str, set[str]]  # user → held-out items
    index: _Factorized  # the training part's user/item positions and seen items

    def ndcg(self, rank: Callable[[np.ndarray], list[list[int]]]) -> float:
        """Mean NDCG@10 of ``rank(user positions) -> item positions`` over held-out users."""
        user_pos = {u: n for n, u in enumerate(self.index.user_ids.tolist())}
        item_pos = {i: n for n, i in enumerate(self.index.item_ids.tolist())}
        users = [u for u in sorted(self.held) if u in user_pos]
        rankings = rank(np.array([user_pos[u] for u in users], np.int64))
        return float(
            np.mean(
                [
                    ndcg_at_k(ranked, {item_pos[i] for i in self.held[u] if i in item_pos}, 10)
                    for u, ranked in zip(users, rankings, strict=True)
                ]
            )
        )


def _validation(pairs: TrainingPairs, base: AlsParams) -> _Validation | str:
    """The validation split, or the reason there is none."""
    if len(pairs.strength) > TUNE_MAX_PAIRS:
        return f"over {TUNE_MAX_PAIRS} pairs: not tuned"
    train_part, held = _validation_split(pairs, HOLDOUT_FRACTION)
    if len(held) < TUNE_MIN_USERS:
        return "too little data to tune"
    if len(held) > TUNE_MAX_USERS:  # each setting scans the catalog once per validation user
        sample = np.random.default_rng(0).choice(sorted(held), TUNE_MAX_USERS, replace=False)
        held = {str(u): held[str(u)] for u in sorted(sample)}
    index = _factorize(train_part, replace(base, iterations=0), "index", progress=False)
    return _Validation(train_part, held, index)


def _tune_als(split: _Validation, base: AlsParams, label: str) -> tuple[AlsParams, float]:
    """Regularization and confidence scaling by validation NDCG@10. Deterministic: the grid
    is fixed and ties keep the earlier setting."""
    best: tuple[float, AlsParams] = (-1.0, base)
    grid = [(reg, alpha) for reg in TUNE_REGULARIZATION for alpha in TUNE_ALPHA]
    for reg, alpha in tqdm(grid, desc=f"tune ALS {label}", unit="fit", disable=None):
        params = replace(base, regularization=reg, alpha=alpha)
        model = _factorize(split.train, params, label, progress=False)
        score = split.ndcg(partial(_rank, model, k=10))
        if score > best[0]:
            best = (score, params)
    return best[1], best[0]


def _positive_gram(pairs: TrainingPairs, index: _Factorized) -> np.ndarray:
    positive = pairs.strength > 0
    users = np.searchsorted(index.user_ids, pairs.user_ids[positive])
    items = np.searchsorted(index.item_ids, pairs.item_ids[positive])
    return gram(users, items, len(index.item_ids))


def _rank_item_item(
    matrix: np.ndarray, index: _Factorized, users: np.ndarray, k: int
) -> list[list[int]]:
    bias = np.zeros(len(index.item_ids), np.float32)
    out = []
    for u in users:
        seen = index.seen_indices[index.seen_indptr[u] : index.seen_indptr[u + 1]]
        out.append(item_item_top_k(matrix, bias, seen, seen, k)[0].tolist())
    return out


def _tune_ease(split: _Validation, label: str) -> tuple[float, float]:
    """EASE's λ by validation NDCG@10: (λ, score)."""
    g = _positive_gram(split.train, split.index)
    best = (-1.0, EASE_LAMBDA[0])
    for lam in tqdm(EASE_LAMBDA, desc=f"tune EASE {label}", unit="fit", disable=None):
        matrix = train_ease(g, lam)
        score = split.ndcg(partial(_rank_item_item, matrix, split.index, k=10))
        if score > best[0]:
            best = (score, lam)
    return best[1], best[0]


def _rules(ctx: JobContext, scope: str) -> bool:
    return ctx.config.profile(scope).model == RULES


async def train(ctx: JobContext, scope: str) -> str:
    """Embeddings always (similar items, candidates, the ANN index); for catalogs up to
    EASE_MAX_ITEMS also EASE, which serves Recommend when it wins on validation."""
    if _rules(ctx, scope):
        return "rule-based scope: no model to train"
    # before the read: an erasure stamped from then on may not be in it (read_horizon)
    data_as_of = (await ctx.pg.read_horizon()).timestamp()
    pairs = await ctx.pg.training_pairs(scope)
    params, note, ease_lambda = ctx.als_params(), "", None
    split = _validation(pairs, params)
    if isinstance(split, str):
        note = f"default hyperparameters ({split})"
    else:
        params, als_score = _tune_als(split, params, scope)
        note = (
            f"ALS regularization={params.regularization} alpha={params.alpha}: validation "
            f"ndcg@10 {als_score:.4f}"
        )
        if len(split.index.item_ids) <= EASE_MAX_ITEMS:
            lam, ease_score = _tune_ease(split, scope)
            note += f"; EASE lambda={lam:g}: {ease_score:.4f}"
            if ease_score > als_score:
                ease_lambda = lam
    model = _factorize(pairs, params, f"train {scope}")
    extra: dict[str, np.ndarray] = {}
    if ease_lambda is not None:
        extra["item_item"] = train_ease(_positive_gram(pairs, model), ease_lambda)
    chosen = {
        **asdict(params),
        "model": "ease" if ease_lambda else "als",
        "ease_lambda": ease_lambda,
    }
    path = ctx.model_path(scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".model-{os.getpid()}.npz")
    arrays: dict[str, Any] = {k: getattr(model, k) for k in _Factorized.__dataclass_fields__}
    arrays["params"] = np.array(json.dumps(chosen, sort_keys=True))
    arrays["data_as_of"] = np.array(data_as_of)
    arrays.update(extra)
    np.savez(staging, **arrays)
    snapshot.replace_durably(staging, path)
    await ctx.pg.save_embeddings(scope, list(model.user_ids), model.user_vectors)
    return (
        f"{len(model.user_ids)} users x {len(model.item_ids)} items, "
        f"{len(pairs.strength)} pairs; serving {chosen['model'].upper()} ({note})"
    )


def _trained(ctx: JobContext, scope: str) -> dict[str, object]:
    """What the last train chose (empty if it has not run)."""
    try:
        with np.load(ctx.model_path(scope), allow_pickle=False) as data:
            chosen: dict[str, object] = json.loads(str(data["params"]))
            return chosen
    except (OSError, KeyError, ValueError):
        return {}


def _trained_params(ctx: JobContext, scope: str) -> AlsParams:
    """The ALS hyperparameters the last train chose (defaults if it has not run)."""
    fields = set(AlsParams.__dataclass_fields__)
    chosen = {k: v for k, v in _trained(ctx, scope).items() if k in fields}
    return AlsParams(**chosen) if chosen else ctx.als_params()  # type: ignore[arg-type]


def _segments(
    rows: list[tuple[int, int, str, float]], item_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top SEGMENT_DEPTH item positions (and scores in [0, 1]) per context segment
    ``daypart * len(DEVICE_CATEGORIES) + device``; -1 / 0 padded. Segments with fewer than
    SEGMENT_MIN_WEIGHT of engagement stay empty, so serving falls back to scope popularity."""
    shape = (CONTEXT_SEGMENTS, SEGMENT_DEPTH)
    items = np.full(shape, -1, dtype=np.int64)
    scores = np.zeros(shape, dtype=np.float32)
    by_segment: dict[int, list[tuple[float, int]]] = {}
    for daypart, device, item_id, weight in rows:
        pos = int(np.searchsorted(item_ids, item_id))
        if pos < len(item_ids) and item_ids[pos] == item_id:
            segment = context_segment(device, daypart * 6)
            by_segment.setdefault(segment, []).append((weight, pos))
    for segment, entries in by_segment.items():
        if sum(w for w, _ in entries) < SEGMENT_MIN_WEIGHT:
            continue
        top = sorted(entries, key=lambda e: (-e[0], e[1]))[:SEGMENT_DEPTH]
        peak = top[0][0]
        for slot, (weight, pos) in enumerate(top):
            items[segment, slot] = pos
            scores[segment, slot] = weight / peak
    return items, scores


def _load_item_item(path: Path) -> np.ndarray | None:
    """The trained EASE matrix, if the last train chose EASE."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["item_item"]) if "item_item" in data.files else None
    except (OSError, ValueError) as exc:
        raise JobError(f"no usable trained model at {path}; run train first ({exc})") from exc


def _load_model(path: Path) -> tuple[_Factorized, float]:
    """The trained model and when train read its data (unix seconds)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            model = _Factorized(**{k: data[k] for k in _Factorized.__dataclass_fields__})
            return model, float(data["data_as_of"])
    except (OSError, KeyError, ValueError) as exc:
        raise JobError(f"no usable trained model at {path}; run train first ({exc})") from exc


async def _erased_since(ctx: JobContext, user_ids: np.ndarray, data_as_of: float) -> np.ndarray:
    """Which of ``user_ids`` (str[u]) were erased at or after ``data_as_of`` (unix seconds),
    as bool[u]: their data may be in what train read, and no snapshot may carry it."""
    erased = await ctx.pg.erasures(since=datetime.fromtimestamp(data_as_of, UTC))
    if not erased:
        return np.zeros(len(user_ids), dtype=bool)
    return np.array([user_digest(u) in erased for u in user_ids.tolist()], dtype=bool)


async def _last_erasure(ctx: JobContext) -> float | None:
    """When anyone was last erased (unix seconds), or None."""
    erased = await ctx.pg.latest_erasure()
    return erased.timestamp() if erased else None


def _without_users(model: _Factorized, drop: np.ndarray) -> _Factorized:
    """``model`` without the users where ``drop`` (bool[u]) holds: vectors and seen items."""
    keep = np.flatnonzero(~drop)
    seen_indptr, seen_indices = select_rows(model.seen_indptr, model.seen_indices, keep)
    return replace(
        model,
        user_ids=model.user_ids[keep],
        user_vectors=model.user_vectors[keep],
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
    )


@dataclass(frozen=True)
class _Items:
    """A scope's active items in snapshot order, with the profile-free components serving
    weighs into the bias (ranking/scoring.py)."""

    ids: np.ndarray  # str[n], sorted
    arrays: dict[str, np.ndarray]  # item_popularity, item_recency, ... as the snapshot keeps

    def bias(self, profile: Profile, *, rules: bool = False) -> np.ndarray:
        a = self.arrays
        return item_bias(
            profile,
            a["item_popularity"],
            a["item_recency"],
            a["item_engagement"],
            a["item_category"],
            a["categories"],
            rules=rules,
        )


async def _items(ctx: JobContext, scope: str, as_of: datetime, *, before: bool = False) -> _Items:
    """The scope's active items and their components as of ``as_of``; with ``before``, as
    the scope stood just before it (evaluate's holdout cutoff: no later event counts)."""
    if before:
        stats = await ctx.pg.item_stats(scope, before=as_of)
    else:
        stats = await ctx.pg.item_stats(scope, now=as_of)
    order = np.argsort(stats.item_ids)
    n = len(order)
    popularity = np.log1p(stats.popularity[order].astype(np.float64))
    popularity = popularity / popularity.max() if n and popularity.max() > 0 else popularity
    age_days = (as_of.timestamp() - stats.first_seen[order]) / 86400.0
    recency = np.exp(-np.clip(age_days, 0, None) / RECENCY_DAYS)
    # category code 0 is "no category"; the others in name order
    categories, codes = np.unique(
        np.concatenate([[""], stats.category[order]]), return_inverse=True
    )
    return _Items(
        stats.item_ids[order],
        {
            "item_popularity": popularity.astype(np.float32),
            "item_recency": recency.astype(np.float32),
            "item_engagement": stats.engagement[order].astype(np.float32),
            "item_category": codes[1:].astype(np.int32),
            "categories": categories.astype(str),
        },
    )


async def _aligned_features(ctx: JobContext, scope: str, user_ids: np.ndarray) -> np.ndarray:
    """The users' feature rows (float32[u, F]) in ``user_ids`` order; zeros where none."""
    feature_ids, feature_rows = await ctx.pg.user_features(scope)
    user_features = np.zeros((len(user_ids), feature_rows.shape[1]), dtype=np.float32)
    if len(feature_ids) and len(user_ids):
        fpos = np.minimum(np.searchsorted(user_ids, feature_ids), len(user_ids) - 1)
        hit = user_ids[fpos] == feature_ids
        user_features[fpos[hit]] = feature_rows[hit]
    return user_features


def _rule_arrays(items: _Items, pairs: TrainingPairs, profile: Profile) -> dict[str, np.ndarray]:
    """A rule scope's snapshot arrays over ``items`` (all but the user features): item vectors
    are one-hot category codes and user vectors the share of each user's engagement per
    category over ``pairs`` (pairs of other items left out), so ``vector · query`` with
    ``query = weight × base ⊙ share`` is the rule score's personal term (ranking/scoring.py);
    a user's pairs are their seen items, and the bias is ``profile``'s rule bias."""
    codes = items.arrays["item_category"]
    n, dim = len(items.ids), len(items.arrays["categories"])
    pos = np.minimum(np.searchsorted(items.ids, pairs.item_ids), max(n - 1, 0))
    known = items.ids[pos] == pairs.item_ids if n else np.zeros(len(pos), bool)
    user_ids, users = np.unique(pairs.user_ids[known], return_inverse=True)
    items_of, strength = pos[known], pairs.strength[known].astype(np.float64)
    shares = np.zeros((len(user_ids), dim), dtype=np.float64)
    np.add.at(shares, (users, codes[items_of]), strength)
    totals = shares.sum(axis=1, keepdims=True)
    shares = np.divide(shares, totals, out=np.zeros_like(shares), where=totals > 0)
    seen_indptr, seen_indices, _ = to_csr(
        users, items_of, np.ones(len(users), np.float32), len(user_ids)
    )
    return {
        "item_ids": items.ids,
        "item_vectors": np.eye(dim, dtype=np.float32)[codes],
        "item_bias": items.bias(profile, rules=True),
        **items.arrays,
        "user_ids": user_ids.astype(str),
        "user_vectors": shares.astype(np.float32),
        "seen_indptr": seen_indptr,
        "seen_indices": seen_indices,
    }


async def _build_rules(ctx: JobContext, scope: str) -> str:
    """A rule scope's snapshot from its training pairs (opted-out users left out)."""
    items = await _items(ctx, scope, await _as_of(ctx, scope))
    data_as_of = (await ctx.pg.read_horizon()).timestamp()
    pairs = await ctx.pg.training_pairs(scope)
    arrays = _rule_arrays(items, pairs, ctx.config.profile(scope))
    user_ids = arrays["user_ids"]
    arrays["user_features"] = await _aligned_features(ctx, scope, user_ids)
    version = snapshot.publish(
        ctx.config.snapshot_dir,
        scope,
        arrays,
        data_as_of=data_as_of,
        last_erasure=await _last_erasure(ctx),
        extra={"model": RULES},
    )
    published = snapshot.load(ctx.config.snapshot_dir / scope / version)
    await ctx.pg.record_model_version(scope, version, published.manifest)
    n, dim = len(items.ids), len(items.arrays["categories"])
    return f"published {version}: RULES, {n} items, {dim - 1} categories, {len(user_ids)} users"


def _learned_arrays(
    model: _Factorized, items: _Items, profile: Profile, item_item: np.ndarray | None
) -> dict[str, np.ndarray]:
    """A learned model's snapshot arrays over ``items`` (all but the user features): the
    model's vectors in item order (an item the model does not know gets zeros, one no longer
    among the items is dropped), its users' seen items, the EASE matrix if given, and the
    components with ``profile``'s bias (control's: the faiss index is built and tuned with
    it)."""
    item_ids = items.ids
    n, dim = len(item_ids), model.item_vectors.shape[1]
    # model items → snapshot positions
    pos = np.minimum(np.searchsorted(item_ids, model.item_ids), max(n - 1, 0))
    known = item_ids[pos] == model.item_ids if n else np.zeros(len(model.item_ids), bool)
    item_vectors = np.zeros((n, dim), dtype=np.float32)
    item_vectors[pos[known]] = model.item_vectors[known]

    remap = np.where(known, pos, -1)
    seen = remap[model.seen_indices]
    seen_rows = np.repeat(np.arange(len(model.user_ids)), np.diff(model.seen_indptr))
    keep = seen >= 0
    seen_indptr, seen_indices, _ = to_csr(
        seen_rows[keep], seen[keep], np.ones(int(keep.sum()), np.float32), len(model.user_ids)
    )
    arrays = {
        "item_ids": item_ids,
        "item_vectors": item_vectors,
        "item_bias": items.bias(profile),
        **items.arrays,
        "user_ids": model.user_ids,
        "user_vectors": model.user_vectors,
        "seen_indptr": seen_indptr,
        "seen_indices": seen_indices,
    }
    if item_item is not None:  # EASE serves: its matrix in snapshot item order
        arrays["item_item"] = np.zeros((n, n), dtype=np.float32)
        arrays["item_item"][np.ix_(pos[known], pos[known])] = item_item[np.ix_(known, known)]
    return arrays


async def build(ctx: JobContext, scope: str) -> str:
    """The snapshot of the last train's model, stamped with when train read its data; users
    erased since then are left out (the server masks those erased later: data_as_of)."""
    if _rules(ctx, scope):
        return await _build_rules(ctx, scope)
    model, data_as_of = _load_model(ctx.model_path(scope))
    erased = await _erased_since(ctx, model.user_ids, data_as_of)
    model = _without_users(model, erased)
    as_of = await _as_of(ctx, scope)
    items = await _items(ctx, scope, as_of)
    profile = ctx.config.profile(scope)
    arrays = _learned_arrays(model, items, profile, _load_item_item(ctx.model_path(scope)))
    item_vectors, bias = arrays["item_vectors"], arrays["item_bias"]
    seen_indptr, seen_indices = arrays["seen_indptr"], arrays["seen_indices"]
    n = len(items.ids)
    arrays["user_features"] = await _aligned_features(ctx, scope, model.user_ids)
    arrays["segment_items"], arrays["segment_scores"] = _segments(
        await ctx.pg.segment_popularity(scope, now=as_of), items.ids
    )
    kind = "ease" if "item_item" in arrays else "als"
    extra: dict[str, Any] = {"model": kind}
    index_writer = None
    if n > ctx.config.exact_search_max_items:
        index = build_index(item_vectors, bias)
        # search settings from measured recall on a sample of real queries, not guessed
        sample = np.random.default_rng(0).choice(
            len(model.user_ids), size=min(TUNE_QUERIES, len(model.user_ids)), replace=False
        )
        params = tune_search(
            index,
            item_vectors,
            bias,
            np.ascontiguousarray(model.user_vectors[sample]),
            TUNE_K,
            RECALL_TARGET,
            excluded=[seen_indices[seen_indptr[u] : seen_indptr[u + 1]] for u in sample],
        )
        extra[SEARCH_PARAMS_KEY] = params.to_dict()

        def index_writer(path: Path) -> None:
            write_index(index, path)

    version = snapshot.publish(
        ctx.config.snapshot_dir,
        scope,
        arrays,
        data_as_of=data_as_of,
        last_erasure=await _last_erasure(ctx),
        index_writer=index_writer,
        extra=extra,
    )
    published = snapshot.load(ctx.config.snapshot_dir / scope / version)
    await ctx.pg.record_model_version(scope, version, published.manifest)
    left_out = f" ({int(erased.sum())} erased since train left out)" if erased.any() else ""
    return f"published {version}: {kind.upper()}, {n} items, {len(model.user_ids)} users{left_out}"


async def precompute(ctx: JobContext, scope: str) -> str:
    """Control's rankings of the scope's active users, scored as serving scores them; users
    of an A/B variant that scores otherwise are skipped (serving ranks them live). Those who
    opt out or are erased while it runs have theirs deleted again at the end. A scope with
    no published snapshot yet (events, but no nightly since) is skipped."""
    if snapshot.current_version(ctx.config.snapshot_dir, scope) is None:
        return "no published snapshot yet (the nightly builds the first): skipped"
    snap = snapshot.load_current(ctx.config.snapshot_dir, scope)
    profile = ctx.config.profile(scope)
    # the retriever serving uses: faiss above the exact-search threshold, batched here
    scoring = scoring_for(snap, profile, retriever=retriever_for(snap))
    active = await ctx.pg.active_users(scope, now=await _as_of(ctx, scope))
    live = {
        name for name in profile.variant_names if not profile.for_variant(name).scores_like(profile)
    }
    positions = [
        (u, p)
        for u, p in zip(active, snap.lookup_users(active).tolist(), strict=True)
        if p >= 0 and not (live and profile.variant_of(scope, u) in live)
    ]
    k = ctx.config.precompute_top_k
    # deep enough for the candidates a diversifying profile re-ranks, as the live path does
    variants = (profile.for_variant(name) for name in profile.variant_names)
    depth = max(v.ranking_depth(k) for v in variants) + RECENT_ITEMS
    # seconds spent ranking (on the thread), writing to Redis and to the ranks table: the
    # summary tells an operator which of the overlapped three bounds the step
    spent = dict.fromkeys(("ranking", "Redis", "ranks table"), 0.0)

    def rank(chunk: list[tuple[str, int]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(user_id, items, scores) of a batch: serving's ranking, ``depth`` deep (serving
        leaves out the user's newest items, and still has k, or its candidates)."""
        started = time.monotonic()
        users = np.array([p for _, p in chunk], dtype=np.int64)
        items, scores, counts = top_k_for_users(snap, users, depth, scoring)
        spent["ranking"] += time.monotonic() - started
        return [
            (user_id, items[r, : counts[r]], scores[r, : counts[r]])
            for r, (user_id, _) in enumerate(chunk)
        ]

    item_ids = np.asarray(snap.item_ids)  # a plain view: a memmap's indexing costs more

    async def store(
        ranks: RanksReplacement, batch: list[tuple[str, np.ndarray, np.ndarray]]
    ) -> int:
        """The batch into Redis, then into the ranks table's transaction; how many."""
        started = time.monotonic()
        written = await ctx.cache.put_many(scope, snap.version, batch, ttl_s=profile.cache_ttl_s)
        cached = time.monotonic()
        await ranks.add((user_id, item_ids[its], scs) for user_id, its, scs in batch)
        spent["Redis"] += cached - started
        spent["ranks table"] += time.monotonic() - cached
        return written

    users = [user_id for user_id, _ in positions]

    async def retract(stored: bool) -> set[str]:
        """``retract_not_personal`` for the step's users, from the ranks table too if
        ``stored``."""
        return await retract_not_personal(
            ctx.pg,
            ctx.cache,
            scope,
            snap.version,
            users,
            data_as_of=snap.data_as_of,
            stored=stored,
        )

    written = 0
    storing: asyncio.Future[int] | None = None  # the previous batch's
    bar = tqdm(total=len(positions), desc=f"precompute {scope}", unit="user", disable=None)
    try:
        async with ctx.pg.replacing_ranks(scope, snap.version) as ranks:
            try:
                for start in range(0, len(positions), BATCH_USERS):
                    # ranked off the loop (faiss and the kernels release the GIL) while the
                    # loop stores the previous batch, and PostgreSQL and Redis take it in
                    batch = await asyncio.to_thread(rank, positions[start : start + BATCH_USERS])
                    if storing is not None:
                        written += await storing
                    storing = asyncio.ensure_future(store(ranks, batch))
                    bar.update(len(batch))
                if storing is not None:
                    written += await storing
            finally:
                bar.close()
                if storing is not None:  # unfinished only after an error: stopped, and its
                    storing.cancel()  # own error (if any) retrieved, so none goes unheard
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await storing
    except BaseException:
        # the ranks table rolled back, but the batches before the failure are in Redis: those
        # of users who opted out or were erased meanwhile go too (if this fails, their TTL)
        with contextlib.suppress(Exception):
            await retract(stored=False)
        raise
    retracted = await retract(stored=True)
    await ctx.cache.mark_warm(scope, snap.version, ttl_s=profile.cache_ttl_s)
    gone = f"; {len(retracted)} retracted (opted out or erased meanwhile)" if retracted else ""
    timing = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in spent.items())
    return (
        f"{written - len(retracted)} rankings of top {k} cached for {snap.version}{gone};"
        f" overlapped: {timing}"
    )


def select_rows(
    indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The CSR sub-matrix of ``rows`` (int64[b]): (indptr int64[b + 1], indices int64[nnz])."""
    starts, ends = indptr[rows], indptr[rows + 1]
    sub_indptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    parts = [indices[s:e] for s, e in zip(starts, ends, strict=True)]
    sub_indices = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return sub_indptr, sub_indices.astype(np.int64)


def top_k_for_users(
    snap: snapshot.Snapshot, users: np.ndarray, k: int, scoring: Scoring | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched live ranking for snapshot user positions ``users`` (int64[b]), seen excluded:
    (items int64[b, k], scores float32[b, k], counts int64[b]) — what Recommend would serve
    with ``scoring`` (default: the default profile's)."""
    indptr, indices = select_rows(snap.seen_indptr, snap.seen_indices, users)
    return top_k_batch(
        snap, scoring or scoring_for(snap, DEFAULT_PROFILE), users, indptr, indices, k
    )


async def evaluate(ctx: JobContext, scope: str) -> str:
    """Temporal holdout: the scope's time line is cut where its newest HOLDOUT_FRACTION of
    interactions begins; users with held-out interactions are ranked from the part before
    the cutoff and scored against those (items seen in training excluded).

    Ranked as served, from an unpublished snapshot of the training part whose item
    components (popularity, recency, engagement, categories) are as of the cutoff: a learned
    scope's model trained on it (the hyperparameters train chose, EASE at its λ), a rule
    scope's engagement shares aggregated from it as build aggregates them. Each A/B variant
    is scored over it with its own profile by the serving code (``scoring_for``,
    ``top_k_batch``: relevance weight, bias, boosts, base scores, model), then diversified by
    its MMR strength. The popularity baseline, the non-personalized reference, is scored on
    the same split. A scope with nothing to hold out yet (too little data) reports so as its
    summary and fails nothing."""
    rules = _rules(ctx, scope)
    cutoff = await ctx.pg.holdout_cutoff(scope, HOLDOUT_FRACTION)
    if cutoff is None:
        return "too few interactions to hold any out; nothing evaluated"
    train_pairs = await ctx.pg.training_pairs(scope, before=cutoff)
    if not rules and not np.any(train_pairs.strength > 0):  # e.g. every event at one instant
        return "no positive interactions before the holdout cutoff; nothing evaluated"
    all_pairs = await ctx.pg.training_pairs(scope)
    profile = ctx.config.profile(scope)
    items = await _items(ctx, scope, cutoff, before=True)
    if rules:
        arrays = _rule_arrays(items, train_pairs, profile)
        extra = {"model": RULES}
    else:
        arrays, extra = _learned_holdout_arrays(ctx, scope, train_pairs, items, profile)
    arrays["user_features"] = np.zeros((len(arrays["user_ids"]), 0), np.float32)
    snap = snapshot.in_memory(scope, arrays, extra=extra)
    held_out = _held_out(snap, train_pairs, all_pairs, cutoff)
    if not held_out:
        return "no held-out interactions of known users and items; nothing evaluated"
    return await _score_split(ctx, snap, held_out, profile)


def _learned_holdout_arrays(
    ctx: JobContext, scope: str, train_pairs: TrainingPairs, items: _Items, profile: Profile
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A learned scope's snapshot arrays of the training part: the model train chose, trained
    on it (and EASE at the chosen λ where EASE serves)."""
    model = _factorize(train_pairs, _trained_params(ctx, scope), f"evaluate {scope}")
    chosen = _trained(ctx, scope)
    ease_matrix = None
    if chosen.get("model") == "ease":  # score what serves: EASE at the chosen λ
        lam = float(chosen["ease_lambda"])  # type: ignore[arg-type]
        ease_matrix = train_ease(_positive_gram(train_pairs, model), lam)
    arrays = _learned_arrays(model, items, profile, ease_matrix)
    return arrays, {"model": chosen.get("model", "als")}


def _held_out(
    snap: snapshot.Snapshot, train_pairs: TrainingPairs, all_pairs: TrainingPairs, cutoff: datetime
) -> dict[int, set[int]]:
    """Snapshot user position → the item positions of their held-out positive pairs: the
    pairs of ``all_pairs`` last seen at or after ``cutoff`` and not in ``train_pairs``."""
    train_keys = set(zip(train_pairs.user_ids.tolist(), train_pairs.item_ids.tolist(), strict=True))
    item_pos = {item: i for i, item in enumerate(snap.item_ids.tolist())}
    user_pos = {user: u for u, user in enumerate(snap.user_ids.tolist())}
    held_out: dict[int, set[int]] = {}
    for user, item, strength, last_at in zip(
        all_pairs.user_ids.tolist(),
        all_pairs.item_ids.tolist(),
        all_pairs.strength.tolist(),
        all_pairs.last_at.tolist(),
        strict=True,
    ):
        if strength > 0 and last_at >= cutoff.timestamp() and (user, item) not in train_keys:
            u, i = user_pos.get(user), item_pos.get(item)
            if u is not None and i is not None:
                held_out.setdefault(u, set()).add(i)
    return held_out


async def _score_split(
    ctx: JobContext, snap: snapshot.Snapshot, held_out: dict[int, set[int]], profile: Profile
) -> str:
    """Rank the held-out users from ``snap`` (the training part, as of the cutoff) as each
    variant serves them and by popularity, score against ``held_out`` and store the metrics
    per label."""
    users = np.array(sorted(held_out), dtype=np.int64)
    if len(users) > EVAL_USERS:
        users = np.sort(np.random.default_rng(0).choice(users, EVAL_USERS, replace=False))
    relevant = [held_out[int(u)] for u in users]
    k = max(EVAL_KS)
    counts_by_item = np.bincount(snap.seen_indices, minlength=snap.n_items).astype(np.float32)
    share = counts_by_item / max(snap.n_users, 1)
    served = _served_rankings(snap, profile, users, k)
    served["popularity"] = _popularity_rankings(
        snap, users, counts_by_item, k, snap.item_positions(list(profile.exclude_items))
    )
    version = snapshot.current_version(ctx.config.snapshot_dir, snap.scope) or "unpublished"
    results = [
        (
            label,
            evaluate_rankings(
                lists,
                relevant,
                snap.n_items,
                EVAL_KS,
                unit_vectors=snap.item_unit,
                item_share=share,
            ),
        )
        for label, lists in served.items()
    ]
    await ctx.pg.save_evaluations(snap.scope, version, results, len(users))
    summary = [f"{label} ndcg@10={metrics['ndcg@10']:.4f}" for label, metrics in results]
    return f"{len(users)} users: " + ", ".join(summary)


def _served_rankings(
    snap: snapshot.Snapshot, profile: Profile, users: np.ndarray, k: int
) -> dict[str, list[list[int]]]:
    """Each A/B variant's top-k item positions for snapshot user positions ``users`` as
    Recommend ranks them: scored by its own settings (``scoring_for``, ``top_k_batch``), seen
    items and its ``exclude_items`` excluded, diversified by its MMR strength. Labelled
    privrank, privrank/<variant>."""
    seen = select_rows(snap.seen_indptr, snap.seen_indices, users)
    served = {}
    for name in profile.variant_names:
        variant = profile.for_variant(name)
        scoring = scoring_for(snap, variant, where=f"evaluate {snap.scope} {name}")
        depth = variant.ranking_depth(k)
        indptr, indices = _excluding(*seen, snap.item_positions(list(variant.exclude_items)))
        items, scores, counts = top_k_batch(snap, scoring, users, indptr, indices, depth)
        served[_model_label(name)] = _diversified(items, scores, counts, snap.item_unit, k, variant)
    return served


def _excluding(
    indptr: np.ndarray, indices: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR rows (indptr int64[b + 1], indices int64[nnz]) with item positions ``items`` (int64,
    sorted) added to every row, each row sorted and without repeats."""
    if len(items) == 0 or len(indptr) < 2:
        return indptr, indices
    rows = [np.union1d(indices[a:b], items) for a, b in itertools.pairwise(indptr)]
    merged_indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return merged_indptr, np.concatenate(rows).astype(np.int64)


def _popularity_rankings(
    snap: snapshot.Snapshot,
    users: np.ndarray,
    counts_by_item: np.ndarray,
    k: int,
    excluded: np.ndarray,
) -> list[list[int]]:
    """The baseline: the items most users interacted with in training, seen ones and
    ``excluded`` (item positions: the scope's ``exclude_items``) left out, as privrank's."""
    indptr, indices = _excluding(*select_rows(snap.seen_indptr, snap.seen_indices, users), excluded)
    items, _, counts = kernels.topk_dense_batch(
        np.zeros((len(users), 1), np.float32),
        np.zeros((snap.n_items, 1), np.float32),
        counts_by_item / max(float(counts_by_item.max(initial=0.0)), 1.0),
        indptr,
        indices,
        k,
    )
    return [items[r, : counts[r]].tolist() for r in range(len(users))]


def _model_label(variant: str) -> str:
    return "privrank" if variant == CONTROL else f"privrank/{variant}"


def _diversified(
    items: np.ndarray,
    scores: np.ndarray,
    counts: np.ndarray,
    unit: np.ndarray,
    k: int,
    profile: Profile,
) -> list[list[int]]:
    """Best-first rows (items int64[b, depth], their scores float32[b, depth], counts
    int64[b]; depth: the profile's candidates when it diversifies) cut to k, re-ranked first
    by MMR at its strength over the row's scores, as serving re-ranks (ranking/pipeline.py)."""
    lists = []
    for row, row_scores, count in zip(items, scores, counts, strict=True):
        row, row_scores = row[:count], row_scores[:count]
        if profile.diversity > 0:
            row = row[mmr(row, row_scores, unit, k, profile.diversity)]
        lists.append(row[:k].tolist())
    return lists


async def cleanup(ctx: JobContext, scope: str) -> str:
    removed = await ctx.pg.cleanup(
        now=datetime.now(UTC),
        ranks_hours=ctx.config.ranks_retention_h,
        features_days=ctx.config.features_retention_d,
        events_days=ctx.config.events_retention_d,
    )
    pruned = snapshot.prune(ctx.config.snapshot_dir, scope, data_before=await _last_erasure(ctx))
    parts = [f"{table} {count}" for table, count in removed.items()]
    return "removed " + ", ".join(parts) + f", snapshots {len(pruned)}"


Step = Callable[[JobContext, str], Awaitable[str]]

STEPS: dict[str, Step] = {
    "refresh-features": refresh_features,
    "train": train,
    "build": build,
    "precompute": precompute,
    "evaluate": evaluate,
    "cleanup": cleanup,
}
NIGHTLY: tuple[str, ...] = tuple(STEPS)
