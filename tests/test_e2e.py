"""End to end through a real gRPC server on a free port, with real PostgreSQL and Redis:
synthetic interactions → nightly jobs → every RPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from features.cache import RECENT_ITEMS
from features.errors import ConfigError, StoreUnavailable
from jobs.runner import run_job
from jobs.steps import JobContext
from jobs.synth import generate
from ranking.pipeline import LoadedScope
from ranking.profiles import Profile
from server import auth
from server.api import privrank_pb2 as pb
from server.app import App, create_server, serve
from server.auth import mint_token
from server.config import Config
from server.interceptors import InFlight, ServingInterceptor
from server.metrics import ServiceMetrics
from tests.conftest import NOT_SERVING, SEED_ITEMS, SERVING, Client, assert_offline_as_stored


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as err:
        await call
    return err.value.code()


async def test_health_is_not_serving_until_warm(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext
) -> None:
    app = await App.open(config, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await app.update_health()
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            before = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert before.status == NOT_SERVING
            await app.warm()
            for service in ("", "privrank.v1.Ranking", "privrank.v1.Admin"):
                after = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert after.status == SERVING
    finally:
        await server.stop(1)
        await app.close()


async def test_a_port_taken_after_the_cli_checked_it_is_a_one_line_config_error(
    client: Client,
) -> None:
    """The CLI's check cannot hold the port for gRPC: a process that takes it in between
    makes the bind a ConfigError (one line from the CLI), not grpcio's RuntimeError."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=f"PRIVRANK_LISTEN: cannot listen on {address}"):
            create_server(client.app, address)


