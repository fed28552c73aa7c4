"""The servicers: parse and validate each request once at the edge, then call the core.

Validation failures raise ``InvalidInput`` naming the field; the error interceptor maps every
error to its status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc import aio

from features.errors import (
    EXIT_LOCKED,
    InvalidInput,
    JobError,
    JobLocked,
    NotFound,
    StoreUnavailable,
)
from features.postgres import UserSettingsRow
from features.schema import (
    FEATURE_NAMES,
    Interaction,
    context_segment,
    device_code,
    make_interaction,
    validate_id,
    validate_scope,
)
from jobs.runner import JOB_NAMES, started_run_id
from ranking.pipeline import Ranked
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.interceptors import current

if TYPE_CHECKING:
    from server.app import App

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_EXCLUDED = 10_000
MAX_CANDIDATES = 10_000
MAX_EVENTS = 1000
MAX_CLOCK_SKEW = timedelta(minutes=5)
FEEDBACK_WINDOW = timedelta(days=7)
_ANSWER_MARGIN_S = 0.05  # RunJob answers this long before its deadline at the latest


def _limit(value: int, *, default: int = DEFAULT_LIMIT) -> int:
    if value == 0:
        return default
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT} (0 means {default})")
    return value


def _ids(field: str, values: Sequence[str], cap: int) -> list[str]:
    if len(values) > cap:
        raise InvalidInput(f"{field} holds {len(values)} IDs; at most {cap} are accepted")
    return [validate_id(f"{field}[{n}]", v) for n, v in enumerate(values)]


def _reject_unknown_fields(where: str, message: Message) -> None:
    """Refuse fields this API does not define (e.g. from a client with another .proto):
    ingest accepts the allow-listed fields and nothing else."""
    fields = UnknownFieldSet(message)
    unknown = [fields[i].field_number for i in range(len(fields))]
    if unknown:
        numbers = ", ".join(str(n) for n in unknown)
        raise InvalidInput(f"{where}: field number {numbers} is not part of the privrank API")


def _segment(context: pb.EventContext) -> int:
    """The context segment of a request: its device and its local time of day."""
    if not -720 <= context.utc_offset_minutes <= 840:
        raise InvalidInput("context.utc_offset_minutes must be within -720..840")
    local = datetime.now(UTC) + timedelta(minutes=context.utc_offset_minutes)
    return context_segment(device_code(context.device_category), local.hour)


def _timestamp(when: datetime | None) -> Timestamp:
    stamp = Timestamp()
    if when is not None:
        stamp.FromDatetime(when.astimezone(UTC))
    return stamp


def _settings_message(row: UserSettingsRow) -> pb.UserSettings:
    """The settings as answered; ``updated_at`` unset for a user who never set any."""
    return pb.UserSettings(
        user_id=row.user_id,
        personalization_enabled=row.personalization_enabled,
        data_sharing_consent=row.data_sharing_consent,
        updated_at=None if row.updated_at is None else _timestamp(row.updated_at),
    )


def _ranked(answer: Ranked) -> pb.RankedItems:
    return pb.RankedItems(
        items=[
            pb.ScoredItem(item_id=i, score=s)
            for i, s in zip(answer.item_ids, answer.scores, strict=True)
        ],
        model_version=answer.model_version,
        source=f"SOURCE_{answer.source.name}",
        variant=answer.variant,
    )


class RankingService(rpc.RankingServicer):
    def __init__(self, app: App) -> None:
        self._app = app

    def _observed(self, method: str, scope: str, answer: Ranked) -> pb.RankedItems:
        self._app.metrics.observe_answer(
            method,
            scope,
            answer.source.name.lower(),
            answer.personalization_blocked,
            answer.variant,
        )
        return _ranked(answer)

    def _with_variant(self, event: Interaction) -> Interaction:
        """Stamp feedback with the variant its user is in, where the scope runs variants."""
        if not self._app.config.profile(event.scope).variants:
            return event
        return dataclasses.replace(
            event, variant=self._app.ranker.variant(event.scope, event.user_id)[0]
        )

    async def Recommend(
        self, request: pb.RecommendRequest, context: aio.ServicerContext
    ) -> pb.RankedItems:
        self._app.check_warm()
        user_id = validate_id("user_id", request.user_id)
        scope = validate_scope(request.scope)
        limit = _limit(request.limit)
        excluded = _ids("exclude_item_ids", request.exclude_item_ids, MAX_EXCLUDED)
        segment = _segment(request.context) if request.HasField("context") else None
        answer = await self._app.ranker.recommend(
            user_id, scope, limit, excluded, current().deadline, segment
        )
        return self._observed("Recommend", scope, answer)

    async def RankCandidates(
        self, request: pb.RankCandidatesRequest, context: aio.ServicerContext
    ) -> pb.RankedItems:
        self._app.check_warm()
        user_id = validate_id("user_id", request.user_id)
        scope = validate_scope(request.scope)
        candidates = _ids("candidate_item_ids", request.candidate_item_ids, MAX_CANDIDATES)
        if not candidates:
            raise InvalidInput("candidate_item_ids is required")
        limit = _limit(request.limit, default=0) if request.limit else 0
        answer = await self._app.ranker.rank_candidates(
            user_id, scope, candidates, limit, current().deadline
        )
        return self._observed("RankCandidates", scope, answer)

    async def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: aio.ServicerContext
    ) -> pb.RankedItems:
        self._app.check_warm()
        item_id = validate_id("item_id", request.item_id)
        scope = validate_scope(request.scope)
        answer = await self._app.ranker.similar_items(
            item_id, scope, _limit(request.limit), current().deadline
        )
        return self._observed("SimilarItems", scope, answer)

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        if not request.events:
            raise InvalidInput("events is required")
        if len(request.events) > MAX_EVENTS:
            raise InvalidInput(f"at most {MAX_EVENTS} events per call")
        _reject_unknown_fields("request", request)
        latest = datetime.now(UTC) + MAX_CLOCK_SKEW
        events = []
        for n, event in enumerate(request.events):
            where = f"events[{n}]"
            _reject_unknown_fields(where, event)
            _reject_unknown_fields(f"{where}.context", event.context)
            if event.event_type == pb.EVENT_TYPE_UNSPECIFIED or event.event_type not in (
                pb.EventType.values()
            ):
                raise InvalidInput(f"{where}: event_type is required")
            try:
                occurred = (
                    event.occurred_at.ToDatetime(tzinfo=UTC)
                    if event.HasField("occurred_at")
                    else None
                )
            except (ValueError, OverflowError):
                raise InvalidInput(f"{where}: occurred_at is not a valid timestamp") from None
            if occurred is not None and occurred > latest:
                raise InvalidInput(f"{where}: occurred_at lies in the future")
            ctx = event.context
            events.append(
                make_interaction(
                    scope=event.scope,
                    user_id=event.user_id,
                    item_id=event.item_id,
                    event_type=pb.EventType.Name(event.event_type).lower(),
                    value=event.value if event.HasField("value") else None,
                    occurred_at=occurred,
                    session_id=ctx.session_id,
                    device_category=ctx.device_category,
                    country=ctx.country_code,
                    utc_offset_minutes=ctx.utc_offset_minutes
                    if event.HasField("context")
                    else None,
                    where=where,
                )
            )
        events = [self._with_variant(e) for e in events]
        received_at = time.time()  # before the insert: an erasure that deletes them is later
        accepted = await self._app.pg.insert_events(events)
        await self._app.remember_recent(events, received_at)
        return pb.RecordEventsResponse(accepted=accepted)


class SettingsService(rpc.SettingsServicer):
    def __init__(self, app: App) -> None:
        self._app = app

    @staticmethod
    def _user(user_id: str) -> str:
        validated = validate_id("user_id", user_id)
        current().principal.check_subject(validated)
        return validated

    async def _settings(self, user_id: str) -> pb.UserSettings:
        return _settings_message(await self._app.pg.get_settings(user_id))

    async def GetSettings(
        self, request: pb.GetSettingsRequest, context: aio.ServicerContext
    ) -> pb.UserSettings:
        return await self._settings(self._user(request.user_id))

    async def UpdateSettings(
        self, request: pb.UpdateSettingsRequest, context: aio.ServicerContext
    ) -> pb.UserSettings:
        user_id = self._user(request.user_id)
        enabled = (
            request.personalization_enabled if request.HasField("personalization_enabled") else None
        )
        consent = request.data_sharing_consent if request.HasField("data_sharing_consent") else None
        row = await self._app.pg.update_settings(
            user_id, personalization_enabled=enabled, data_sharing_consent=consent
        )
        # this process is current at once; the others hear the NOTIFY
        self._app.optouts.apply(user_id, row.personalization_enabled, row.revision)
        if not row.personalization_enabled:
            await self._app.forget_cached(user_id)
        return _settings_message(row)

    async def ExportUserData(
        self, request: pb.ExportUserDataRequest, context: aio.ServicerContext
    ) -> pb.UserDataExport:
        user_id = self._user(request.user_id)
        held = await self._app.pg.export_user(user_id)
        cached = await self._app.cache.count_user(user_id)
        return pb.UserDataExport(
            settings=await self._settings(user_id),
            features=[
                pb.FeatureVector(
                    scope=f["scope"],
                    values={name: f["values"][name] for name in FEATURE_NAMES},
                    embedding=f["embedding"],
                    updated_at=_timestamp(f["updated_at"]),
                )
                for f in held["features"]
            ],
            event_counts=[
                pb.EventCount(scope=scope, event_type=kind.upper(), count=n)
                for scope, kind, n in held["event_counts"]
            ],
            cached_rankings=held["ranks"] + cached,
        )

    async def DeleteUserData(
        self, request: pb.DeleteUserDataRequest, context: aio.ServicerContext
    ) -> pb.DeletionReceipt:
        user_id = self._user(request.user_id)
        masked = self._app.ranker.holders(user_id)  # before this erasure masks them
        removed = await self._app.pg.delete_user(user_id)
        self._app.optouts.mark_erased(user_id)  # other processes hear it through NOTIFY
        try:
            removed["redis"] = await self._app.cache.delete_user(user_id)
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                "erased in PostgreSQL, but Redis could not be purged of the user's keys; "
                "retry DeleteUserData (it is idempotent)"
            ) from exc
        removed["snapshot"] = masked
        return pb.DeletionReceipt(
            user_id=user_id, removed=removed, deleted_at=_timestamp(datetime.now(UTC))
        )


class AdminService(rpc.AdminServicer):
    def __init__(self, app: App) -> None:
        self._app = app
        self._children: set[asyncio.Task[tuple[int, str]]] = set()

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: aio.ServicerContext
    ) -> pb.Metrics:
        scope = validate_scope(request.scope)
        stored = await self._app.pg.evaluations(scope)
        if not stored and scope not in self._app.ranker.loaded():
            raise InvalidInput(f"unknown scope {scope!r}: no snapshot loaded, nothing evaluated")
        figures = self._app.metrics.figures(scope)
        feedback = await self._app.pg.feedback_by_variant(
            scope, since=datetime.now(UTC) - FEEDBACK_WINDOW
        )
        return pb.Metrics(
            scope=scope,
            offline=[
                pb.OfflineEvaluation(
                    model_version=e["model_version"],
                    model=e["model"],
                    values=e["metrics"],
                    evaluated_at=_timestamp(e["evaluated_at"]),
                    users_evaluated=e["users_evaluated"],
                )
                for e in stored
            ],
            online=pb.OnlineMetrics(
                requests=figures.requests,
                latency_p50_ms=figures.p50_ms,
                latency_p95_ms=figures.p95_ms,
                latency_p99_ms=figures.p99_ms,
                cache_hit_rate=figures.cache_hit_rate,
                fallback_rate=figures.fallback_rate,
                opt_out_rate=figures.opt_out_rate,
                served_by_source=figures.served_by_source,
                served_by_variant=figures.served_by_variant,
                click_through_by_variant={
                    v: clicks / shown for v, (shown, clicks, _) in feedback.items() if shown
                },
                acceptance_by_variant={
                    v: accepted / shown for v, (shown, _, accepted) in feedback.items() if shown
                },
            ),
        )

    async def RunJob(self, request: pb.RunJobRequest, context: aio.ServicerContext) -> pb.JobRun:
        """Start the job in a process of its own and answer once it has recorded its first
        run (its run id), or when the deadline nears first (run id 0, as the job goes on
        starting). JobLocked (ABORTED) while another run holds the lock, the job's own
        reason (FAILED_PRECONDITION) if it ended before starting a run."""
        if request.name not in JOB_NAMES:
            raise InvalidInput(f"name must be one of: {', '.join(JOB_NAMES)}")
        args = [sys.executable, "-m", "jobs", request.name]
        if request.scope:
            args += ["--scope", validate_scope(request.scope)]
        # refuse at once while a run holds the lock; a job that takes it in between makes
        # this one's process exit EXIT_LOCKED, seen below
        async with self._app.pg.job_lock():
            pass
        started_at = datetime.now(UTC)
        process = await asyncio.create_subprocess_exec(
            *args,
            env=self._app.child_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        first_run: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._watch_job(request, process, first_run))
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        wait = current().deadline - time.monotonic() - _ANSWER_MARGIN_S
        try:
            run_id = await asyncio.wait_for(asyncio.shield(first_run), max(wait, 0.0))
        except TimeoutError:
            run_id = 0  # still starting (imports, migrations): ListJobRuns shows it soon
        if run_id is None:  # the process ended before starting a run: say why
            code, reason = await asyncio.shield(task)
            if code == EXIT_LOCKED:
                raise JobLocked(reason)
            raise JobError(reason)
        return pb.JobRun(
            run_id=run_id,
            name=request.name,
            scope=request.scope,
            status="started",
            started_at=_timestamp(started_at),
        )

    async def _watch_job(
        self,
        request: pb.RunJobRequest,
        process: asyncio.subprocess.Process,
        first_run: asyncio.Future[int | None],
    ) -> tuple[int, str]:
        """Reap a RunJob process: ``first_run`` gets the run id its first line names (None if
        it ended without one). A process that ended before starting a run is recorded as a
        failed run; after one that ran, the snapshots are reloaded. Returns (exit status,
        last line of stderr without the command's prefix)."""
        assert process.stdout is not None
        assert process.stderr is not None
        stdout = process.stdout

        async def read_stdout() -> None:
            first_run.set_result(started_run_id((await stdout.readline()).decode()))
            await stdout.read()

        _, err = await asyncio.gather(read_stdout(), process.stderr.read())
        code = await process.wait()
        lines = err.decode(errors="replace").strip().splitlines()
        reason = re.sub(r"^privrank: (error: )?", "", lines[-1] if lines else f"exited {code}")
        if code:
            log.error("job %s exited %s: %s", request.name, code, reason)
        if first_run.result() is None:
            run_id = await self._app.pg.start_run(request.name, request.scope)
            await self._app.pg.finish_run(run_id, ok=False, detail=reason)
        else:
            await self._app.reload_everywhere()  # every worker, not the one only
        return code, reason

    async def ListJobRuns(
        self, request: pb.ListJobRunsRequest, context: aio.ServicerContext
    ) -> pb.ListJobRunsResponse:
        limit = _limit(request.limit, default=20)
        runs = await self._app.pg.job_runs(limit)
        return pb.ListJobRunsResponse(
            runs=[
                pb.JobRun(
                    run_id=r.run_id,
                    name=r.name,
                    scope=r.scope,
                    status=r.status,
                    detail=r.detail,
                    started_at=_timestamp(r.started_at),
                    finished_at=_timestamp(r.finished_at),
                )
                for r in runs
            ]
        )

    async def Reload(
        self, request: pb.ReloadRequest, context: aio.ServicerContext
    ) -> pb.ReloadResponse:
        versions = await self._app.reload_everywhere()
        return pb.ReloadResponse(model_versions=versions)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: aio.ServicerContext
    ) -> pb.ModelInfo:
        loaded = self._app.ranker.loaded()
        if request.scope:
            scope = validate_scope(request.scope)
            if scope not in loaded:
                raise NotFound(f"scope {scope!r} has no loaded model")
            loaded = {scope: loaded[scope]}
        return pb.ModelInfo(
            scopes=[
                pb.ScopeModel(
                    scope=name,
                    model_version=ls.snapshot.version,
                    created_at=_timestamp(datetime.fromtimestamp(ls.snapshot.created_at, UTC)),
                    items=ls.snapshot.n_items,
                    users=ls.snapshot.n_users,
                    dimensions=ls.snapshot.dim,
                    retrieval=ls.retriever.name,
                )
                for name, ls in sorted(loaded.items())
            ],
            personalization_enabled=self._app.optouts.personalization_enabled,
        )

    async def SetFlags(self, request: pb.SetFlagsRequest, context: aio.ServicerContext) -> pb.Flags:
        if request.HasField("personalization_enabled"):
            await self._app.set_personalization(request.personalization_enabled)
            log.warning(
                "personalization globally %s by an admin%s",
                "enabled" if request.personalization_enabled else "disabled",
                ""
                if self._app.config.personalization_enabled
                else " (stays off in this process: PRIVRANK_PERSONALIZATION_ENABLED=false)",
            )
        return pb.Flags(personalization_enabled=self._app.optouts.personalization_enabled)
