"""Above the exact-search threshold the build job publishes a faiss index with search settings
tuned to a measured recall target, and the server ranks through it."""

from __future__ import annotations

import dataclasses

import numpy as np

from features.cache import RankCache
from features.postgres import PgStore
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking import snapshot
from ranking.retrieval import SEARCH_PARAMS_KEY, ExactRetriever
from server.config import Config


async def test_large_catalogs_are_served_through_a_tuned_index(
    config: Config, pg: PgStore, cache: RankCache
) -> None:
    small_threshold = dataclasses.replace(config, exact_search_max_items=100)
    ctx = JobContext(small_threshold, pg, cache)
    await pg.insert_event_batches(generate(users=300, items=400, events=9000, scope="ann", seed=5))
    await run_job(ctx, "nightly", ["ann"])

    snap = snapshot.load_current(config.snapshot_dir, "ann")
    assert snap.manifest["retrieval"] == "faiss"
    assert SEARCH_PARAMS_KEY in snap.manifest
    from ranking.pipeline import LoadedScope

    loaded = LoadedScope.of(snap)
    assert loaded.retriever.name.startswith("faiss")
    exact = ExactRetriever(snap.item_vectors, snap.item_bias)
    recalls = []
    for user in range(0, snap.n_users, 7):
        seen = snap.seen(user)
        items, _ = loaded.retriever.top_k(snap.user_vectors[user], seen, 10)
        truth, _ = exact.top_k(snap.user_vectors[user], seen, 10)
        assert not set(items.tolist()) & set(seen.tolist())
        recalls.append(len(set(items.tolist()) & set(truth.tolist())) / max(len(truth), 1))
    assert np.mean(recalls) >= 0.95