async def test_a_server_without_any_snapshot_is_not_ready_until_one_is_loaded(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext, tmp_path: Path
) -> None:
    """A new deployment before its first nightly: Settings and Admin answer, while Ranking and
    the server as a whole say NOT_SERVING and ranking calls are UNAVAILABLE, until a snapshot
    is published and loaded; once stopping, every service says NOT_SERVING."""
    empty = dataclasses.replace(config, data_dir=tmp_path)
    app = await App.open(empty, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await app.update_health()
    await server.start()
    await app.warm()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = Client.over(app, channel, empty, port)

            async def health() -> dict[str, int]:
                names = ("", "privrank.v1.Ranking", "privrank.v1.Settings", "privrank.v1.Admin")
                return {
                    name: (
                        await client.health.Check(health_pb2.HealthCheckRequest(service=name))
                    ).status
                    for name in names
                }

            assert await health() == {
                "": NOT_SERVING,
                "privrank.v1.Ranking": NOT_SERVING,
                "privrank.v1.Settings": SERVING,
                "privrank.v1.Admin": SERVING,
            }
            with pytest.raises(aio.AioRpcError) as err:
                await client.ranking.Recommend(
                    pb.RecommendRequest(user_id="u1"), metadata=client.svc
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no snapshot loaded yet" in (err.value.details() or "")
            await client.settings.GetSettings(
                pb.GetSettingsRequest(user_id="u1"), metadata=client.svc
            )

            shutil.copytree(config.snapshot_dir, empty.snapshot_dir)
            await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
            assert set((await health()).values()) == {SERVING}
            answer = await client.ranking.Recommend(
                pb.RecommendRequest(user_id="u1"), metadata=client.svc
            )
            assert answer.items

            app.stopping = True
            await app.update_health()
            assert set((await health()).values()) == {NOT_SERVING}
    finally:
        await server.stop(1)
        await app.close()


async def test_health_stays_not_serving_once_stopping_though_an_update_was_under_way(
    config: Config,
    pg_url: str,
    redis_url: str,
    seeded: JobContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload's health update that waits in ``set`` (as it does while a Watch stream
    writes) when shutdown begins must not turn Ranking SERVING after the stop's update."""
    empty = dataclasses.replace(config, data_dir=tmp_path)
    app = await App.open(empty, pg_url, redis_url)
    server, port = create_server(app, "127.0.0.1:0")
    await server.start()
    await app.warm()  # no snapshot: Ranking and "" NOT_SERVING
    try:
        shutil.copytree(config.snapshot_dir, empty.snapshot_dir)
        entered, set_status = asyncio.Event(), app.health.set

        async def held_up(service: str, status: int) -> None:
            entered.set()
            await asyncio.sleep(0.05)  # the condition a writing Watch stream holds
            await set_status(service, status)

        monkeypatch.setattr(app.health, "set", held_up)
        reload = asyncio.create_task(app.reload())
        await entered.wait()
        app.stopping = True  # SIGTERM, as serve() does it
        await app.update_health()
        await reload
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "privrank.v1.Ranking", "privrank.v1.Settings", "privrank.v1.Admin"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == NOT_SERVING, name
    finally:
        await server.stop(1)
        await app.close()


async def test_reflection_lists_the_three_services(client: Client) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    def list_services() -> set[str]:
        # the reflection client is synchronous: run it off the loop that serves it
        with grpc.insecure_channel(f"127.0.0.1:{client.port}") as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    services = await asyncio.to_thread(list_services)
    assert {
        "privrank.v1.Ranking",
        "privrank.v1.Settings",
        "privrank.v1.Admin",
        "grpc.health.v1.Health",
    } <= services


async def test_recommend_excludes_seen_items_and_is_stable(
    client: Client, seeded: JobContext
) -> None:
    pairs = await seeded.pg.training_pairs("default")
    for user in ("u1", "u2", "u7"):
        seen = {i for u, i in zip(pairs.user_ids, pairs.item_ids, strict=True) if u == user}
        first = await client.ranking.Recommend(
            pb.RecommendRequest(user_id=user, limit=20), metadata=client.svc
        )
        second = await client.ranking.Recommend(
            pb.RecommendRequest(user_id=user, limit=20), metadata=client.svc
        )
        ids = [i.item_id for i in first.items]
        assert len(ids) == 20
        assert len(set(ids)) == 20
        assert not seen & set(ids), f"{user} was recommended items they already saw"
        assert first.source in (pb.SOURCE_CACHED, pb.SOURCE_LIVE)
        assert [(i.item_id, i.score) for i in first.items] == [
            (i.item_id, i.score) for i in second.items
        ]
        scores = [i.score for i in first.items]
        assert scores == sorted(scores, reverse=True)
        assert first.model_version == client.app.ranker.scope("default").snapshot.version
        # only IDs and scores on the wire
        assert {f.name for f, _ in first.items[0].ListFields()} <= {"item_id", "score"}


async def test_active_users_are_served_from_the_cache_identically(
    client: Client, seeded: JobContext
) -> None:
    from datetime import UTC, datetime

    active = await seeded.pg.active_users("default", now=datetime.now(UTC))
    user = active[0]
    cached = await client.ranking.Recommend(
        pb.RecommendRequest(user_id=user, limit=10), metadata=client.svc
    )
    assert cached.source == pb.SOURCE_CACHED
    # the same user beyond the cached depth is ranked live, and agrees on the shared prefix
    live = await client.ranking.Recommend(
        pb.RecommendRequest(user_id=user, limit=client.config.precompute_top_k + RECENT_ITEMS + 1),
        metadata=client.svc,
    )
    assert live.source == pb.SOURCE_LIVE
    assert [i.item_id for i in live.items[:10]] == [i.item_id for i in cached.items]


async def test_items_just_interacted_with_are_not_recommended_again(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # active users the served model knows (other tests record events of newcomers too)
    snap = client.app.ranker.scope("default").snapshot
    active = [
        user
        for user in await seeded.pg.active_users("default", now=datetime.now(UTC))
        if snap.user_position(user) is not None
    ]

    async def recommend(user: str, limit: int) -> pb.RankedItems:
        request = pb.RecommendRequest(user_id=user, limit=limit)
        return await client.ranking.Recommend(request, metadata=client.svc)

    async def purchase(user: str, item: str) -> None:
        event = pb.Event(user_id=user, item_id=item, event_type=pb.PURCHASE)
        request = pb.RecordEventsRequest(events=[event])
        await client.ranking.RecordEvents(request, metadata=client.svc)

    # cached: what precompute stored, less the purchase, still ten items from the cache
    user = active[-1]
    cached = await recommend(user, 10)
    assert cached.source == pb.SOURCE_CACHED
    before = [i.item_id for i in cached.items]
    await purchase(user, before[0])
    after = await recommend(user, 10)
    assert after.source == pb.SOURCE_CACHED
    assert [i.item_id for i in after.items][:9] == before[1:]
    # live: deeper than the cache holds
    user, deep = active[-2], client.config.precompute_top_k + RECENT_ITEMS + 1
    first = await recommend(user, deep)
    assert first.source == pb.SOURCE_LIVE
    await purchase(user, first.items[0].item_id)
    again = await recommend(user, deep)
    assert again.source == pb.SOURCE_LIVE
    assert [i.item_id for i in again.items] == [i.item_id for i in first.items[1:]]

    # Redis unreachable: still an answer, without the snapshot's seen items
    async def unreachable(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("Redis: down")

    monkeypatch.setattr(client.app.cache, "get_with_recent", unreachable)
    position = snap.user_position(user)
    assert position is not None
    seen = {str(snap.item_ids[i]) for i in snap.seen(position)}
    down = await recommend(user, deep)
    assert down.source == pb.SOURCE_LIVE
    assert [i.item_id for i in down.items] == [i.item_id for i in first.items]
    assert not seen & {i.item_id for i in down.items}


async def test_recommend_honours_exclusions(client: Client) -> None:
    full = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u4", limit=10), metadata=client.svc
    )
    drop = [i.item_id for i in full.items[:3]]
    fewer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u4", limit=10, exclude_item_ids=drop), metadata=client.svc
    )
    assert not set(drop) & {i.item_id for i in fewer.items}
    assert len(fewer.items) == 10


async def test_unknown_user_gets_the_popular_ranking(client: Client) -> None:
    answer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="brand-new", limit=5), metadata=client.svc
    )
    assert answer.source == pb.SOURCE_POPULAR
    assert len(answer.items) == 5


