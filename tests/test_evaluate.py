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
from ranking.diversity import mmr
from ranking.profiles import CONTROL, Profile
from ranking.scoring import item_bias, scoring_for
from server.api import privrank_pb2 as pb
from server.config import Config
from tests.conftest import Client, assert_offline_as_stored, privrank, with_profiles

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
exclude_items = [{", ".join(f'"i{n}"' for n in range(0, 150, 6))}]

[{SCOPE}.variants.promo]
share = 0.3
boosts = {{ promo = 20.0 }}

[{SCOPE}.variants.diverse]
share = 0.2
diversity = 0.7
candidates = 40
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
    # users of this scope's own: a user ID is one person in every scope, and other tests
    # erase some of the synthetic ones (whose earlier events are then never stored again)
    batches = [
        [dataclasses.replace(e, user_id=f"{SCOPE}-{e.user_id}") for e in batch]
        for batch in generate(users=120, items=150, events=4000, scope=SCOPE, seed=23, end=END)
    ]
    # items that first appear in the last days, well after the cutoff: not rankable in it
    batches.append(
        [
            _event(SCOPE, f"{SCOPE}-u{n}", late, kind, END - timedelta(hours=n + 1))
            for late in LATE
            for n in range(8)
            for kind in ("view", "purchase")
        ]
    )
    events = [e for batch in batches for e in batch]
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
    profiled = with_profiles(config, tmp_path_factory.mktemp(SCOPE), PROFILES)
    return await _evaluate(JobContext(profiled, pg, cache), SCOPE, events, categories, "train")


def _event(scope: str, user: str, item: str, kind: str, at: datetime) -> Interaction:
    return Interaction(
        scope=scope, user_id=user, item_id=item, event_type=kind, value=1.0, occurred_at=at
    )


