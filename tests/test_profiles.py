"""Per-scope profiles: validated at start-up, and honoured end to end (exclusions,
diversity re-ranking, the evaluation measuring what is served)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from features.cache import RankCache
from features.errors import ConfigError
from features.postgres import PgStore
from jobs.metrics import intra_list_diversity
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking.profiles import Profile, load_profiles
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from tests.serving import serving

PROFILES = """
[diverse]
diversity = 0.7
candidates = 60
exclude_items = ["i1", "i2"]
cache_ttl_s = 600

[plain]
popularity_weight = 0.05
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[s]\nbogus = 1\n", "unknown setting 'bogus'"),
        ("[s]\ndiversity = 2.0\n", "diversity must be within 0..1"),
        ("[s]\ncandidates = 0\n", "candidates must be an integer"),
        ("[s]\npopularity_weight = -1\n", "popularity_weight must be"),
        ("[s]\ncache_ttl_s = 0\n", "cache_ttl_s must be a positive"),
        ("[s]\nexclude_items = [1]\n", "exclude_items must be"),
        ("[s]\nrelevance_weight = 0\n", "relevance_weight must be a finite number > 0"),
        ("[s]\nengagement_weight = -1\n", "engagement_weight must be"),
        ("[s]\nboosts = [1]\n", "boosts must be a table"),
        ("[s]\nboosts = { 'a b' = 1.0 }\n", "boosts may contain only"),
        ("[s]\nboosts = { a = 'x' }\n", "boosts.a must be a finite number"),
        ("[s]\nmodel = 'deep'\n", "model must be one of"),
        ("[s]\nmodel = 'rules'\n", "base_scores go with"),
        ("[s]\nbase_scores = { a = 1.0 }\n", "base_scores go with"),
        ("s = 1\n", "expected a table"),
        ("[s\n", "PRIVRANK_PROFILES_FILE"),
    ],
)
def test_bad_profiles_fail_fast_naming_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profiles(path)


def test_profiles_load_through_the_config(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES)
    config = Config.from_env({"PRIVRANK_PROFILES_FILE": str(path)})
    assert config.profile("diverse") == Profile(
        diversity=0.7, candidates=60, exclude_items=("i1", "i2"), cache_ttl_s=600
    )
    assert config.profile("anything-else") == Profile()


async def test_exclusions_and_diversity_are_served_and_measured(
    config: Config, pg: PgStore, cache: RankCache, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES)
    profiled = dataclasses.replace(config, profiles_file=path, profiles=load_profiles(path))
    ctx = JobContext(profiled, pg, cache)
    for scope in ("diverse", "plain"):  # the same data in both scopes
        await pg.insert_event_batches(
            generate(users=120, items=150, events=4000, scope=scope, seed=17)
        )
        await run_job(ctx, "nightly", [scope])

    async with serving(profiled, pg_url, redis_url) as running:
        app, channel, metadata = running.app, running.channel, running.service
        stub = rpc.RankingStub(channel)
        unit = app.ranker.scope("plain").snapshot.item_unit
        ids = app.ranker.scope("plain").snapshot.item_ids
        diversity: dict[str, list[float]] = {"diverse": [], "plain": []}
        for n in range(40):
            for scope in diversity:
                answer = await stub.Recommend(
                    pb.RecommendRequest(user_id=f"u{n}", scope=scope, limit=10),
                    metadata=metadata,
                )
                served = [i.item_id for i in answer.items]
                if scope == "diverse":
                    assert not {"i1", "i2"} & set(served)
                positions = [int(np.searchsorted(ids, i)) for i in served]
                diversity[scope].append(intra_list_diversity([positions], unit, 10))
        assert np.mean(diversity["diverse"]) > np.mean(diversity["plain"])
        candidates = await stub.RankCandidates(
            pb.RankCandidatesRequest(
                user_id="u1", scope="diverse", candidate_item_ids=["i1", "i3", "i4"]
            ),
            metadata=metadata,
        )
        assert "i1" not in {i.item_id for i in candidates.items}

    stored = {scope: (await pg.evaluations(scope, limit=2)) for scope in ("diverse", "plain")}
    served_diversity = {
        scope: next(e for e in rows if e["model"] == "privrank")["metrics"]["diversity@10"]
        for scope, rows in stored.items()
    }
    assert served_diversity["diverse"] > served_diversity["plain"]