async def test_opted_out_user_gets_exactly_the_no_history_answer(client: Client) -> None:
    request = {"limit": 15, "exclude_item_ids": ["i1", "i2"]}
    nobody = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="nobody", **request), metadata=client.svc
    )
    personal = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u9", **request), metadata=client.svc
    )
    assert personal.source != pb.SOURCE_POPULAR
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id="u9", personalization_enabled=False), metadata=client.svc
    )
    try:
        opted_out = await client.ranking.Recommend(
            pb.RecommendRequest(user_id="u9", **request), metadata=client.svc
        )
        assert opted_out == nobody
        ranked = await client.ranking.RankCandidates(
            pb.RankCandidatesRequest(user_id="u9", candidate_item_ids=["i3", "i4", "i5"]),
            metadata=client.svc,
        )
        assert ranked.source == pb.SOURCE_POPULAR
        assert await client.app.cache.count_user("u9") == 0
    finally:
        await client.settings.UpdateSettings(
            pb.UpdateSettingsRequest(user_id="u9", personalization_enabled=True),
            metadata=client.svc,
        )
    again = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u9", **request), metadata=client.svc
    )
    assert again.source == pb.SOURCE_LIVE  # cached ranking was deleted on opt-out


async def test_global_switch_sends_everyone_the_popular_ranking(client: Client) -> None:
    off = await client.admin.SetFlags(
        pb.SetFlagsRequest(personalization_enabled=False), metadata=client.adm
    )
    assert not off.personalization_enabled
    try:
        answer = await client.ranking.Recommend(
            pb.RecommendRequest(user_id="u1", limit=5), metadata=client.svc
        )
        nobody = await client.ranking.Recommend(
            pb.RecommendRequest(user_id="nobody", limit=5), metadata=client.svc
        )
        assert answer == nobody
    finally:
        on = await client.admin.SetFlags(
            pb.SetFlagsRequest(personalization_enabled=True), metadata=client.adm
        )
    assert on.personalization_enabled


