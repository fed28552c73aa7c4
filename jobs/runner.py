"""Runs job steps under the job lock, recording each run and its outcome in ``job_runs``."""

from __future__ import annotations

import logging
import time

from features.errors import JobError, PrivrankError
from jobs.steps import NIGHTLY, STEPS, JobContext

log = logging.getLogger(__name__)

JOB_NAMES: tuple[str, ...] = ("nightly", *STEPS)


async def run_job(ctx: JobContext, job: str, scopes: list[str] | None = None) -> list[str]:
    """Run ``job`` (a step name or ``nightly``) for each scope (default: every scope with data).

    Returns one summary line per step. Raises JobLocked if another run is in progress, and
    JobError naming the step and scope if any step failed; a scope whose step failed skips
    its remaining steps, the other scopes still run, and the last published snapshot and
    cache keep serving.
    """
    if job not in JOB_NAMES:
        raise JobError(f"unknown job {job!r}; one of: {', '.join(JOB_NAMES)}")
    steps = NIGHTLY if job == "nightly" else (job,)
    summaries: list[str] = []
    failures: list[str] = []
    async with ctx.pg.job_lock():
        targets = scopes or await ctx.pg.scopes()
        if not targets:
            raise JobError("no data yet: import interactions or run `privrank synth` first")
        for scope in targets:
            for step in steps:
                run_id = await ctx.pg.start_run(step, scope)
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
                    continue
                await ctx.pg.finish_run(run_id, ok=False, detail=reason)
                failures.append(reason)
                break
    if failures:
        raise JobError("; ".join(failures))
    return summaries