AB_PROFILES = """
[ab]
diversity = 0.0

[ab.variants.diverse]
share = 0.5
diversity = 0.8
candidates = 60
"""


def test_bucketing_is_stable_and_split_as_configured(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text("[s]\n[s.variants.a]\nshare = 0.2\n[s.variants.b]\nshare = 0.3\n")
    profile = load_profiles(path)["s"]
    users = [f"user-{n}" for n in range(20_000)]
    first = [profile.variant_of("s", u) for u in users]
    assert first == [profile.variant_of("s", u) for u in users]  # deterministic
    shares = {v: first.count(v) / len(users) for v in ("a", "b", "control")}
    # binomial standard error at n = 20,000 is about 0.003: five of them either side
    assert shares["a"] == pytest.approx(0.2, abs=0.015)
    assert shares["b"] == pytest.approx(0.3, abs=0.015)
    assert shares["control"] == pytest.approx(0.5, abs=0.015)
    # another scope buckets the same users independently
    other = [profile.variant_of("t", u) for u in users]
    assert sum(x == y for x, y in zip(first, other, strict=True)) < 0.5 * len(users)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[s.variants.a]\nshare = 0.7\n[s.variants.b]\nshare = 0.6\n", "add up to more than 1"),
        ("[s.variants.a]\nshare = 0\n", "needs a share"),
        ("[s.variants.a]\nshare = 0.5\ncache_ttl_s = 60\n", "cannot set 'cache_ttl_s'"),
        ("[s.variants.a]\nshare = 0.5\nmodel = 'rules'\n", "model must be one of"),
        (
            "[s]\nmodel = 'rules'\nbase_scores = {a = 1}\n"
            "[s.variants.a]\nshare = 0.5\nmodel = 'item_item'\n",
            "variant 'a'",
        ),
        ("[s.variants.control]\nshare = 0.5\n", "not named control"),
        ("[s.variants.a]\nshare = 0.5\ndiversity = 3\n", "variant 'a'"),
    ],
)
def test_bad_variants_fail_fast(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profiles(path)


async def test_variants_are_served_recorded_and_measured_apart(
    config: Config, pg: PgStore, cache: RankCache, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(AB_PROFILES)
    profiled = dataclasses.replace(config, profiles_file=path, profiles=load_profiles(path))
    ctx = JobContext(profiled, pg, cache)
    await pg.insert_event_batches(generate(users=120, items=150, events=4000, scope="ab", seed=23))
    await run_job(ctx, "nightly", ["ab"])
    rows = await pg.evaluations("ab", limit=10)
    assert {"privrank", "privrank/diverse", "popularity"} <= {r["model"] for r in rows}

    profile = profiled.profile("ab")
    async with serving(profiled, pg_url, redis_url) as running:
        channel, service, admin = running.channel, running.service, running.admin
        stub = rpc.RankingStub(channel)
        seen_variants = set()
        for n in range(30):
            user = f"u{n}"
            answer = await stub.Recommend(
                pb.RecommendRequest(user_id=user, scope="ab", limit=10), metadata=service
            )
            assert answer.variant == profile.variant_of("ab", user)
            seen_variants.add(answer.variant)
            # feedback: one impression, and a click from the diverse variant only
            kinds = [pb.IMPRESSION] + ([pb.CLICK] if answer.variant == "diverse" else [])
            await stub.RecordEvents(
                pb.RecordEventsRequest(
                    events=[
                        pb.Event(
                            user_id=user,
                            item_id=answer.items[0].item_id,
                            scope="ab",
                            event_type=kind,
                        )
                        for kind in kinds
                    ]
                ),
                metadata=service,
            )
        assert seen_variants == {"control", "diverse"}
        metrics = await rpc.AdminStub(channel).GetMetrics(
            pb.GetMetricsRequest(scope="ab"), metadata=admin
        )
    assert metrics.online.click_through_by_variant["diverse"] == pytest.approx(1.0)
    assert metrics.online.click_through_by_variant["control"] == pytest.approx(0.0)
    assert set(metrics.online.served_by_variant) == {"control", "diverse"}
