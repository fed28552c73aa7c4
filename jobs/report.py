"""``privrank report``: a self-contained HTML page of ranking quality and service health.

Offline metrics come from the stored evaluations (every model version of each scope); online
figures from a running server if one answers (Admin.GetMetrics, and its Prometheus latency
histogram). Plots are matplotlib SVG inlined into the page, so it opens anywhere, offline.
"""

from __future__ import annotations

import html
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

KS = (5, 10, 20)
NAN = float("nan")  # a metric an older evaluation did not record: a gap, not a zero


@dataclass(frozen=True)
class Online:
    """What a running server reported, or why nothing was."""

    figures: Mapping[str, float]
    served_by_source: Mapping[str, int]
    latency_buckets: Sequence[tuple[float, float]]  # (upper bound in seconds, cumulative count)
    note: str = ""


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _by_version(evaluations: Sequence[Mapping[str, Any]], model: str) -> list[Mapping[str, Any]]:
    rows = [e for e in evaluations if e["model"] == model]
    return sorted(rows, key=lambda e: e["evaluated_at"])


def _versions_plot(evaluations: Sequence[Mapping[str, Any]], scope: str) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for model, style in (("privrank", "-o"), ("popularity", "--x")):
        rows = _by_version(evaluations, model)
        labels = [r["model_version"][:15] for r in rows]
        for k in KS:
            left.plot(
                labels,
                [r["metrics"].get(f"ndcg@{k}", NAN) for r in rows],
                style,
                label=f"{model} NDCG@{k}",
            )
        if model == "privrank":
            right.plot(
                labels,
                [r["metrics"].get("coverage@10", NAN) for r in rows],
                "-o",
                label="coverage@10",
            )
            right.plot(
                labels,
                [r["metrics"].get("popularity_bias@10", NAN) for r in rows],
                "-s",
                label="popularity bias@10",
            )
            right.plot(
                labels,
                [r["metrics"].get("diversity@10", NAN) for r in rows],
                "-^",
                label="diversity@10",
            )
    left.set_title(f"{scope}: NDCG@K across model versions")
    right.set_title(f"{scope}: coverage, popularity bias, diversity")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30, labelsize=7)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    return _svg(figure)


def _latency_plot(buckets: Sequence[tuple[float, float]]) -> str:
    bounds = [b for b, _ in buckets]
    counts = [c for _, c in buckets]
    per_bucket = [counts[0], *(b - a for a, b in itertools.pairwise(counts))]
    labels = [f"≤{b * 1000:g} ms" if b != float("inf") else "more" for b in bounds]
    figure, axis = plt.subplots(figsize=(11, 3))
    axis.bar(labels, per_bucket)
    axis.set_title("Latency of ranking RPCs (since the server started)")
    axis.tick_params(axis="x", rotation=30, labelsize=7)
    axis.grid(alpha=0.3, axis="y")
    return _svg(figure)


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>No evaluations stored yet: run <code>privrank jobs evaluate</code>.</p>"
    keys = sorted(
        {k for r in rows for k in r["metrics"]},
        key=lambda k: (k.split("@")[0], int(k.split("@")[1])),
    )
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for r in rows:
        cells = "".join(f"<td>{r['metrics'].get(k, float('nan')):.4f}</td>" for k in keys)
        body.append(
            f"<tr><td>{html.escape(r['model_version'])}</td><td>{html.escape(r['model'])}</td>"
            f"<td>{r['users_evaluated']}</td>{cells}</tr>"
        )
    return (
        f"<table><tr><th>model version</th><th>model</th><th>users</th>{head}</tr>"
        + "".join(body)
        + "</table>"
    )


def _variants(evaluations: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per scope with A/B variants, the newest evaluation of each (labelled privrank/<name>)
    beside the control's (privrank)."""
    tables = []
    for scope, rows in sorted(evaluations.items()):
        newest: dict[str, Mapping[str, Any]] = {}
        for row in sorted(rows, key=lambda e: e["evaluated_at"]):
            if row["model"] == "privrank" or row["model"].startswith("privrank/"):
                newest[row["model"]] = row
        if any(label.startswith("privrank/") for label in newest):
            rows_shown = [newest[label] for label in sorted(newest)]
            tables.append(f"<h3>Scope {html.escape(scope)}</h3>{_table(rows_shown)}")
    if not tables:
        return "<p>No A/B variants are configured, so there is nothing to compare yet.</p>"
    return "".join(tables)


def render(evaluations: Mapping[str, Sequence[Mapping[str, Any]]], online: Online) -> str:
    """The whole page. ``evaluations``: scope → stored evaluations (any order)."""
    sections = []
    for scope, rows in sorted(evaluations.items()):
        ordered = sorted(rows, key=lambda e: (e["evaluated_at"], e["model"]))
        plot = _versions_plot(ordered, scope) if ordered else ""
        sections.append(f"<h2>Scope {html.escape(scope)}</h2>{plot}{_table(ordered)}")
    if online.figures:  # the server answered, whether or not it has ranked anything yet
        figures = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in online.figures.items()
        )
        rungs = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
            for k, v in sorted(online.served_by_source.items())
        )
        plot = _latency_plot(online.latency_buckets) if online.latency_buckets else ""
        health = (
            f"{plot}<table>{figures}</table><h3>Answers per ladder rung</h3><table>{rungs}</table>"
        )
    else:
        health = f"<p>{html.escape(online.note or 'No server answered.')}</p>"
    variants = _variants(evaluations)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>privrank report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }}
svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>privrank report</h1><p>Generated {generated}.</p>
<h2>Service health</h2>{health}
{"".join(sections)}
<h2>Variants</h2>{variants}
</body></html>
"""
