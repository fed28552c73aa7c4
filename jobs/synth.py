"""Seeded synthetic interaction data with the structure of real logs.

Items belong to latent topics and have power-law (Zipf) popularity; each user prefers one or
two topics and browses in sessions; events are mostly views and clicks with some completions
and purchases, plus impressions. Users are ``u0``…``u{N-1}``, items ``i0``…``i{M-1}``; every
user has at least one event. Timestamps fall in the ``days`` before ``end``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np

from features.schema import DEVICE_CATEGORIES, Interaction

TOPICS = 12
_EVENT_MIX = (
    ("impression", 0.15),
    ("view", 0.45),
    ("click", 0.25),
    ("complete", 0.08),
    ("purchase", 0.05),
    ("rating", 0.02),
)
_COUNTRIES = ("DE", "FR", "GB", "US", "IN", "BR", "JP", "NL", "ES", "PL")
_OFFSETS = (60, 60, 0, -300, 330, -180, 540, 60, 60, 60)


def _draw(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """``size`` positions drawn with probability proportional to the weights behind ``cdf``."""
    drawn = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
    return np.minimum(drawn, len(cdf) - 1).astype(np.int64)


def generate(
    *,
    users: int,
    items: int,
    events: int,
    scope: str,
    seed: int = 7,
    end: datetime | None = None,
    days: int = 60,
    chunk: int = 50_000,
) -> Iterator[list[Interaction]]:
    """Yield the events in chunks of at most ``chunk`` (time-ordered within each user)."""
    if users < 1 or items < 1 or events < users:
        raise ValueError("need users >= 1, items >= 1 and events >= users")
    rng = np.random.default_rng(seed)
    end = end or datetime.now(UTC).replace(microsecond=0)
    item_topic = rng.integers(0, TOPICS, items)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    rng.shuffle(popularity)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(TOPICS)]
    # cumulative weights, drawn from by inverse CDF: O(log n) a draw at a million items
    topic_cdf = [np.cumsum(popularity[idx]) for idx in by_topic]
    global_cdf = np.cumsum(popularity)

    # events per user: every user one, the rest spread with a heavy tail
    activity = rng.pareto(1.5, users) + 1.0
    per_user = 1 + rng.multinomial(events - users, activity / activity.sum())
    user_device = rng.integers(1, len(DEVICE_CATEGORIES) - 1, users)
    user_country = rng.integers(0, len(_COUNTRIES), users)
    types = [t for t, _ in _EVENT_MIX]
    type_p = np.array([p for _, p in _EVENT_MIX])
    span = days * 86400.0

    batch: list[Interaction] = []
    for u in range(users):
        n = int(per_user[u])
        liked = rng.choice(TOPICS, size=1 + int(rng.random() < 0.5), replace=False)
        topic = np.where(rng.random(n) < 0.8, liked[rng.integers(0, len(liked), n)], -1)
        picks = _draw(rng, global_cdf, n)  # an event off the user's topics: any item
        for t in liked:
            mine = topic == t
            if len(by_topic[t]) and mine.any():
                picks[mine] = by_topic[t][_draw(rng, topic_cdf[t], int(mine.sum()))]
        kinds = rng.choice(len(types), size=n, p=type_p)
        # sessions: bursts of a few minutes, at a user-typical hour
        sessions = max(1, n // 6)
        session_of = np.sort(rng.integers(0, sessions, n))
        session_start = np.sort(rng.random(sessions) * span)
        offsets = session_start[session_of] + rng.random(n) * 900.0
        country = int(user_country[u])
        for j in range(n):
            kind = types[kinds[j]]
            batch.append(
                Interaction(
                    scope=scope,
                    user_id=f"u{u}",
                    item_id=f"i{picks[j]}",
                    event_type=kind,
                    value=float(rng.integers(3, 6)) if kind == "rating" else 1.0,
                    occurred_at=end - timedelta(seconds=span - float(offsets[j])),
                    session_id=f"s{u}-{session_of[j]}",
                    device=int(user_device[u]),
                    country=_COUNTRIES[country],
                    utc_offset_minutes=_OFFSETS[country],
                )
            )
            if len(batch) >= chunk:
                yield batch
                batch = []
    if batch:
        yield batch
