"""The privacy state each server process keeps in memory: who opted out, who was erased, and
whether personalization is globally on (``Admin.SetFlags``).

Kept current by PostgreSQL LISTEN/NOTIFY (triggers announce every settings change, every
erasure and every change of the global switch) and a periodic full re-read. If the opt-out
set has not been confirmed against PostgreSQL within ``max_staleness_s`` it fails closed:
nobody is personalized until it is confirmed again. Erased users are remembered by hash only
(``features.schema.user_digest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

from features.errors import StoreUnavailable
from features.postgres import Listener, PgStore
from features.schema import user_digest

ERASURE_MEMORY = timedelta(days=30)  # longer than any snapshot serves

log = logging.getLogger(__name__)


class OptOutRegistry:
    def __init__(
        self, pg: PgStore, *, refresh_s: float, max_staleness_s: float, forced_off: bool = False
    ) -> None:
        self._pg = pg
        self._forced_off = forced_off  # PRIVRANK_PERSONALIZATION_ENABLED=false
        self._switch = (True, -1)  # the stored global switch as last heard: (enabled, revision)
        self._refresh_s = refresh_s
        self._max_staleness_s = max_staleness_s
        # user -> revision (UserSettingsRow.revision) of the state held: every opted-out user,
        # and the users who opted in since the last re-read began
        self._opted_out: dict[str, int] = {}
        self._opted_in: dict[str, int] = {}
        self._erased: dict[str, float] = {}  # user hash -> erasure time (unix seconds)
        self._changes_during_read: dict[str, tuple[bool, int]] = {}
        self._confirmed_at = float("-inf")
        self._listener: Listener | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- the view the ranker reads ------------------------------------------------------

    @property
    def fresh(self) -> bool:
        return time.monotonic() - self._confirmed_at <= self._max_staleness_s

    @property
    def personalization_enabled(self) -> bool:
        """The global switch in this process: the stored one (as last heard while PostgreSQL
        is unreachable), unless ``forced_off``."""
        return self._switch[0] and not self._forced_off

    @property
    def personalizing(self) -> bool:
        """Anyone may be ranked personally now: the set is fresh and the switch on."""
        return self.fresh and self.personalization_enabled

    def personalization_allowed(self, user_id: str) -> bool:
        return self.personalizing and user_id not in self._opted_out

    def erased_at(self, user_id: str) -> float | None:
        """When the user was erased (unix seconds), or None."""
        return self._erased.get(user_digest(user_id)) if self._erased else None

    def mark_erased(self, user_id: str) -> None:
        self._erased[user_digest(user_id)] = time.time()

    def _on_message(self, kind: str, revision: int, subject: str) -> None:
        if kind == "E":
            self._erased[subject] = time.time()
        elif kind == "G":
            self.apply_switch(subject == "1", revision)
        else:
            self.apply(subject, kind == "1", revision)

    def apply(self, user_id: str, enabled: bool, revision: int) -> None:
        """Record one settings change (from NOTIFY, or from this process's own update) unless
        a newer one (a larger ``revision``) was recorded already: they arrive in any order."""
        if revision <= max(self._opted_out.get(user_id, -1), self._opted_in.get(user_id, -1)):
            return
        self._changes_during_read[user_id] = (enabled, revision)
        if enabled:
            self._opted_out.pop(user_id, None)
            self._opted_in[user_id] = revision
        else:
            self._opted_in.pop(user_id, None)
            self._opted_out[user_id] = revision

    def apply_switch(self, enabled: bool, revision: int) -> None:
        """Record a change of the stored global switch unless a newer one was recorded."""
        if revision > self._switch[1]:
            self._switch = (enabled, revision)

    @property
    def size(self) -> int:
        return len(self._opted_out)

    # -- keeping it current -------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the whole set; changes recorded while reading are applied on top where
        newer than what was read. A user read as opted in (no revision to compare) but opted
        out by such a change stays opted out: the change may have come after the read."""
        self._changes_during_read = {}
        started = time.monotonic()
        opted_out = await self._pg.opted_out_users()
        opted_in = {}
        for user_id, (enabled, revision) in self._changes_during_read.items():
            if revision <= opted_out.get(user_id, -1):
                continue
            if enabled:
                opted_out.pop(user_id, None)
                opted_in[user_id] = revision
            else:
                opted_out[user_id] = revision
        self._opted_out, self._opted_in = opted_out, opted_in
        self.apply_switch(*await self._pg.personalization_switch())
        erased = await self._pg.erasures(since=datetime.now(UTC) - ERASURE_MEMORY)
        for digest, at in erased.items():
            self._erased[digest] = max(at, self._erased.get(digest, 0.0))
        self._confirmed_at = started

    async def _listen(self) -> None:
        """LISTEN, anew if the connection was lost (a terminated backend, an idle timeout on
        the way): the re-read that follows covers what was announced meanwhile."""
        if self._listener is not None and self._listener.lost:
            log.warning("the LISTEN connection to PostgreSQL was lost; listening again")
            await self._stop_listening()
        if self._listener is None:
            self._listener = await self._pg.listen_settings(self._on_message)

    async def _stop_listening(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.stop()
            self._listener = None

    async def start(self) -> None:
        try:
            await self._listen()
            await self.refresh()
        except StoreUnavailable as exc:
            log.error("opt-out state unconfirmed, failing closed: %s", exc)
        self._task = asyncio.create_task(self._run(), name="optout-refresh")

    async def _run(self) -> None:
        # ended by the flag as well as the cancellation, which a timing-out store call on
        # Python 3.11 can turn into StoreUnavailable (see App._every)
        while not self._closing:
            await asyncio.sleep(self._refresh_s)
            try:
                await self._listen()
                await self.refresh()
            except StoreUnavailable as exc:
                await self._stop_listening()
                level = logging.WARNING if self.fresh else logging.ERROR
                log.log(level, "opt-out refresh failed (fresh=%s): %s", self.fresh, exc)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_listening()
