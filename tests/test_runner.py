"""The job runner's composition of steps: what runs after a failure, what a scope without a
snapshot or with too little data reports, and what ``train`` alone publishes."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from features.cache import RECENT_ITEMS
from features.errors import JobError
from features.postgres import _JOB_LOCK_KEY
from features.schema import Interaction
from jobs import runner, steps
from jobs.runner import run_job
from jobs.steps import NIGHTLY, JobContext
from jobs.synth import generate
from ranking import snapshot
from tests.conftest import with_profiles


def _scope() -> str:
    return "r" + uuid.uuid4().hex[:8]


def _events(scope: str, kind: str = "click") -> list[Interaction]:
    """A small scope: user a over items i0..i7, then a newcomer b on new items j0, j1 (the
    newest): whatever is held out is of users or items the training part does not know."""
    start = datetime.now(UTC) - timedelta(days=2)
    picks = [("a", f"i{n}") for n in range(8)] + [("b", "j0"), ("b", "j1")]
    return [
        Interaction(
            scope=scope,
            user_id=user,
            item_id=item,
            event_type=kind,
            value=1.0,
            occurred_at=start + timedelta(hours=n),
        )
        for n, (user, item) in enumerate(picks)
    ]


async def test_a_small_scope_runs_the_nightly_and_reports_nothing_to_evaluate(
    seeded: JobContext,
) -> None:
    scope = _scope()
    await seeded.pg.insert_events(_events(scope))
    summaries = await run_job(seeded, "nightly", [scope])
    assert tuple(line.split(" ")[0] for line in summaries) == NIGHTLY
    assert (
        f"evaluate [{scope}] no held-out interactions of known users and items;"
        " nothing evaluated" in summaries[4]
    )


async def test_precompute_skips_a_scope_with_no_published_snapshot(seeded: JobContext) -> None:
    scope = _scope()
    await seeded.pg.insert_events(_events(scope))  # recorded, never built
    (summary,) = await run_job(seeded, "precompute", [scope])
    assert summary.startswith(f"precompute [{scope}] no published snapshot yet")


async def test_a_failed_step_skips_the_scopes_next_steps_but_cleanup_and_hides_no_summary(
    seeded: JobContext,
) -> None:
    broken, fine = _scope(), _scope()
    await seeded.pg.insert_events(_events(broken, kind="dismiss"))  # nothing to train on
    await seeded.pg.insert_events(_events(fine))
    reported: list[str] = []
    with pytest.raises(JobError, match=rf"^train \[{broken}\]: no positive interactions"):
        await run_job(seeded, "nightly", [broken, fine], on_summary=reported.append)
    steps = [line.split(" ")[:2] for line in reported]
    assert steps[:2] == [["refresh-features", f"[{broken}]"], ["cleanup", f"[{broken}]"]]
    assert tuple(step for step, _ in steps[2:]) == NIGHTLY
    runs = {(r.name, r.scope): r.status for r in await seeded.pg.job_runs(20)}
    assert runs[("train", broken)] == "failed"
    assert runs[("cleanup", broken)] == "succeeded"
    assert ("build", broken) not in runs


async def test_train_alone_publishes_what_it_trained(seeded: JobContext) -> None:
    scope = _scope()
    await seeded.pg.insert_events(_events(scope))
    started: list[str] = []
    summaries = await run_job(seeded, "train", [scope], on_started=started.append)
    assert [line.split(" ")[0] for line in summaries] == ["train", "build"]
    assert f"build [{scope}] published " in summaries[1]
    version = snapshot.current_version(seeded.config.snapshot_dir, scope)
    assert version is not None
    assert version in summaries[1]
    (line,) = started
    assert line.startswith("started run ")
    assert line.endswith(f": train [{scope}]")
    # build stays a job of its own
    (rebuilt,) = await run_job(seeded, "build", [scope])
    assert rebuilt.startswith(f"build [{scope}] published ")


async def test_an_evaluate_killed_between_its_labels_stores_none_of_them(
    seeded: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every label's metrics (privrank, popularity, the variants) are stored together, so a
    run killed midway adds nothing and its re-run adds what a clean run does."""
    pg = seeded.pg
    before = len(await pg.evaluations("default", limit=1000))
    await run_job(seeded, "evaluate", ["default"])
    clean = len(await pg.evaluations("default", limit=1000)) - before
    assert clean >= 2
    evaluate_rankings, calls = steps.evaluate_rankings, []

    def killed_at_the_second_label(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not caught as a step's failure: the process ends here
        return evaluate_rankings(*args, **kwargs)

    monkeypatch.setattr(steps, "evaluate_rankings", killed_at_the_second_label)
    with pytest.raises(KeyboardInterrupt):
        await run_job(seeded, "evaluate", ["default"])
    monkeypatch.undo()
    assert len(await pg.evaluations("default", limit=1000)) == before + clean
    await run_job(seeded, "evaluate", ["default"])
    assert len(await pg.evaluations("default", limit=1000)) == before + 2 * clean


async def test_a_run_that_lost_its_job_lock_stops_before_its_next_step(
    seeded: JobContext, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock's session ends mid-run (its backend terminated, as a PostgreSQL restart or a
    dropped connection would): the lock is gone, another run could take it, so this run
    runs no further step, cleanup included, and says why."""
    ran: list[str] = []
    admin = await asyncpg.connect(pg_url)

    async def loses_the_lock(ctx: JobContext, scope: str) -> str:
        ran.append("refresh-features")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND granted",
            _JOB_LOCK_KEY,
        )
        return "done"

    async def cleanup(ctx: JobContext, scope: str) -> str:
        ran.append("cleanup")
        return "done"

    monkeypatch.setitem(steps.STEPS, "refresh-features", loses_the_lock)
    monkeypatch.setitem(steps.STEPS, "cleanup", cleanup)
    monkeypatch.setitem(runner.JOBS, "lose-lock", ("refresh-features", "cleanup"))
    try:
        with pytest.raises(JobError, match="lost the job lock"):
            await run_job(seeded, "lose-lock", ["default"])
    finally:
        await admin.close()
    assert ran == ["refresh-features"]
    async with seeded.pg.job_lock():  # free for the next run
        pass


async def test_evaluate_with_nothing_before_the_cutoff_reports_it_and_fails_nothing(
    seeded: JobContext,
) -> None:
    """A learned scope whose events share one instant (a day-granular import): the cutoff is
    that instant and the training part is empty. Train and build manage; evaluate says it
    evaluated nothing, as for a scope too small to hold out, instead of failing the run."""
    scope = _scope()
    at = datetime.now(UTC) - timedelta(days=1)
    await seeded.pg.insert_events(
        [
            Interaction(
                scope=scope,
                user_id=f"{scope}-{user}",
                item_id=f"i{item}",
                event_type="click",
                value=1.0,
                occurred_at=at,
            )
            for user in ("a", "b", "c")
            for item in range(4)
        ]
    )
    await run_job(seeded, "train", [scope])
    (summary,) = await run_job(seeded, "evaluate", [scope])
    assert "nothing evaluated" in summary


async def test_precompute_stores_as_deep_as_a_diversifying_profile_re_ranks(
    seeded: JobContext, tmp_path: Path
) -> None:
    """Diversity re-ranks a profile's top ``candidates``: a cached ranking shallower than that
    (precompute's k, 100) would re-rank fewer than the live path does and answer otherwise."""
    scope = _scope()
    config = with_profiles(
        seeded.config, tmp_path, f"[{scope}]\ndiversity = 0.5\ncandidates = 150\n"
    )
    ctx = JobContext(config, seeded.pg, seeded.cache)
    await seeded.pg.insert_event_batches(
        [dataclasses.replace(e, user_id=f"{scope}-{e.user_id}") for e in batch]
        for batch in generate(users=20, items=400, events=600, scope=scope, seed=3)
    )
    await run_job(ctx, "train", [scope])
    await run_job(ctx, "precompute", [scope])
    snap = snapshot.load_current(config.snapshot_dir, scope)
    stored = await seeded.pg.ranks_page(scope, snap.version, after="", limit=5)
    assert stored
    for user, item_ids, *_ in stored:
        position = snap.user_position(user)
        assert position is not None
        rankable = snap.n_items - len(snap.seen(position))
        assert len(item_ids) == min(150 + RECENT_ITEMS, rankable)
        hit = await seeded.cache.get(scope, snap.version, user)
        assert hit is not None
        assert len(hit[0]) == len(item_ids)
