"""Runs job steps under the job lock, recording each run and its outcome in ``job_runs``."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from features.errors import JobError, PrivrankError
from jobs.steps import NIGHTLY, STEPS, JobContext

log = logging.getLogger(__name__)

# each job's steps, in order; a model is served only once build publishes it, so ``train``
# alone builds too
JOBS: dict[str, tuple[str, ...]] = {
    "nightly": NIGHTLY,
    **{step: (step,) for step in STEPS},
    "train": ("train", "build"),
}
JOB_NAMES: tuple[str, ...] = tuple(JOBS)
# retention and erasure pruning run even after an earlier step of the scope failed
ALWAYS = frozenset({"cleanup"})

_STARTED = re.compile(r"started run (\d+):")


def started_line(run_id: int, step: str, scope: str) -> str:
    """The line the ``jobs`` command prints first, naming the id of its first step's run."""
    return f"started run {run_id}: {step} [{scope}]"


def started_run_id(line: str) -> int | None:
    """The run id of a ``started_line``, or None if ``line`` is not one."""
    match = _STARTED.match(line)
    return int(match[1]) if match else None


def _ignore(_: str) -> None:
    pass


async def run_job(
    ctx: JobContext,
    job: str,
    scopes: list[str] | None = None,
    *,
    on_started: Callable[[str], None] = _ignore,
    on_summary: Callable[[str], None] = _ignore,
) -> list[str]:
    """Run ``job`` (a name of JOBS) for each scope (default: every scope with data).

    Returns one summary line per step, each also passed to ``on_summary`` as it ends;
    ``on_started`` gets the ``started_line`` of the first step's run once the lock is held.
    Raises JobLocked if another run is in progress, and JobError naming the step and scope
    of each step that failed: a scope whose step failed skips its remaining steps but
    those of ALWAYS, the other scopes still run, and the last published snapshot and cache
    keep serving.
    """
    if job not in JOBS:
        raise JobError(f"unknown job {job!r}; one of: {', '.join(JOB_NAMES)}")
    summaries: list[str] = []
    failures: list[str] = []
    announced = False
    async with ctx.pg.job_lock() as lock:
        targets = scopes or await ctx.pg.scopes()
        if not targets:
            raise JobError("no data yet: import interactions or run `privrank synth` first")
        for scope in targets:
            failed = False
            for step in JOBS[job]:
                if failed and step not in ALWAYS:
                    continue
                try:  # a run that lost the lock with its connection must not go on
                    await lock.check()
                except JobError as exc:
                    raise JobError("; ".join([*failures, str(exc)])) from exc
                run_id = await ctx.pg.start_run(step, scope)
                if not announced:
                    on_started(started_line(run_id, step, scope))
                    announced = True
                started = time.monotonic()
                try:
                    detail = await STEPS[step](ctx, scope)
                except PrivrankError as exc:
                    reason = f"{step} [{scope}]: {exc}"
                except Exception as exc:
                    log.exception("job step %s failed for scope %s", step, scope)
                    reason = f"{step} [{scope}]: unexpected {type(exc).__name__}: {exc}"
                else:
                    took = time.monotonic() - started
                    await ctx.pg.finish_run(run_id, ok=True, detail=detail)
                    summaries.append(f"{step} [{scope}] {detail} ({took:.1f}s)")
                    log.info("%s", summaries[-1])
                    on_summary(summaries[-1])
                    continue
                await ctx.pg.finish_run(run_id, ok=False, detail=reason)
                failures.append(reason)
                failed = True
    if failures:
        raise JobError("; ".join(failures))
    return summaries
