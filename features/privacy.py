"""Rankings written while their users' privacy changed: found and deleted after the write."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from features.cache import RankCache
from features.postgres import PgStore


async def retract_not_personal(
    pg: PgStore,
    cache: RankCache,
    scope: str,
    model_version: str,
    user_ids: Sequence[str],
    *,
    data_as_of: float,
    stored: bool,
) -> set[str]:
    """Delete the rankings of ``model_version`` just written for ``user_ids`` (to Redis; with
    ``stored`` also to the ranks table) of those who have opted out, or were erased at or
    after the snapshot's data was read (``data_as_of``, unix seconds). Returns those users.

    A writer checks its users first, but a change can land between that check and the write.
    Run this after the writes: a change committed before its query is found here, and one
    committed later deletes the user's rankings itself (settings and erasure both delete after
    their commit), so after these writes. No interleaving leaves such a ranking behind."""
    if not user_ids:
        return set()
    gone = await pg.not_personal(user_ids, erased_since=datetime.fromtimestamp(data_as_of, UTC))
    if gone:
        users = sorted(gone)
        await cache.delete_rankings(scope, model_version, users)
        if stored:
            await pg.drop_ranks(scope, users)
    return gone
