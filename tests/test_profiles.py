"""Per-scope profiles: validated at start-up, and honoured end to end (exclusions,
diversity re-ranking, the evaluation measuring what is served)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from grpc import aio

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
from server.app import App, create_server
from server.auth import mint_token
from server.config import Config

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

    app = await App.open(profiled, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await server.start()
    await app.warm()
    token = mint_token(
        profiled.signing_keys()[0],
        role="service",
        subject="t",
        ttl_s=600,
        issuer=profiled.token_issuer,
    )
    metadata = [("authorization", f"Bearer {token}")]
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
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
    finally:
        await server.stop(0)
        await app.close()

    stored = {scope: (await pg.evaluations(scope, limit=2)) for scope in ("diverse", "plain")}
    served_diversity = {
        scope: next(e for e in rows if e["model"] == "privrank")["metrics"]["diversity@10"]
        for scope, rows in stored.items()
    }
    assert served_diversity["diverse"] > served_diversity["plain"]
