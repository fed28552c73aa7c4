"""The cold-start ladder through the real server: context, recent items, scope popularity —
and none of it personal for a user who opted out."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from features.errors import StoreUnavailable
from features.schema import DEVICE_CATEGORIES
from server.api import privrank_pb2 as pb
from tests.conftest import Client


def _busiest_context(client: Client) -> tuple[int, pb.EventContext]:
    """The segment with the most context data, and a request context that falls in it now."""
    snap = client.app.ranker.scope("default").snapshot
    assert snap.segment_items is not None
    filled = (snap.segment_items >= 0).sum(axis=1)
    segment = int(np.argmax(filled))
    assert filled[segment] > 0, "the seeded data gave no context segment"
    daypart, device = divmod(segment, len(DEVICE_CATEGORIES))
    hour_now = datetime.now(UTC).hour
    offset_hours = (daypart * 6 + 3 - hour_now) % 24  # lands mid-daypart
    offset_hours = offset_hours - 24 if offset_hours > 14 else offset_hours
    context = pb.EventContext(
        device_category=DEVICE_CATEGORIES[device], utc_offset_minutes=offset_hours * 60
    )
    return segment, context


async def test_no_history_is_ranked_by_context_then_scope(client: Client) -> None:
    segment, context = _busiest_context(client)
    snap = client.app.ranker.scope("default").snapshot
    assert snap.segment_items is not None
    answer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="never-seen", limit=5, context=context), metadata=client.svc
    )
    assert answer.source == pb.SOURCE_CONTEXT
    expected = [str(snap.item_ids[i]) for i in snap.segment_items[segment][:5] if i >= 0]
    assert [i.item_id for i in answer.items][: len(expected)] == expected
    plain = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="never-seen", limit=5), metadata=client.svc
    )
    assert plain.source == pb.SOURCE_POPULAR
    # an opted-out user gets exactly what a user with no history gets, in the same context
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id="u150", personalization_enabled=False),
        metadata=client.svc,
    )
    try:
        opted_out = await client.ranking.Recommend(
            pb.RecommendRequest(user_id="u150", limit=5, context=context), metadata=client.svc
        )
        assert opted_out == answer
    finally:
        await client.settings.UpdateSettings(
            pb.UpdateSettingsRequest(user_id="u150", personalization_enabled=True),
            metadata=client.svc,
        )


async def test_a_few_fresh_events_give_item_neighbours(client: Client) -> None:
    snap = client.app.ranker.scope("default").snapshot
    fresh = ["i3", "i5", "i8"]
    await client.ranking.RecordEvents(
        pb.RecordEventsRequest(
            events=[
                pb.Event(user_id="newcomer-1", item_id=item, event_type=pb.CLICK) for item in fresh
            ]
        ),
        metadata=client.svc,
    )
    answer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="newcomer-1", limit=10), metadata=client.svc
    )
    assert answer.source == pb.SOURCE_RECENT
    ids = [i.item_id for i in answer.items]
    assert not set(fresh) & set(ids)
    # oracle: the summed cosine similarity to the fresh items
    pos = snap.item_positions(fresh)
    scores = snap.item_unit @ snap.item_unit[pos].sum(axis=0)
    scores[pos] = -np.inf
    best = [
        str(snap.item_ids[i])
        for i in sorted(range(snap.n_items), key=lambda i: (-scores[i], i))[:10]
    ]
    assert ids == best

    # the fresh items are data of the user: export counts them, erasure removes them
    exported = await client.settings.ExportUserData(
        pb.ExportUserDataRequest(user_id="newcomer-1"), metadata=client.svc
    )
    assert exported.cached_rankings >= 1
    await client.settings.DeleteUserData(
        pb.DeleteUserDataRequest(user_id="newcomer-1"), metadata=client.svc
    )
    assert await client.app.cache.recent("default", "newcomer-1") == []


async def _recent_after_a_click(client: Client, user: str) -> list[str]:
    """Record a click of ``user`` on i3; the user's recent items in Redis after it."""
    await client.ranking.RecordEvents(
        pb.RecordEventsRequest(events=[pb.Event(user_id=user, item_id="i3", event_type=pb.CLICK)]),
        metadata=client.svc,
    )
    return await client.app.cache.recent("default", user)


async def test_an_opt_out_this_process_has_not_heard_of_leaves_no_recent_items(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process took the opt-out a moment ago: this one's opt-out set still lets the
    user's events through, and the recent items written for them are deleted again."""
    user = "newcomer-3"
    await client.app.pg.update_settings(
        user, personalization_enabled=False, data_sharing_consent=None
    )
    monkeypatch.setattr(client.app.optouts, "personalization_allowed", lambda _user: True)
    assert await _recent_after_a_click(client, user) == []
    monkeypatch.undo()
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id=user, personalization_enabled=True), metadata=client.svc
    )
    assert await _recent_after_a_click(client, user) == ["i3"]  # allowed again: remembered
    await client.settings.DeleteUserData(  # leave no active user behind for other tests
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )


async def test_recent_items_are_not_kept_when_opt_outs_cannot_be_checked_again(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL fails between storing the events and the opt-out re-check: the recent items
    just written cannot be confirmed, so they are deleted (fail closed)."""
    user = "newcomer-4"

    async def unreachable(*_args: object, **_kwargs: object) -> set[str]:
        raise StoreUnavailable("PostgreSQL: connection refused")

    monkeypatch.setattr(client.app.pg, "not_personal", unreachable)
    assert await _recent_after_a_click(client, user) == []
    monkeypatch.undo()
    assert await _recent_after_a_click(client, user) == ["i3"]  # checked again: remembered
    await client.settings.DeleteUserData(  # leave no active user behind for other tests
        pb.DeleteUserDataRequest(user_id=user), metadata=client.svc
    )


async def test_an_opted_out_newcomer_leaves_no_recent_items(client: Client) -> None:
    await client.settings.UpdateSettings(
        pb.UpdateSettingsRequest(user_id="newcomer-2", personalization_enabled=False),
        metadata=client.svc,
    )
    await client.ranking.RecordEvents(
        pb.RecordEventsRequest(
            events=[pb.Event(user_id="newcomer-2", item_id="i3", event_type=pb.CLICK)]
        ),
        metadata=client.svc,
    )
    assert await client.app.cache.recent("default", "newcomer-2") == []
    answer = await client.ranking.Recommend(
        pb.RecommendRequest(user_id="newcomer-2", limit=5), metadata=client.svc
    )
    assert answer.source == pb.SOURCE_POPULAR


async def test_traffic_per_rung_is_counted(client: Client) -> None:
    await client.ranking.Recommend(pb.RecommendRequest(user_id="nobody"), metadata=client.svc)
    metrics = await client.admin.GetMetrics(pb.GetMetricsRequest(), metadata=client.adm)
    served = metrics.online.served_by_source
    assert served["popular"] >= 1
    assert set(served) <= {"cached", "live", "popular", "context", "recent"}
