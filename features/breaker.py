"""A circuit breaker for a backing store, so a dead dependency costs no timeout per request.

    closed ──(N consecutive failures)──▶ open ──(cooldown)──▶ half-open
       ▲                                   ▲                      │ one probe call
       └────────────(probe succeeds)───────┴──(probe fails)───────┘

While open, calls fail at once with ``StoreUnavailable``; after the cooldown one call is let
through as a probe, and its outcome closes or re-opens the breaker. Single event loop: no lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from features.errors import StoreUnavailable

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, name: str, *, failures: int = 5, cooldown_s: float = 1.0) -> None:
        self.name = name
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if time.monotonic() - self._opened_at >= self._cooldown_s and not self._probing:
            return "half-open"
        return "open"

    def _allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open":
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("%s is back: circuit closed", self.name)
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self._threshold):
            if self._opened_at is None:
                log.warning("%s failing: circuit open for %.1fs", self.name, self._cooldown_s)
            self._opened_at = time.monotonic()
        self._probing = False

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run the block if the circuit allows; count StoreUnavailable (and timeouts) as
        failures. Other errors (bad input) say nothing about the store's health."""
        if not self._allow():
            raise StoreUnavailable(f"{self.name} unavailable (circuit open)")
        try:
            yield
        except (StoreUnavailable, TimeoutError):
            self.record_failure()
            raise
        except BaseException:
            self._probing = False
            raise
        self.record_success()
