"""Health says SERVING only once the kernels are warm: in a fresh process with an empty numba
cache, the first call of each ranking RPC after SERVING compiles nothing (no kernel gains a
signature), for both models a scope can serve."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from numba.core.registry import CPUDispatcher

from jobs.steps import JobContext
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from tests.conftest import ROOT, cli_env, with_profiles
from tests.serving import serving

# both models the seeded scope can serve: EASE where the snapshot has its matrix, else ALS
VARIANTS = """
[default.variants.emb]
share = 0.4
model = "embeddings"

[default.variants.ease]
share = 0.4
model = "item_item"
"""


def _signatures() -> dict[str, list[str]]:
    """Every numba kernel of the ranking package loaded in this process, with the signatures
    it holds compiled."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("ranking"):
            for attr, value in vars(module).items():
                if isinstance(value, CPUDispatcher):
                    found[f"{name}.{attr}"] = sorted(str(s) for s in value.signatures)
    return found


async def _first_calls() -> dict[str, object]:
    """In the child: serve, then one call of each ranking path; what compiled meanwhile."""
    config = Config.from_env(os.environ)
    assert config.database_url is not None
    assert config.redis_url is not None
    async with serving(config, config.database_url, config.redis_url) as running:
        before = _signatures()
        stub, metadata = rpc.RankingStub(running.channel), running.service
        ranker = running.app.ranker
        snap = ranker.scope("default").snapshot
        users = {ranker.variant("default", str(u))[0]: str(u) for u in snap.user_ids}
        await running.app.cache.delete_rankings("default", snap.version, list(users.values()))
        sources = []
        for user in users.values():
            for limit in (10, 1000):  # and the deepest: past the kernels' small-k paths
                answer = await stub.Recommend(
                    pb.RecommendRequest(user_id=user, limit=limit), metadata=metadata
                )
                sources.append(pb.Source.Name(answer.source))
        for user in [*users.values(), "warm-up-stranger"]:
            request = pb.RankCandidatesRequest(user_id=user, candidate_item_ids=["i1", "i2", "i3"])
            await stub.RankCandidates(request, metadata=metadata)
        await stub.SimilarItems(pb.SimilarItemsRequest(item_id="i1"), metadata=metadata)
        event = pb.Event(user_id="warm-up-newcomer", item_id="i2", event_type=pb.CLICK)
        await stub.RecordEvents(pb.RecordEventsRequest(events=[event]), metadata=metadata)
        newcomer = await stub.Recommend(
            pb.RecommendRequest(user_id="warm-up-newcomer"), metadata=metadata
        )
        sources.append(pb.Source.Name(newcomer.source))
        after = _signatures()
    compiled = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
    return {
        "variants": sorted(users),
        "sources": sorted(set(sources)),
        "compiled": {k: v for k, v in compiled.items() if v},
    }


def child() -> None:
    print(json.dumps(asyncio.run(_first_calls())))


async def test_no_ranking_rpc_compiles_a_kernel_after_serving(
    config: Config, seeded: JobContext, tmp_path: Path
) -> None:
    env = {**cli_env(with_profiles(config, tmp_path, VARIANTS)), "NUMBA_CACHE_DIR": str(tmp_path)}
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "from tests.test_warm_up import child; child()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["variants"] == ["control", "ease", "emb"]
    assert report["sources"] == ["SOURCE_LIVE", "SOURCE_RECENT"]
    assert report["compiled"] == {}