async def test_rank_candidates_orders_known_candidates(client: Client) -> None:
    candidates = ["i10", "i20", "i30", "i40", "unknown-item"]
    answer = await client.ranking.RankCandidates(
        pb.RankCandidatesRequest(user_id="u2", candidate_item_ids=candidates), metadata=client.svc
    )
    ids = [i.item_id for i in answer.items]
    assert sorted(ids) == ["i10", "i20", "i30", "i40"]
    top2 = await client.ranking.RankCandidates(
        pb.RankCandidatesRequest(user_id="u2", candidate_item_ids=candidates, limit=2),
        metadata=client.svc,
    )
    assert [i.item_id for i in top2.items] == ids[:2]


async def test_an_unknown_id_is_never_taken_for_a_known_one_it_begins_with(
    client: Client,
) -> None:
    # the catalog's IDs are i0-i119; an unknown ID one longer than the longest ones, cut to
    # the catalog's width, would read as a known item and be ranked or excluded as that one
    served = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u2", limit=50), metadata=client.svc
    )
    ids = [i.item_id for i in served.items]
    known = next(i for i in ids if len(i) == 4)  # one of i100-i119
    kept = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u2", limit=50, exclude_item_ids=[known + "0"]),
        metadata=client.svc,
    )
    assert [i.item_id for i in kept.items] == ids
    ranked = await client.ranking.RankCandidates(
        pb.RankCandidatesRequest(user_id="u2", candidate_item_ids=[known + "0", "i10"]),
        metadata=client.svc,
    )
    assert [i.item_id for i in ranked.items] == ["i10"]


async def test_similar_items(client: Client) -> None:
    answer = await client.ranking.SimilarItems(
        pb.SimilarItemsRequest(item_id="i3", limit=5), metadata=client.svc
    )
    ids = [i.item_id for i in answer.items]
    assert len(ids) == 5
    assert "i3" not in ids
    assert all(-1.0001 <= i.score <= 1.0001 for i in answer.items)
    code = await _code(
        client.ranking.SimilarItems(
            pb.SimilarItemsRequest(item_id="no-such-item"), metadata=client.svc
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_recorded_ratings_train_as_their_value_an_explicit_0_included(
    client: Client, seeded: JobContext
) -> None:
    """``value`` has presence: unset means 1, a 0 sent is a 0 rating (adds nothing)."""
    scope = "ratings0"

    def rating(item: str, **value: float) -> pb.Event:
        return pb.Event(user_id="r1", item_id=item, scope=scope, event_type=pb.RATING, **value)

    request = pb.RecordEventsRequest(
        events=[rating("i4", value=4.0), rating("i0", value=0.0), rating("i1")]
    )
    assert request.events[1].HasField("value")
    accepted = await client.ranking.RecordEvents(request, metadata=client.svc)
    assert accepted.accepted == 3
    pairs = await seeded.pg.training_pairs(scope)
    strength = dict(zip(pairs.item_ids.tolist(), pairs.strength.tolist(), strict=True))
    assert strength == {"i4": 4.0, "i0": 0.0, "i1": 1.0}


async def test_recorded_events_change_the_next_ranking(client: Client, seeded: JobContext) -> None:
    scope = "evolving"
    await seeded.pg.insert_event_batches(
        generate(users=80, items=60, events=1500, scope=scope, seed=11)
    )
    await run_job(seeded, "nightly", [scope])
    await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    before = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u5", scope=scope, limit=10), metadata=client.svc
    )
    top = [i.item_id for i in before.items[:5]]
    accepted = await client.ranking.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                pb.Event(
                    user_id="u5",
                    item_id=item,
                    scope=scope,
                    event_type=pb.PURCHASE,
                    context=pb.EventContext(
                        session_id="s-new",
                        device_category="mobile",
                        country_code="DE",
                        utc_offset_minutes=60,
                    ),
                )
                for item in top
            ]
        ),
        metadata=client.svc,
    )
    assert accepted.accepted == 5
    await run_job(seeded, "nightly", [scope])
    reloaded = await client.admin.Reload(pb.ReloadRequest(), metadata=client.adm)
    assert reloaded.model_versions[scope] != before.model_version
    after = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u5", scope=scope, limit=10), metadata=client.svc
    )
    assert after.model_version == reloaded.model_versions[scope]
    assert not set(top) & {i.item_id for i in after.items}, "purchased items came back"
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]


