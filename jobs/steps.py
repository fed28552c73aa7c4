"""The steps of the nightly pipeline. Each takes the job context and a scope, is idempotent, and
returns a one-line summary; failures raise from the error tree.

    refresh-features → train → build → precompute → evaluate → cleanup
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.cache import RankCache
from features.errors import JobError
from features.postgres import PgStore, TrainingPairs
from jobs.als import AlsParams, to_csr, train_als
from jobs.metrics import evaluate_rankings, ndcg_at_k
from ranking import kernels, snapshot
from ranking.retrieval import build_index, write_index
from server.config import Config

log = logging.getLogger(__name__)

POPULARITY_WEIGHT = 0.05
RECENCY_WEIGHT = 0.02
RECENCY_DAYS = 7.0
HOLDOUT_FRACTION = 0.2
EVAL_USERS = 2000
EVAL_KS = (5, 10, 20)
BATCH_USERS = 1024
TUNE_REGULARIZATION = (0.01, 0.1, 1.0)
TUNE_ALPHA = (1.0, 4.0, 10.0, 40.0)
TUNE_MAX_PAIRS = 2_000_000
TUNE_MIN_USERS = 20


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


def _tune(pairs: TrainingPairs, base: AlsParams, label: str) -> tuple[AlsParams, str]:
    """Choose regularization and confidence scaling by NDCG@10 on a validation split carved
    from the training data. Deterministic: the grid is fixed and ties keep the earlier one."""
    if len(pairs.strength) > TUNE_MAX_PAIRS:
        return base, f"default hyperparameters (over {TUNE_MAX_PAIRS} pairs: not tuned)"
    train_part, held = _validation_split(pairs, HOLDOUT_FRACTION)
    if len(held) < TUNE_MIN_USERS:
        return base, "default hyperparameters (too little data to tune)"
    best: tuple[float, AlsParams] = (-1.0, base)
    grid = [(reg, alpha) for reg in TUNE_REGULARIZATION for alpha in TUNE_ALPHA]
    for reg, alpha in tqdm(grid, desc=f"tune {label}", unit="fit", disable=None):
        params = replace(base, regularization=reg, alpha=alpha)
        model = _factorize(train_part, params, label, progress=False)
        user_pos = {u: n for n, u in enumerate(model.user_ids.tolist())}
        item_pos = {i: n for n, i in enumerate(model.item_ids.tolist())}
        users = [u for u in sorted(held) if u in user_pos]
        rankings = _rank(model, np.array([user_pos[u] for u in users], np.int64), 10)
        score = float(
            np.mean(
                [
                    ndcg_at_k(ranked, {item_pos[i] for i in held[u] if i in item_pos}, 10)
                    for u, ranked in zip(users, rankings, strict=True)
                ]
            )
        )
        if score > best[0]:
            best = (score, params)
    chosen = best[1]
    return chosen, (
        f"regularization={chosen.regularization} alpha={chosen.alpha} "
        f"(validation ndcg@10 {best[0]:.4f} over {len(grid)} settings)"
    )


async def train(ctx: JobContext, scope: str) -> str:
    pairs = await ctx.pg.training_pairs(scope)
    params, chosen = _tune(pairs, ctx.als_params(), scope)
    model = _factorize(pairs, params, f"train {scope}")
    path = ctx.model_path(scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".model-{os.getpid()}.npz")
    np.savez(
        staging,
        params=np.array(json.dumps(asdict(params), sort_keys=True)),
        **{k: getattr(model, k) for k in _Factorized.__dataclass_fields__},
    )
    os.replace(staging, path)
    await ctx.pg.save_embeddings(scope, list(model.user_ids), model.user_vectors)
    return (
        f"{len(model.user_ids)} users x {len(model.item_ids)} items, "
        f"{len(pairs.strength)} pairs; {chosen}"
    )


def _trained_params(ctx: JobContext, scope: str) -> AlsParams:
    """The hyperparameters the last train chose (defaults if it has not run)."""
    try:
        with np.load(ctx.model_path(scope), allow_pickle=False) as data:
            return AlsParams(**json.loads(str(data["params"])))
    except (OSError, KeyError, ValueError, TypeError):
        return ctx.als_params()


def _load_model(path: Path) -> _Factorized:
    try:
        with np.load(path, allow_pickle=False) as data:
            return _Factorized(**{k: data[k] for k in _Factorized.__dataclass_fields__})
    except (OSError, KeyError, ValueError) as exc:
        raise JobError(f"no usable trained model at {path}; run train first ({exc})") from exc


async def build(ctx: JobContext, scope: str) -> str:
    model = _load_model(ctx.model_path(scope))
    as_of = await _as_of(ctx, scope)
    stats = await ctx.pg.item_stats(scope, now=as_of)
    order = np.argsort(stats.item_ids)
    item_ids = stats.item_ids[order]
    n, dim = len(item_ids), model.item_vectors.shape[1]

    # model items → snapshot positions (an item deactivated since training is dropped)
    pos = np.minimum(np.searchsorted(item_ids, model.item_ids), max(n - 1, 0))
    known = item_ids[pos] == model.item_ids if n else np.zeros(len(model.item_ids), bool)
    item_vectors = np.zeros((n, dim), dtype=np.float32)
    item_vectors[pos[known]] = model.item_vectors[known]

    popularity = np.log1p(stats.popularity[order].astype(np.float64))
    popularity = popularity / popularity.max() if n and popularity.max() > 0 else popularity
    age_days = (as_of.timestamp() - stats.first_seen[order]) / 86400.0
    recency = np.exp(-np.clip(age_days, 0, None) / RECENCY_DAYS)
    item_bias = (POPULARITY_WEIGHT * popularity + RECENCY_WEIGHT * recency).astype(np.float32)

    remap = np.where(known, pos, -1)
    seen = remap[model.seen_indices]
    seen_rows = np.repeat(np.arange(len(model.user_ids)), np.diff(model.seen_indptr))
    keep = seen >= 0
    seen_indptr, seen_indices, _ = to_csr(
        seen_rows[keep], seen[keep], np.ones(int(keep.sum()), np.float32), len(model.user_ids)
    )

    feature_ids, feature_rows = await ctx.pg.user_features(scope)
    user_features = np.zeros((len(model.user_ids), feature_rows.shape[1]), dtype=np.float32)
    if len(feature_ids):
        fpos = np.minimum(np.searchsorted(model.user_ids, feature_ids), len(model.user_ids) - 1)
        hit = model.user_ids[fpos] == feature_ids
        user_features[fpos[hit]] = feature_rows[hit]

    arrays = {
        "item_ids": item_ids,
        "item_vectors": item_vectors,
        "item_bias": item_bias,
        "item_popularity": popularity.astype(np.float32),
        "user_ids": model.user_ids,
        "user_vectors": model.user_vectors,
        "user_features": user_features,
        "seen_indptr": seen_indptr,
        "seen_indices": seen_indices,
    }
    index_writer = None
    if n > ctx.config.exact_search_max_items:
        index = build_index(item_vectors, item_bias)

        def index_writer(path: Path) -> None:
            write_index(index, path)

    version = snapshot.publish(ctx.config.snapshot_dir, scope, arrays, index_writer=index_writer)
    published = snapshot.load(ctx.config.snapshot_dir / scope / version)
    await ctx.pg.record_model_version(scope, version, published.manifest)
    return f"published {version}: {n} items, {len(model.user_ids)} users"


async def precompute(ctx: JobContext, scope: str) -> str:
    snap = snapshot.load_current(ctx.config.snapshot_dir, scope)
    active = await ctx.pg.active_users(scope, now=await _as_of(ctx, scope))
    positions = [(u, p) for u in active if (p := snap.user_position(u)) is not None]
    k = ctx.config.precompute_top_k
    written = 0
    rows: list[tuple[str, list[str], list[float]]] = []
    with tqdm(total=len(positions), desc=f"precompute {scope}", unit="user", disable=None) as bar:
        for start in range(0, len(positions), BATCH_USERS):
            chunk = positions[start : start + BATCH_USERS]
            users = np.array([p for _, p in chunk], dtype=np.int64)
            items, scores, counts = top_k_for_users(snap, users, k)
            batch = [
                (user_id, items[r, : counts[r]], scores[r, : counts[r]])
                for r, (user_id, _) in enumerate(chunk)
            ]
            written += await ctx.cache.put_many(scope, snap.version, batch)
            rows.extend(
                (user_id, [str(i) for i in snap.item_ids[its]], [float(s) for s in scs])
                for user_id, its, scs in batch
            )
            bar.update(len(chunk))
    await ctx.pg.replace_ranks(scope, snap.version, rows)
    return f"{written} rankings of top {k} cached for {snap.version}"


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
    snap: snapshot.Snapshot, users: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched live ranking for snapshot user positions ``users`` (int64[b]), seen excluded:
    (items int64[b, k], scores float32[b, k], counts int64[b]) — what Recommend would serve."""
    indptr, indices = select_rows(snap.seen_indptr, snap.seen_indices, users)
    result: tuple[np.ndarray, np.ndarray, np.ndarray] = kernels.topk_dense_batch(
        np.ascontiguousarray(snap.user_vectors[users]),
        snap.item_vectors,
        snap.item_bias,
        indptr,
        indices,
        k,
    )
    return result


