"""evaluate measures what Recommend serves: each A/B variant ranked by the serving code with its
own weights, boosts and model, over item components as of the holdout cutoff — checked
against components recomputed here from the raw events and a snapshot published from them."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from features.cache import RankCache
from features.postgres import PgStore
from features.schema import EVENT_WEIGHTS, Interaction
from jobs import steps
from jobs.runner import run_job
from jobs.steps import HOLDOUT_FRACTION, RECENCY_DAYS, JobContext, top_k_for_users
from jobs.synth import generate
from ranking import snapshot
from ranking.profiles import CONTROL, Profile, load_profiles
from ranking.scoring import item_bias, scoring_for
from server.config import Config
from tests.conftest import privrank

SCOPE = "asserved"
PROFILES = f"""
[{SCOPE}]
relevance_weight = 1.5
popularity_weight = 0.3
recency_weight = 0.2
engagement_weight = 0.1
boosts = {{ news = 0.3, spam = -0.3 }}

[{SCOPE}.variants.emb]
share = 0.3
model = "embeddings"
relevance_weight = 0.8
recency_weight = 0.4

[{SCOPE}.variants.promo]
share = 0.3
boosts = {{ promo = 20.0 }}
"""
END = datetime(2025, 6, 1, tzinfo=UTC)  # the synthetic log's last day: fixed, not now
WINDOW_DAYS = 30  # item_stats' popularity and engagement window
LATE = ("late1", "late2", "late3")
PROMO = 45  # the least popular items are promo: a strong boost must pull the lists down-market


@dataclass
class Evaluated:
    profile: Profile
    events: list[Interaction]
    categories: dict[str, str]
    cutoff: datetime
    snap: snapshot.Snapshot  # what evaluate ranked from
    users: np.ndarray  # the evaluated users' positions in it
    served: dict[str, list[list[int]]]  # label → item positions, best first
    stored: dict[str, dict[str, float]]  # label → the metrics evaluate stored


@pytest.fixture(scope="module")
async def evaluated(
    config: Config, pg: PgStore, cache: RankCache, tmp_path_factory: pytest.TempPathFactory
) -> Evaluated:
    path = tmp_path_factory.mktemp("profiles") / "profiles.toml"
    path.write_text(PROFILES)
    profiled = dataclasses.replace(config, profiles_file=path, profiles=load_profiles(path))
    batches = list(generate(users=120, items=150, events=4000, scope=SCOPE, seed=23, end=END))
    # items that first appear in the last days, well after the cutoff: not rankable in it
    batches.append(
        [
            Interaction(
                scope=SCOPE,
                user_id=f"u{n}",
                item_id=late,
                event_type=kind,
                value=1.0,
                occurred_at=END - timedelta(hours=n + 1),
            )
            for late in LATE
            for n in range(8)
            for kind in ("view", "purchase")
        ]
    )
    events = [e for batch in batches for e in batch]
    await pg.insert_event_batches(batches)
    # categories: the least popular of the items seen early are promo, others news/spam/none
    early = END - timedelta(days=40)
    weight: dict[str, float] = defaultdict(float)
    for e in events:
        if e.occurred_at < early:
            weight[e.item_id] += EVENT_WEIGHTS[e.event_type]
    promo = set(sorted(weight, key=lambda i: (weight[i], i))[:PROMO])
    kinds = {0: "news", 1: "spam"}
    categories = {
        f"i{n}": "promo" if f"i{n}" in promo else kinds.get(n % 5, "") for n in range(150)
    } | dict.fromkeys(LATE, "promo")
    items = path.with_name("items.csv")
    items.write_text("item_id,category\n" + "".join(f"{i},{c}\n" for i, c in categories.items()))
    privrank(profiled, "import", "items", str(items), "--scope", SCOPE)

    ctx = JobContext(profiled, pg, cache)
    await run_job(ctx, "train", [SCOPE])
    captured: list[tuple[snapshot.Snapshot, np.ndarray, dict[str, list[list[int]]]]] = []
    served_rankings = steps._served_rankings

    def spy(snap: snapshot.Snapshot, profile: Profile, users: np.ndarray, k: int) -> Any:
        served = served_rankings(snap, profile, users, k)
        captured.append((snap, users.copy(), {label: list(r) for label, r in served.items()}))
        return served

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "_served_rankings", spy)
        await run_job(ctx, "evaluate", [SCOPE])
    ((snap, users, served),) = captured
    rows = await pg.evaluations(SCOPE, limit=4)
    cutoff = await pg.holdout_cutoff(SCOPE, HOLDOUT_FRACTION)
    assert cutoff is not None
    return Evaluated(
        profiled.profile(SCOPE),
        events,
        categories,
        cutoff,
        snap,
        users,
        served,
        {r["model"]: r["metrics"] for r in rows},
    )


def _components(ev: Evaluated) -> dict[str, np.ndarray]:
    """The item components as of the cutoff, from the raw events: the items first seen before
    it, popularity and engagement over the window before it, recency from the first event."""
    cutoff = ev.cutoff.timestamp()
    first: dict[str, float] = {}
    pop: dict[str, float] = defaultdict(float)
    engaged: dict[str, list[bool]] = defaultdict(list)
    for e in ev.events:
        at = e.occurred_at.timestamp()
        first[e.item_id] = min(first.get(e.item_id, math.inf), at)
        if cutoff - WINDOW_DAYS * 86400 < at < cutoff:
            pop[e.item_id] += EVENT_WEIGHTS[e.event_type]
            engaged[e.item_id].append(EVENT_WEIGHTS[e.event_type] > 0)
    ids = np.array(sorted(i for i, t in first.items() if t < cutoff))
    logged = np.log1p([pop[i] for i in ids])
    names = np.unique(["", *ev.categories.values()])
    return {
        "item_ids": ids,
        "item_popularity": (logged / logged.max()).astype(np.float32),
        "item_recency": np.exp(
            -np.clip([(cutoff - first[i]) / 86400 for i in ids], 0, None) / RECENCY_DAYS
        ).astype(np.float32),
        "item_engagement": np.array([np.mean(engaged[i] or [0.0]) for i in ids], np.float32),
        "item_category": np.searchsorted(names, [ev.categories[i] for i in ids]).astype(np.int32),
        "categories": names,
    }


def test_the_item_components_are_those_of_the_cutoff(evaluated: Evaluated) -> None:
    ev, want = evaluated, _components(evaluated)
    snap = ev.snap
    # items first seen after the cutoff are not ranked; nothing at or after it counts
    np.testing.assert_array_equal(snap.item_ids, want["item_ids"])
    assert not set(LATE) & set(snap.item_ids.tolist())
    for name in ("item_popularity", "item_recency", "item_engagement"):
        np.testing.assert_allclose(getattr(snap, name), want[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(snap.categories, want["categories"])
    np.testing.assert_array_equal(snap.item_category, want["item_category"])
    # the users and their seen items: the non-impression events before the cutoff
    seen: dict[str, set[str]] = defaultdict(set)
    for e in ev.events:
        if e.event_type != "impression" and e.occurred_at < ev.cutoff:
            seen[e.user_id].add(e.item_id)
    assert snap.user_ids.tolist() == sorted(seen)
    for u, user in enumerate(snap.user_ids.tolist()):
        assert set(snap.item_ids[snap.seen(u)].tolist()) == seen[user]


def test_each_variant_is_ranked_as_serving_ranks_it(evaluated: Evaluated, tmp_path: Path) -> None:
    ev, want = evaluated, _components(evaluated)
    snap, profile = ev.snap, ev.profile
    assert snap.item_item is not None, "this data trains EASE: control is served item-item"
    # a snapshot published from the same training part, with the components recomputed above
    arrays = {
        **want,
        "item_vectors": snap.item_vectors,
        "item_bias": item_bias(
            profile,
            want["item_popularity"],
            want["item_recency"],
            want["item_engagement"],
            want["item_category"],
            want["categories"],
        ),
        "user_ids": snap.user_ids,
        "user_vectors": snap.user_vectors,
        "user_features": np.zeros((snap.n_users, 0), np.float32),
        "seen_indptr": snap.seen_indptr,
        "seen_indices": snap.seen_indices,
        "item_item": np.asarray(snap.item_item),
    }
    published = snapshot.load(tmp_path / SCOPE / snapshot.publish(tmp_path, SCOPE, arrays))
    k = max(steps.EVAL_KS)

    def serve(settings: Profile) -> list[list[int]]:
        items, _, counts = top_k_for_users(published, ev.users, k, scoring_for(published, settings))
        return [items[r, : counts[r]].tolist() for r in range(len(ev.users))]

    assert set(ev.served) == {"privrank", "privrank/emb", "privrank/promo"}
    for name in profile.variant_names:
        variant = profile.for_variant(name)
        label = "privrank" if name == CONTROL else f"privrank/{name}"
        assert ev.served[label] == serve(variant), label
        # the check has teeth: without the bias, or at relevance weight 1, lists differ
        unbiased = Profile(popularity_weight=0.0, recency_weight=0.0, model=variant.model)
        assert ev.served[label] != serve(unbiased), label
        if variant.relevance_weight != 1.0:
            assert ev.served[label] != serve(dataclasses.replace(variant, relevance_weight=1.0))
    # control and promo rank with EASE, emb with the embeddings: the models differ too
    assert ev.served["privrank/emb"] != serve(dataclasses.replace(profile, model="auto"))


def test_a_strong_boost_moves_the_stored_metrics(evaluated: Evaluated) -> None:
    ev = evaluated
    assert set(ev.stored) == {"privrank", "privrank/emb", "privrank/promo", "popularity"}
    codes, names = ev.snap.item_category, ev.snap.categories
    assert codes is not None
    assert names is not None
    promo_code = names.tolist().index("promo")
    # the promo variant's lists are all promo items: the least popular of the catalog
    assert all((codes[ranked[:10]] == promo_code).all() for ranked in ev.served["privrank/promo"])
    assert not all((codes[ranked[:10]] == promo_code).all() for ranked in ev.served["privrank"])
    boosted, control = ev.stored["privrank/promo"], ev.stored["privrank"]
    assert boosted["popularity_bias@10"] < control["popularity_bias@10"]
    assert boosted["novelty@10"] > control["novelty@10"]
    assert boosted["ndcg@10"] < control["ndcg@10"]