async def test_a_new_snapshot_is_prepared_off_the_event_loop(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each variant's scoring is a catalog-sized pass: serving must not stall for it at a swap
    scope = "swapped"
    await seeded.pg.insert_event_batches(generate(users=40, items=30, events=600, scope=scope))
    await run_job(seeded, "nightly", [scope])
    threads: list[int] = []
    with_profile = LoadedScope.with_profile

    def recording(self: LoadedScope, profile: Profile) -> LoadedScope:
        threads.append(threading.get_ident())
        return with_profile(self, profile)

    monkeypatch.setattr(LoadedScope, "with_profile", recording)
    versions = await client.app.reload()
    assert threads, "the new snapshot was not prepared"
    assert threading.get_ident() not in threads  # the event loop's thread
    reply = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="u1", scope=scope, limit=5), metadata=client.svc
    )
    assert reply.model_version == versions[scope]


async def test_auth_errors(client: Client) -> None:
    request = pb.RecommendRequest(user_id="u1")
    assert await _code(client.ranking.Recommend(request)) == grpc.StatusCode.UNAUTHENTICATED
    forged = mint_token(
        "another-key-" + "y" * 32, role="admin", subject="x", ttl_s=60, issuer="privrank"
    )
    assert (
        await _code(
            client.ranking.Recommend(request, metadata=[("authorization", f"Bearer {forged}")])
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )
    expired = mint_token(
        client.config.signing_keys()[0],
        role="service",
        subject="x",
        ttl_s=60,
        issuer="privrank",
        now=time.time() - 3600,
    )
    assert (
        await _code(
            client.ranking.Recommend(request, metadata=[("authorization", f"Bearer {expired}")])
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        await _code(client.admin.GetMetrics(pb.GetMetricsRequest(), metadata=client.svc))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    user = client.token("user", "u3")
    assert (
        await _code(client.ranking.Recommend(request, metadata=user))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    own = await client.settings.GetSettings(pb.GetSettingsRequest(user_id="u3"), metadata=user)
    assert own.user_id == "u3"
    assert own.personalization_enabled
    assert (
        await _code(client.settings.GetSettings(pb.GetSettingsRequest(user_id="u4"), metadata=user))
        == grpc.StatusCode.PERMISSION_DENIED
    )


@pytest.mark.parametrize(
    "request_message",
    [
        pb.RecommendRequest(user_id=""),
        pb.RecommendRequest(user_id="u1", limit=10_000),
        pb.RecommendRequest(user_id="u1", limit=-1),
        pb.RecommendRequest(user_id="u1", scope="no-such-scope"),
        pb.RecommendRequest(user_id="u1", scope="Bad Scope!"),
        pb.RecommendRequest(user_id="jane.doe@example.com"),
        pb.RecommendRequest(user_id="u1", exclude_item_ids=["i1"] * 10_001),
        pb.RecommendRequest(user_id="u1", exclude_item_ids=[""]),
    ],
)
async def test_malformed_recommend_is_invalid_argument(
    client: Client, request_message: pb.RecommendRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await client.ranking.Recommend(request_message, metadata=client.svc)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()


@pytest.mark.parametrize(
    "event",
    [
        pb.Event(user_id="u1", item_id="i1"),  # no event type
        pb.Event(user_id="u1", item_id="+44 20 7946 0958", event_type=pb.CLICK),
        pb.Event(
            user_id="u1",
            item_id="i1",
            event_type=pb.CLICK,
            context=pb.EventContext(device_category="toaster"),
        ),
        pb.Event(
            user_id="u1",
            item_id="i1",
            event_type=pb.CLICK,
            context=pb.EventContext(country_code="Germany"),
        ),
        pb.Event(
            user_id="u1",
            item_id="i1",
            event_type=pb.CLICK,
            context=pb.EventContext(utc_offset_minutes=5000),
        ),
    ],
)
async def test_malformed_events_store_nothing(
    client: Client, seeded: JobContext, event: pb.Event
) -> None:
    good = pb.Event(user_id="u-batch", item_id="i1", scope="rejected", event_type=pb.VIEW)
    event.scope = "rejected"
    with pytest.raises(aio.AioRpcError) as err:
        await client.ranking.RecordEvents(
            pb.RecordEventsRequest(events=[good, event]), metadata=client.svc
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1]" in err.value.details()
    assert "rejected" not in await seeded.pg.scopes()


async def test_export_and_delete_user_data(client: Client) -> None:
    user = "u12"
    exported = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=client.token("user", user)
    )
    assert exported.settings.user_id == user
    assert sum(c.count for c in exported.event_counts) > 0
    assert exported.features
    assert "engagement_score" in exported.features[0].values
    receipt = await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )
    assert receipt.removed["events"] == sum(c.count for c in exported.event_counts)
    assert receipt.removed["snapshot"] >= 1
    answer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id=user, limit=5), metadata=client.svc
    )
    assert answer.source == pb.SOURCE_POPULAR
    again = await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )
    assert again.removed["events"] == 0
    assert again.removed["redis"] == 0
    empty = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=client.svc
    )
    assert not empty.features
    assert not empty.event_counts
    assert empty.cached_rankings == 0


