"""One interceptor around every call, in this order:

    refused while the server stops → request id and deadline budget → undecodable request
    refused → admission control → bearer token → Principal, checked against auth.POLICY →
    the handler; the error tree → gRPC status, and metrics, whatever happened

Unary handlers are wrapped; streaming methods are only the public health and reflection ones.
An unexpected exception becomes INTERNAL with a generic message and the request id; its details
go to the server log only. Each method's wrapped handler is made on its first call and reused,
so per call the interception costs a dictionary lookup plus the work above.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from features import errors
from server.auth import ANONYMOUS, PUBLIC_METHODS, Authorizer, Principal
from server.metrics import ServiceMetrics

log = logging.getLogger(__name__)

STATUS: dict[type[errors.PrivrankError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    # another run holds the lock: retry once it ends (gRPC's guide: a concurrency conflict,
    # retried at a higher level, is ABORTED)
    errors.JobLocked: grpc.StatusCode.ABORTED,
    errors.JobError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SnapshotError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(exc: errors.PrivrankError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True, slots=True)
class RequestScope:
    request_id: str
    deadline: float  # time.monotonic() value after which no new work starts
    principal: Principal = ANONYMOUS


_CURRENT: contextvars.ContextVar[RequestScope] = contextvars.ContextVar("privrank_request")


def current() -> RequestScope:
    """The scope of the request being handled (request id, deadline, principal)."""
    return _CURRENT.get()


Behavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


class _Undecodable:
    """Stands for a request that is not a valid message of its type (set by the deserializer
    and refused by the error interceptor, before any other code sees it)."""


UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns UNDECODABLE instead of raising: grpcio would otherwise
    answer UNKNOWN with the parser's message, before any interceptor could map it."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return UNDECODABLE

    return deserialize


# the budget of a call without a deadline of its own where the default would not do: RunJob
# answers once the job's own process has started and recorded its run (imports, migrations,
# the lock: seconds)
METHOD_BUDGETS_S = {"/privrank.v1.Admin/RunJob": 30.0}

OVERLOADED = "server at capacity; retry with backoff"
STOPPING = "server shutting down; retry on another"


class InFlight:
    """The calls being handled, and the switch that refuses new ones while the server stops.

    gRPC core's promise-based transport drops every connection, with its calls, as soon as the
    server stops (grpcio 1.85 has no graceful drain there: a call caught in it fails INTERNAL),
    so the server first refuses new calls (UNAVAILABLE, which clients retry on another server)
    and waits for these to finish, then for callers to go quiet. Health and reflection calls
    are neither counted nor refused."""

    def __init__(self) -> None:
        self.count = 0
        self.closing = False
        self.refused = 0  # calls refused while closing
        self.last_refused = -math.inf  # time.monotonic() of the last one
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def close(self, timeout_s: float, quiet_s: float = 0.0) -> int:
        """Refuse new calls from now on; wait up to ``timeout_s`` in all for the ones in flight,
        then until no call has been refused for ``quiet_s``. Returns how many still run."""
        self.closing = True
        self.last_refused = time.monotonic()  # what core holds reaches the refusal meanwhile
        deadline = self.last_refused + timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        while True:
            now = time.monotonic()
            wait = min(quiet_s - (now - self.last_refused), deadline - now)
            if wait <= 0:
                return self.count
            await asyncio.sleep(wait)


class Admission:
    """Admission control: at most ``active + queued`` calls are admitted at once, and at most
    ``active`` handlers run at once; a call beyond that is refused at once (RESOURCE_EXHAUSTED),
    so overload sheds load instead of slowing every call down. A call that waits longer than
    ``max_wait_s`` for a slot is refused too (the queue then holds at most that much work, and
    an answer that would come too late is not computed); one whose deadline passes while it
    waits is answered DEADLINE_EXCEEDED. Neither starts any work.

    Ranking handlers do their CPU work without awaiting, so waiting calls queue in the event
    loop rather than on a semaphore: a call registers on arrival and yields once, so every call
    that has arrived is counted before any of them does work.
    """

    def __init__(self, active: int, queued: int, max_wait_s: float = math.inf) -> None:
        self._slots = asyncio.Semaphore(active)
        self._limit = active + queued
        self._max_wait_s = max_wait_s
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def full(self) -> bool:
        """True while a new call would be refused."""
        return self._admitted >= self._limit

    @contextlib.asynccontextmanager
    async def admit(self, deadline: float) -> AsyncIterator[None]:
        if self._admitted >= self._limit:
            raise errors.Overloaded(OVERLOADED)
        self._admitted += 1
        try:
            await asyncio.sleep(0)  # let every call that has arrived register first
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded("deadline passed while waiting for capacity")
            if self._slots.locked():
                try:
                    await asyncio.wait_for(self._slots.acquire(), min(remaining, self._max_wait_s))
                except TimeoutError:
                    if remaining > self._max_wait_s:
                        raise errors.Overloaded(
                            f"queued over {self._max_wait_s:g}s; {OVERLOADED}"
                        ) from None
                    raise errors.DeadlineExceeded(
                        "deadline passed while waiting for capacity"
                    ) from None
            else:  # a free slot: take it without the task wait_for would create
                await self._slots.acquire()
            try:
                # woken in time but run only later (the loop was busy), or wait_for kept the
                # slot and swallowed the budget's cancellation (Python 3.11): no work now
                if time.monotonic() >= deadline:
                    raise errors.DeadlineExceeded("deadline passed while waiting for capacity")
                yield
            finally:
                self._slots.release()
        finally:
            self._admitted -= 1


class ServingInterceptor(aio.ServerInterceptor):
    def __init__(
        self,
        metrics: ServiceMetrics,
        default_deadline_s: float,
        admission: Admission | None,
        authorizer: Authorizer,
        in_flight: InFlight | None = None,
    ) -> None:
        self._metrics = metrics
        self._default_deadline_s = default_deadline_s
        self._admission = admission
        self._authorizer = authorizer
        self._in_flight = in_flight or InFlight()
        # per method: its wrapped handler, and the ones that refuse it when admission is full
        # and while the server stops (None for the public ones, which are never refused)
        self._handlers: dict[str, tuple[Any, Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        method = details.method
        handlers = self._handlers.get(method)
        if handlers is None:
            handler = await continuation(details)
            if handler is None:  # unknown method: not remembered, so no caller can grow the map
                return None
            refusable = method not in PUBLIC_METHODS and handler.unary_unary is not None
            handlers = self._handlers[method] = (
                self._wrap(method, handler),
                self._refusal(method, grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)
                if refusable
                else None,
                self._refusal(method, grpc.StatusCode.UNAVAILABLE, STOPPING, self._in_flight)
                if refusable
                else None,
            )
        wrapped, overloaded, stopping = handlers
        if stopping is not None and self._in_flight.closing:
            return stopping
        if overloaded is not None and self._admission is not None and self._admission.full:
            return overloaded
        return wrapped

    def _refusal(
        self, method: str, code: grpc.StatusCode, message: str, noted: InFlight | None = None
    ) -> Any:
        """A handler refusing ``method`` before its request is even parsed: under overload a
        refusal must cost far less than an answer. Each refusal is noted in ``noted``."""
        metrics = self._metrics

        async def refuse(request: bytes, context: aio.ServicerContext) -> None:
            if noted is not None:
                noted.refused += 1
                noted.last_refused = time.monotonic()
            metrics.observe_rpc(method, code.name, None)
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(refuse)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> Any:
        public = method in PUBLIC_METHODS
        if handler.unary_unary is None:
            # only the public health and reflection services stream; refuse any other
            return handler if public else None
        inner: Behavior = handler.unary_unary
        admission = None if public else self._admission
        in_flight = None if public else self._in_flight
        authorizer, metrics, default_budget = (
            self._authorizer,
            self._metrics,
            METHOD_BUDGETS_S.get(method, self._default_deadline_s),
        )

        async def authorized(
            request: Any, context: aio.ServicerContext, scope: RequestScope
        ) -> Any:
            if not public:
                authorization = ""
                for key, value in context.invocation_metadata() or ():
                    if key == "authorization" and isinstance(value, str):
                        authorization = value
                principal = authorizer.authorize(method, authorization)
                _CURRENT.set(RequestScope(scope.request_id, scope.deadline, principal))
            return await inner(request, context)

        async def behavior(request: Any, context: aio.ServicerContext) -> Any:
            started = time.monotonic()
            remaining = context.time_remaining()
            budget = default_budget if remaining is None else max(remaining, 0.0)
            scope = RequestScope(secrets.token_hex(8), started + budget)
            token = _CURRENT.set(scope)
            code = grpc.StatusCode.OK
            if in_flight is not None:
                in_flight.enter()
            try:
                if request is UNDECODABLE:
                    raise errors.InvalidInput(
                        "the request is not a valid message of this RPC's type"
                    )
                async with asyncio.timeout(budget):
                    if admission is None:
                        return await authorized(request, context, scope)
                    async with admission.admit(scope.deadline):
                        return await authorized(request, context, scope)
            except errors.PrivrankError as exc:
                code = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("request %s %s failed: %s", scope.request_id, method, exc)
                    await context.abort(code, f"internal error (request id {scope.request_id})")
                await context.abort(code, str(exc))
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, f"deadline of {budget:.3f}s exceeded")
            except aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client cancelled, or the server stops
                # or gRPC core ended the call at its deadline while the handler computed
                # without awaiting: a slow answer (counted and timed), not the caller's doing
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("request %s %s failed", scope.request_id, method)
                await context.abort(code, f"internal error (request id {scope.request_id})")
            finally:
                _CURRENT.reset(token)
                metrics.observe_rpc(method, code.name, time.monotonic() - started)
                if in_flight is not None:
                    in_flight.leave()

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
