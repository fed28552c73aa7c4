"""privrank report: a self-contained page with the stored evaluations and, when a server
answers, its online figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobs.report import Online, render
from jobs.steps import JobContext
from server.api import privrank_pb2 as pb
from tests.conftest import Client, privrank


def _evaluation(version: str, model: str, ndcg: float, day: int) -> dict[str, object]:
    return {
        "model_version": version,
        "model": model,
        "metrics": {"ndcg@10": ndcg, "coverage@10": 0.5, "diversity@10": 0.4},
        "users_evaluated": 100,
        "evaluated_at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=day),
    }


def test_the_page_has_plots_tables_and_health() -> None:
    rows = [
        _evaluation("v1", "privrank", 0.21, 0),
        _evaluation("v1", "popularity", 0.1, 0),
        _evaluation("v2", "privrank", 0.25, 1),
    ]
    online = Online(
        {"latency p99 (ms)": 3.5},
        {"cached": 7, "live": 3},
        [(0.001, 2.0), (0.005, 9.0), (float("inf"), 10.0)],
    )
    page = render({"default": rows}, online)
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") == 2  # quality across versions, latency histogram
    assert "0.2500" in page
    assert "0.1000" in page
    assert "latency p99 (ms)" in page
    assert "cached" in page
    assert "http" not in page.split("<svg", 1)[0]  # no external assets before the plots


def test_the_cli_writes_a_report_even_without_a_server(client: Client, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = privrank(
        client.config,
        "report",
        "--out",
        str(out),
        "--server",
        "127.0.0.1:9",
        "--metrics",
        "127.0.0.1:9",
    )
    assert "server: not reachable" in result.stdout
    page = out.read_text()
    assert "Scope default" in page
    assert "ndcg@10" in page
    assert "No server answered" in page


def test_the_variants_section_shows_each_variant_beside_the_control() -> None:
    rows = [
        _evaluation("v1", "privrank", 0.20, 0),
        _evaluation("v1", "privrank/diverse", 0.23, 0),
        _evaluation("v1", "popularity", 0.10, 0),
    ]
    variants = render({"default": rows}, Online({}, {}, [])).split("<h2>Variants</h2>", 1)[1]
    assert "No A/B variants are configured" not in variants
    assert "privrank/diverse" in variants
    assert "0.2300" in variants
    assert "popularity" not in variants
    only_control = render({"default": rows[:1]}, Online({}, {}, []))
    assert "No A/B variants are configured" in only_control.split("<h2>Variants</h2>", 1)[1]


def test_a_server_that_has_ranked_nothing_yet_is_reported_as_answering() -> None:
    page = render({}, Online({"requests": 0.0}, {}, []))
    assert "No server answered" not in page
    assert "requests" in page


async def test_the_report_of_one_scope_asks_for_that_scopes_online_figures(
    client: Client, seeded: JobContext
) -> None:
    """``report --scope S``: the live figures are S's, beside S's evaluations (they were the
    default scope's; a deployment without one got none at all)."""
    from server.cli import _online

    await client.ranking.Recommend(pb.RecommendRequest(user_id="u1"), metadata=client.svc)
    metrics = client.app.metrics.serve_http("127.0.0.1:0")
    target, exposition = f"127.0.0.1:{client.port}", f"127.0.0.1:{metrics}"
    default = await _online(client.config, target, exposition)
    assert default.served_by_source  # the default scope has answered
    await seeded.pg.save_evaluations("report-only", "v1", [("privrank", {"ndcg@10": 0.1})], 1)
    other = await _online(client.config, target, exposition, scope="report-only")
    assert other.note == ""
    assert other.served_by_source == {}  # nothing served in that scope