async def test_settings_never_set_have_no_updated_at(client: Client) -> None:
    """No settings row: defaults with ``updated_at`` unset, not 1970-01-01; once set, the time."""
    user = "never-set-1"
    got = await client.settings.GetSettings(
        pb.GetSettingsRequest(user_id=user), metadata=client.svc
    )
    assert got.personalization_enabled
    assert not got.HasField("updated_at")
    exported = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id=user), metadata=client.svc
    )
    assert not exported.settings.HasField("updated_at")
    before = datetime.now(UTC) - timedelta(seconds=5)
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id=user, data_sharing_consent=True), metadata=client.svc
    )
    got = await client.settings.GetSettings(
        pb.GetSettingsRequest(user_id=user), metadata=client.svc
    )
    assert got.updated_at.ToDatetime(tzinfo=UTC) >= before


async def test_admin_metrics_model_info_and_job_history(client: Client, seeded: JobContext) -> None:
    await client.ranking.Recommend(pb.RecommendRequest(user_id="u1"), metadata=client.svc)
    metrics = await client.admin.GetMetrics(pb.GetMetricsRequest(), metadata=client.adm)
    models = {e.model for e in metrics.offline}
    assert {"privrank", "popularity"} <= models
    # the RPC reports exactly what evaluate stored
    assert_offline_as_stored(metrics, await seeded.pg.evaluations("default"))
    for evaluation in metrics.offline:
        for key in (
            "precision@10",
            "recall@10",
            "ndcg@10",
            "map@10",
            "coverage@10",
            "diversity@10",
            "popularity_bias@10",
        ):
            assert 0.0 <= evaluation.values[key] <= 1.0, key
        assert evaluation.values["novelty@10"] > 0
    assert metrics.online.requests > 0
    assert metrics.online.latency_p99_ms >= metrics.online.latency_p50_ms > 0
    info = await client.admin.GetModelInfo(
        pb.GetModelInfoRequest(scope="default"), metadata=client.adm
    )
    assert info.scopes[0].items == SEED_ITEMS
    assert info.scopes[0].retrieval == "exact"
    runs = await client.admin.ListJobRuns(pb.ListJobRunsRequest(limit=50), metadata=client.adm)
    assert {"refresh-features", "train", "build", "precompute", "evaluate", "cleanup"} <= {
        r.name for r in runs.runs if r.status == "succeeded"
    }
    assert (
        await _code(client.admin.RunJob(pb.RunJobRequest(name="rm -rf"), metadata=client.adm))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_admin_metrics_of_a_scope_are_its_own(client: Client) -> None:
    await client.ranking.Recommend(pb.RecommendRequest(user_id="u1"), metadata=client.svc)
    served = client.app.metrics.figures("default").served_by_source
    metrics = await client.admin.GetMetrics(
        pb.GetMetricsRequest(scope="default"), metadata=client.adm
    )
    assert dict(metrics.online.served_by_source) == served
    code = await _code(
        client.admin.GetMetrics(pb.GetMetricsRequest(scope="nosuch"), metadata=client.adm)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@contextlib.asynccontextmanager
async def _test_service(
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    handlers: dict[str, Callable[[bytes, aio.ServicerContext], Awaitable[bytes]]],
    in_flight: InFlight | None = None,
    metrics: ServiceMetrics | None = None,
) -> AsyncIterator[Callable[[str], Awaitable[bytes]]]:
    """A server with privrank's interceptor around ``handlers`` (methods of service test.T,
    callable by the service role). Yields call(method) -> the reply, with a service token."""
    authorizer = auth.Authorizer(config.signing_keys(), config.token_issuer)
    for name in handlers:
        monkeypatch.setitem(auth.POLICY, f"/test.T/{name}", frozenset({auth.Role.SERVICE}))
    server = aio.server(
        interceptors=[
            ServingInterceptor(metrics or ServiceMetrics(), 1.0, None, authorizer, in_flight)
        ]
    )
    generic = {name: grpc.unary_unary_rpc_method_handler(h) for name, h in handlers.items()}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.T", generic)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    token = auth.mint_token(
        config.signing_keys()[0], role="service", subject="t", ttl_s=60, issuer=config.token_issuer
    )
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def call(name: str) -> bytes:
                reply: bytes = await channel.unary_unary(f"/test.T/{name}")(
                    b"", metadata=[("authorization", f"Bearer {token}")]
                )
                return reply

            yield call
    finally:
        await server.stop(0)


async def test_unexpected_errors_become_internal_without_details(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(request: bytes, context: aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internal detail")

    async with _test_service(config, monkeypatch, {"Explode": explode}) as call:
        with pytest.raises(aio.AioRpcError) as err:
            await call("Explode")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details()
    assert "request id" in err.value.details()


async def test_a_cancelled_call_is_counted_cancelled_and_kept_out_of_the_latencies(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = asyncio.Event()

    async def hang(request: bytes, context: aio.ServicerContext) -> bytes:
        entered.set()
        await asyncio.Event().wait()
        return b""

    metrics, in_flight = ServiceMetrics(), InFlight()
    # named like a ranking method, whose latencies make the percentiles
    handlers = {"Recommend": hang}
    async with _test_service(config, monkeypatch, handlers, in_flight, metrics) as call:
        calling = asyncio.create_task(call("Recommend"))
        await entered.wait()
        calling.cancel()  # the client gives up: gRPC cancels the handler
        with contextlib.suppress(asyncio.CancelledError):
            await calling
        assert await in_flight.close(timeout_s=10) == 0  # the interceptor has recorded it
    requests = "privrank_requests_total"
    cancelled = {"method": "Recommend", "code": "CANCELLED"}
    assert metrics.registry.get_sample_value(requests, cancelled) == 1
    assert metrics.registry.get_sample_value(requests, {**cancelled, "code": "OK"}) is None
    latencies = metrics.registry.get_sample_value(
        "privrank_request_seconds_count", {"method": "Recommend"}
    )
    assert not latencies
    figures = metrics.figures()
    assert figures.requests == 1
    assert figures.p99_ms == 0.0


async def test_a_stopping_server_refuses_new_calls_and_waits_for_those_in_flight(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: bytes, context: aio.ServicerContext) -> bytes:
        entered.set()
        await release.wait()
        return b"done"

    in_flight = InFlight()
    async with _test_service(config, monkeypatch, {"Slow": slow}, in_flight) as call:
        running = asyncio.create_task(call("Slow"))
        await entered.wait()
        assert in_flight.count == 1
        closing = asyncio.create_task(in_flight.close(timeout_s=5.0, quiet_s=0.3))
        await asyncio.sleep(0.05)
        # a new call is refused at once, retryable elsewhere
        with pytest.raises(aio.AioRpcError) as err:
            await call("Slow")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.value.details()
        assert not closing.done()  # the call in flight is still running
        release.set()
        assert await running == b"done"
        # and close waits for callers to go quiet (quiet_s after the last refusal)
        assert await closing == 0
        assert time.monotonic() - in_flight.last_refused >= 0.3
        assert in_flight.refused == 1


async def test_oversized_messages_are_refused_and_the_server_keeps_serving(
    client: Client,
) -> None:
    huge = pb.RankCandidatesRequest(
        user_id="u1",
        candidate_item_ids=["i" + "9" * 120] * (client.config.max_message_bytes // 120),
    )
    assert huge.ByteSize() > client.config.max_message_bytes
    code = await _code(client.ranking.RankCandidates(huge, metadata=client.svc))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    answer = await client.ranking.Recommend(pb.RecommendRequest(user_id="u1"), metadata=client.svc)
    assert answer.items


async def test_admin_run_job_starts_a_recorded_run(client: Client) -> None:
    before = {
        r.run_id
        for r in (
            await client.admin.ListJobRuns(pb.ListJobRunsRequest(limit=100), metadata=client.adm)
        ).runs
    }
    # no deadline of the caller's own (as grpcurl sends none): RunJob's default budget is long
    # enough for the job's process to start and record its run
    started = await client.admin.RunJob(
        pb.RunJobRequest(name="cleanup", scope="default"), metadata=client.adm
    )
    assert started.status == "started"
    assert started.run_id > 0
    assert started.run_id not in before
    deadline = time.monotonic() + 120
    while True:
        runs = (
            await client.admin.ListJobRuns(pb.ListJobRunsRequest(limit=100), metadata=client.adm)
        ).runs
        new = [r for r in runs if r.run_id == started.run_id and r.name == "cleanup"]
        if new and new[0].status != "running":
            break
        assert time.monotonic() < deadline, "the job never recorded an outcome"
        await asyncio.sleep(0.2)
    assert new[0].status == "succeeded", new[0].detail
    assert new[0].detail.startswith("removed ")


async def test_admin_run_job_is_aborted_while_another_run_holds_the_lock(
    client: Client, seeded: JobContext
) -> None:
    async with seeded.pg.job_lock():
        with pytest.raises(aio.AioRpcError) as err:
            await client.admin.RunJob(pb.RunJobRequest(name="nightly"), metadata=client.adm)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "another privrank job run is in progress" in (err.value.details() or "")


async def test_a_run_job_that_loses_the_race_for_the_lock_is_aborted_and_recorded(
    client: Client, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run takes the lock between RunJob's check and its process's own try."""

    @contextlib.asynccontextmanager
    async def free() -> AsyncIterator[None]:
        yield

    monkeypatch.setattr(client.app.pg, "job_lock", free)
    async with seeded.pg.job_lock():
        with pytest.raises(aio.AioRpcError) as err:
            await client.admin.RunJob(
                pb.RunJobRequest(name="cleanup", scope="default"),
                metadata=client.adm,
                timeout=120,
            )
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert (err.value.details() or "").startswith("another privrank job run is in progress")
    (newest,) = await seeded.pg.job_runs(1)
    assert (newest.name, newest.scope, newest.status) == ("cleanup", "default", "failed")
    assert newest.detail == err.value.details()


async def test_sigterm_during_warm_up_never_turns_health_serving(
    config: Config, pg_url: str, redis_url: str, seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the kernels still warm: the warm-up finishing afterwards must not say
    SERVING (balancers would send calls to a server that is stopping)."""
    warming, gate = asyncio.Event(), asyncio.Event()
    signalled: list[bool] = []
    said: list[tuple[str, int, bool]] = []
    apps: list[App] = []
    warm = App.warm

    async def gated(self: App) -> None:
        apps.append(self)
        set_status = self.health.set

        async def recording(service: str, status: int) -> None:
            said.append((service, status, bool(signalled)))
            await set_status(service, status)

        monkeypatch.setattr(self.health, "set", recording)
        warming.set()
        await gate.wait()
        await warm(self)

    monkeypatch.setattr(App, "warm", gated)
    quick = dataclasses.replace(
        config,
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        shutdown_delay_s=0.1,
        shutdown_grace_s=1.0,
    )
    serving = asyncio.create_task(serve(quick, pg_url, redis_url))
    await asyncio.wait_for(warming.wait(), 60)
    os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler takes it
    await asyncio.sleep(0.2)
    signalled.append(True)
    gate.set()
    await asyncio.wait_for(serving, 120)
    assert apps
    assert not any(apps[0]._health.values())
    assert all(status == NOT_SERVING for _, status, late in said if late), said
