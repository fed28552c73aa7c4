"""privrank report: a self-contained page with the stored evaluations and, when a server
answers, its online figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobs.report import Online, render
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