async def evaluate(ctx: JobContext, scope: str) -> str:
    """Temporal holdout: train on the first 80 % of the scope's time line, rank for users who
    have held-out interactions, and score against those (items seen in training excluded).
    The popularity baseline is scored on the same split."""
    cutoff = await ctx.pg.holdout_cutoff(scope, HOLDOUT_FRACTION)
    if cutoff is None:
        raise JobError("too few interactions to hold any out")
    train_pairs = await ctx.pg.training_pairs(scope, before=cutoff)
    all_pairs = await ctx.pg.training_pairs(scope)
    model = _factorize(train_pairs, _trained_params(ctx, scope), f"evaluate {scope}")

    train_keys = set(zip(train_pairs.user_ids.tolist(), train_pairs.item_ids.tolist(), strict=True))
    item_pos = {item: i for i, item in enumerate(model.item_ids.tolist())}
    user_pos = {user: u for u, user in enumerate(model.user_ids.tolist())}
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
    if not held_out:
        raise JobError("no held-out interactions of known users and items")
    users = np.array(sorted(held_out), dtype=np.int64)
    if len(users) > EVAL_USERS:
        users = np.sort(np.random.default_rng(0).choice(users, EVAL_USERS, replace=False))
    relevant = [held_out[int(u)] for u in users]
    k = max(EVAL_KS)

    indptr, indices = select_rows(model.seen_indptr, model.seen_indices, users)
    n_items = len(model.item_ids)
    counts_by_item = np.bincount(model.seen_indices, minlength=n_items).astype(np.float32)
    candidates = {
        "privrank": (model.user_vectors[users], model.item_vectors, np.zeros(n_items, np.float32)),
        "popularity": (
            np.zeros((len(users), 1), np.float32),
            np.zeros((n_items, 1), np.float32),
            counts_by_item / max(float(counts_by_item.max()), 1.0),
        ),
    }
    version = snapshot.current_version(ctx.config.snapshot_dir, scope) or "unpublished"
    summary = []
    for name, (queries, vectors, bias) in candidates.items():
        items, _, counts = kernels.topk_dense_batch(
            np.ascontiguousarray(queries),
            np.ascontiguousarray(vectors),
            bias,
            indptr,
            indices,
            k,
        )
        rankings = [items[r, : counts[r]].tolist() for r in range(len(users))]
        metrics = evaluate_rankings(rankings, relevant, n_items, EVAL_KS)
        await ctx.pg.save_evaluation(scope, version, name, metrics, len(users))
        summary.append(f"{name} ndcg@10={metrics['ndcg@10']:.4f}")
    return f"{len(users)} users: " + ", ".join(summary)


async def cleanup(ctx: JobContext, scope: str) -> str:
    removed = await ctx.pg.cleanup(
        now=datetime.now(UTC),
        ranks_hours=ctx.config.ranks_retention_h,
        features_days=ctx.config.features_retention_d,
        events_days=ctx.config.events_retention_d,
    )
    erased = await ctx.pg.latest_erasure()
    pruned = snapshot.prune(
        ctx.config.snapshot_dir, scope, built_before=erased.timestamp() if erased else None
    )
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