async def _evaluate(
    ctx: JobContext,
    scope: str,
    events: list[Interaction],
    categories: dict[str, str],
    before: str,
) -> Evaluated:
    """Store ``events`` and the item ``categories`` of ``scope``, run the ``before`` step
    (train, or build), then evaluate, keeping what evaluate ranked."""
    await ctx.pg.insert_event_batches([events])
    assert ctx.config.profiles_file is not None
    items = ctx.config.profiles_file.with_name("items.csv")
    items.write_text("item_id,category\n" + "".join(f"{i},{c}\n" for i, c in categories.items()))
    privrank(ctx.config, "import", "items", str(items), "--scope", scope)
    await run_job(ctx, before, [scope])
    captured: list[tuple[snapshot.Snapshot, np.ndarray, dict[str, list[list[int]]]]] = []
    served_rankings = steps._served_rankings

    def spy(snap: snapshot.Snapshot, profile: Profile, users: np.ndarray, k: int) -> Any:
        served = served_rankings(snap, profile, users, k)
        captured.append((snap, users.copy(), {label: list(r) for label, r in served.items()}))
        return served

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "_served_rankings", spy)
        await run_job(ctx, "evaluate", [scope])
    ((snap, users, served),) = captured
    rows = await ctx.pg.evaluations(scope, limit=len(served) + 1)
    cutoff = await ctx.pg.holdout_cutoff(scope, HOLDOUT_FRACTION)
    assert cutoff is not None
    return Evaluated(
        ctx.config.profile(scope),
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

    def serve(settings: Profile, by_rank: bool = False) -> list[list[int]]:
        # as ranking/pipeline.py answers: the candidates, then MMR over their scores
        depth = max(k, settings.candidates) if settings.diversity > 0 else k
        scoring = scoring_for(published, settings)
        excluded = published.item_positions(list(settings.exclude_items))
        items, scores, counts = top_k_for_users(published, ev.users, depth + len(excluded), scoring)
        lists = []
        for r in range(len(ev.users)):
            row, row_scores = items[r, : counts[r]], scores[r, : counts[r]]
            kept = ~np.isin(row, excluded)  # the top depth of the others: those served
            row, row_scores = row[kept][:depth], row_scores[kept][:depth]
            if by_rank:
                row_scores = np.arange(len(row), 0, -1, dtype=np.float32)
            if settings.diversity > 0:
                row = row[mmr(row, row_scores, published.item_unit, k, settings.diversity)]
            lists.append(row[:k].tolist())
        return lists

    assert set(ev.served) == {"privrank", "privrank/emb", "privrank/promo", "privrank/diverse"}
    for name in profile.variant_names:
        variant = profile.for_variant(name)
        label = "privrank" if name == CONTROL else f"privrank/{name}"
        assert ev.served[label] == serve(variant), label
        # the check has teeth: without the bias, or at relevance weight 1, lists differ
        unbiased = Profile(popularity_weight=0.0, recency_weight=0.0, model=variant.model)
        assert ev.served[label] != serve(unbiased), label
        if variant.relevance_weight != 1.0:
            assert ev.served[label] != serve(dataclasses.replace(variant, relevance_weight=1.0))
    # MMR re-ranks by the candidates' scores, not their ranks
    diverse = profile.for_variant("diverse")
    assert ev.served["privrank/diverse"] != serve(dataclasses.replace(diverse, diversity=0.0))
    assert ev.served["privrank/diverse"] != serve(diverse, by_rank=True)
    # emb's excluded items are never ranked, and they would be
    emb = profile.for_variant("emb")
    assert emb.exclude_items
    assert ev.served["privrank/emb"] != serve(dataclasses.replace(emb, exclude_items=()))
    gone = set(ev.snap.item_positions(list(emb.exclude_items)).tolist())
    assert not gone & {i for row in ev.served["privrank/emb"] for i in row}
    assert gone & {i for row in ev.served["privrank"] for i in row}, "control ranks them"
    # control and promo rank with EASE, emb with the embeddings: the models differ too
    assert ev.served["privrank/emb"] != serve(dataclasses.replace(profile, model="auto"))


def test_a_strong_boost_moves_the_stored_metrics(evaluated: Evaluated) -> None:
    ev = evaluated
    assert set(ev.stored) == {"popularity"} | {
        f"privrank{v}" for v in ("", "/emb", "/promo", "/diverse")
    }
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


# -- a rule-based scope -----------------------------------------------------------------------

RULE_SCOPE = "ruleseval"
RULE_PROFILES = f"""
[{RULE_SCOPE}]
model = "rules"
base_scores = {{ alert = 1.0, promo = 0.6, digest = 0.3 }}
engagement_weight = 4.0
popularity_weight = 0.2
recency_weight = 0.1
boosts = {{ digest = 0.05 }}

[{RULE_SCOPE}.variants.flat]
share = 0.5
engagement_weight = 0.0
base_scores = {{ alert = 0.2, promo = 0.2, digest = 1.0 }}
"""
RULE_CATALOG = {
    **{f"a{n}": "alert" for n in range(5)},
    **{f"p{n}": "promo" for n in range(5)},
    **{f"d{n}": "digest" for n in range(5)},
    "x0": "",
    "x1": "",
}
T0 = datetime(2025, 3, 1, tzinfo=UTC)
HELD_OUT_AT = T0 + timedelta(days=20)  # every held-out click at one instant: the cutoff


def _rule_clicks() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per user: clicks before the cutoff, and the held-out ones (other items). r0-r5 click
    alerts and a promo and will click a digest; r6-r11 click digests and will click alerts."""
    train, held = {}, {}
    for n in range(12):
        if n < 6:
            train[f"r{n}"] = [f"a{n % 5}", f"a{(n + 1) % 5}", f"p{n % 5}", f"a{(n + 2) % 5}"]
            held[f"r{n}"] = [f"d{n % 5}", f"p{(n + 1) % 5}"]
        else:
            train[f"r{n}"] = [f"d{n % 5}", f"d{(n + 1) % 5}", f"d{(n + 2) % 5}", f"x{n % 2}"]
            held[f"r{n}"] = [f"a{n % 5}", f"d{(n + 3) % 5}"]
    return train, held


@pytest.fixture(scope="module")
async def rule_evaluated(
    config: Config, pg: PgStore, cache: RankCache, tmp_path_factory: pytest.TempPathFactory
) -> Evaluated:
    train, held = _rule_clicks()
    # one user sees every item first, 12 hours apart: all items exist before the cutoff
    events = [
        _event(RULE_SCOPE, "seed", item, "view", T0 + timedelta(hours=12 * n))
        for n, item in enumerate(RULE_CATALOG)
    ]
    for n, (user, clicks) in enumerate(train.items()):
        at = T0 + timedelta(days=9, hours=n)
        events += [
            _event(RULE_SCOPE, user, i, "click", at + timedelta(minutes=j))
            for j, i in enumerate(clicks)
        ]
    events += [
        _event(RULE_SCOPE, user, i, "click", HELD_OUT_AT) for user, ids in held.items() for i in ids
    ]
    profiled = with_profiles(config, tmp_path_factory.mktemp(RULE_SCOPE), RULE_PROFILES)
    ctx = JobContext(profiled, pg, cache)
    evaluated = await _evaluate(ctx, RULE_SCOPE, events, RULE_CATALOG, "build")
    assert evaluated.cutoff == HELD_OUT_AT
    return evaluated


def _rule_reference(
    ev: Evaluated, settings: Profile, shares_from: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Per evaluated user, the unseen items by the rule score (README, "Rule-based scopes")
    with engagement shares over ``shares_from``: base × (1 + weight × share) + popularity
    and recency weights × the components as of the cutoff + boosts; ties by item ID."""
    comps = _components(ev)
    ids = comps["item_ids"].tolist()
    base, boosts = dict(settings.base_scores), dict(settings.boosts)
    train, _ = _rule_clicks()
    out = {}
    for user in ev.snap.user_ids[ev.users].tolist():
        clicks = shares_from[user]
        share = {c: sum(RULE_CATALOG[i] == c for i in clicks) / len(clicks) for c in base}
        scores = []
        for n, item in enumerate(ids):
            if item in train[user]:
                continue
            category = RULE_CATALOG[item]
            score = base.get(category, 0.0) * (
                1 + settings.engagement_weight * share.get(category, 0.0)
            )
            score += settings.popularity_weight * float(comps["item_popularity"][n])
            score += settings.recency_weight * float(comps["item_recency"][n])
            scores.append((-(score + boosts.get(category, 0.0)), item))
        out[user] = [item for _, item in sorted(scores)]
    return out


def test_a_rule_scope_is_evaluated_by_its_rules_from_the_training_part(
    rule_evaluated: Evaluated,
) -> None:
    ev = rule_evaluated
    assert set(ev.stored) == {"privrank", "privrank/flat", "popularity"}
    assert ev.snap.manifest["model"] == "rules"
    train, held = _rule_clicks()
    evaluated = ev.snap.user_ids[ev.users].tolist()
    assert evaluated == sorted(held)  # the seed user has nothing held out
    everything = {u: train[u] + held[u] for u in held}
    for name in ev.profile.variant_names:
        settings = ev.profile.for_variant(name)
        label = "privrank" if name == CONTROL else f"privrank/{name}"
        got = {
            user: ev.snap.item_ids[ranked].tolist()
            for user, ranked in zip(evaluated, ev.served[label], strict=True)
        }
        assert got == _rule_reference(ev, settings, train), label
        # the check has teeth: shares that saw the held-out clicks, or no weights, differ
        if settings.engagement_weight:
            assert got != _rule_reference(ev, settings, everything), label
        plain = dataclasses.replace(settings, popularity_weight=0.0, recency_weight=0.0)
        assert got != _rule_reference(ev, plain, train), label


async def test_a_rule_scope_s_evaluation_is_reported(
    rule_evaluated: Evaluated, client: Client, tmp_path: Path
) -> None:
    metrics = await client.admin.GetMetrics(
        pb.GetMetricsRequest(scope=RULE_SCOPE), metadata=client.adm
    )
    assert_offline_as_stored(metrics, await client.app.pg.evaluations(RULE_SCOPE))
    version = snapshot.current_version(client.config.snapshot_dir, RULE_SCOPE)
    assert {e.model_version for e in metrics.offline} == {version}
    out = tmp_path / "report.html"
    privrank(
        client.config,
        "report",
        "--out",
        str(out),
        "--scope",
        RULE_SCOPE,
        "--server",
        "127.0.0.1:9",
        "--metrics",
        "127.0.0.1:9",
    )
    page = out.read_text()
    assert f"Scope {RULE_SCOPE}" in page
    assert all(f"<td>{label}</td>" in page for label in rule_evaluated.stored)
