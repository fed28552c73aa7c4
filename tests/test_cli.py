"""The ``privrank`` commands as cron and operators run them: real processes, real stores."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc import aio

from features.postgres import PgStore
from ranking import snapshot
from server.api import privrank_pb2 as pb
from server.api import privrank_pb2_grpc as rpc
from server.config import Config
from tests.conftest import ROOT, cli_env, privrank, with_database
from tests.serving import CLI, free_port, serve_process, start_serve, terminate, wait_serving

SCOPE = "cli"


def _write_csv(path: Path, rows: list[str], header: str = "user,item,ts,kind") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def imported(config: Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Interactions imported through the CLI into the ``cli`` scope, and one nightly run."""
    privrank(
        config,
        "synth",
        "--users",
        "150",
        "--items",
        "90",
        "--events",
        "4000",
        "--scope",
        SCOPE,
        "--seed",
        "5",
    )
    path = tmp_path_factory.mktemp("csv") / "extra.tsv"
    # users of its own: a user ID is one person in every scope, and other tests erase some
    # synthetic ones (whose earlier events are then never stored again)
    rows = [f"cli-u{n}\ti{n % 7}\t2026-01-0{1 + n % 9}T10:00:00Z\tclick" for n in range(40)]
    _write_csv(path, rows, header="user\titem\tts\tkind")
    result = privrank(
        config,
        "import",
        "interactions",
        str(path),
        "--scope",
        SCOPE,
        "--user-col",
        "user",
        "--item-col",
        "item",
        "--time-col",
        "ts",
        "--event-col",
        "kind",
        "--sep",
        "\\t",
    )
    assert "imported 40 events" in result.stdout
    privrank(config, "jobs", "nightly", "--scope", SCOPE)
    return SCOPE


def test_migrate_is_idempotent(config: Config) -> None:
    privrank(config, "db", "migrate")
    assert "up to date" in privrank(config, "db", "migrate").stdout


def test_token_is_minted_with_the_configured_key(config: Config) -> None:
    from server.auth import Role, verify_token

    token = privrank(config, "token", "--role", "user", "--subject", "u1", "--ttl", "60")
    principal = verify_token(token.stdout.strip(), config.signing_keys(), "privrank")
    assert principal.subject == "u1"
    assert principal.role is Role.USER
    refused = privrank(config, "token", "--role", "user", check=False)
    assert refused.returncode != 0
    assert "--subject" in refused.stderr


async def test_import_rejects_a_bad_file_whole(config: Config, pg: PgStore, tmp_path: Path) -> None:
    good = [f"u{n},i{n},{1_700_000_000 + n},view" for n in range(5)]
    cases = {
        "pii.csv": [*good, "jane@example.com,i1,1700000000,view"],
        "time.csv": [*good, "u1,i1,yesterday,view"],
        "type.csv": [*good, "u1,i1,1700000000,teleport"],
        "ragged.csv": [*good, "u1,i1,1700000000,view,5"],  # 5 fields, not 4
    }
    for name, rows in cases.items():
        path = _write_csv(tmp_path / name, rows)
        result = privrank(
            config,
            "import",
            "interactions",
            str(path),
            "--scope",
            "badfile",
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "ts",
            "--event-col",
            "kind",
            check=False,
        )
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("privrank: error:"), last
        assert f"{name} line 7" in last, last
    missing = _write_csv(tmp_path / "cols.csv", good, header="a,b,c,d")
    result = privrank(
        config, "import", "interactions", str(missing), "--scope", "badfile", check=False
    )
    assert result.returncode == 1
    assert "no column 'user_id'" in result.stderr
    assert "badfile" not in await pg.scopes()


async def test_import_takes_tsv_from_the_name_and_requires_named_columns(
    config: Config, pg: PgStore, tmp_path: Path
) -> None:
    """No --sep for a .tsv; a 0 rating stays 0; a --value-col the file lacks is refused."""
    rows = ["u1\ti1\t0\t1700000000", "u1\ti2\t4\t1700000000"]
    tsv = _write_csv(tmp_path / "ratings.tsv", rows, header="user_id\titem_id\tvalue\ttimestamp")
    result = privrank(config, "import", "interactions", str(tsv), "--scope", "tsv")
    assert "imported 2 events" in result.stdout
    pairs = await pg.training_pairs("tsv")
    assert dict(zip(pairs.item_ids.tolist(), pairs.strength.tolist(), strict=True)) == {
        "i1": 0.0,
        "i2": 4.0,
    }
    views = _write_csv(
        tmp_path / "views.csv", ["u1,i1,1700000000"], header="user_id,item_id,timestamp"
    )
    for flag in ("--value-col", "--event-col"):
        refused = privrank(
            config,
            "import",
            "interactions",
            str(views),
            "--scope",
            "named",
            flag,
            "stars",
            check=False,
        )
        assert refused.returncode == 1
        assert (
            refused.stderr.strip()
            .splitlines()[-1]
            .startswith("privrank: error: views.csv: no column 'stars'")
        ), refused.stderr
    assert "named" not in await pg.scopes()


@pytest.mark.parametrize(
    ("command", "variable"),
    [("serve", "listen"), ("serve", "metrics_listen"), ("demo", "listen")],
)
def test_a_busy_port_fails_in_one_line_before_any_store_starts(
    config: Config, tmp_path: Path, command: str, variable: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        embedded = dataclasses.replace(
            config,
            database_url=None,
            redis_url=None,
            data_dir=tmp_path / "data",
            **{"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", variable: busy},
        )
        result = privrank(embedded, command, check=False)
    assert result.returncode == 1
    assert (
        result.stderr == f"privrank: error: PRIVRANK_{variable.upper()}: {busy} is already in use\n"
    )
    assert not (tmp_path / "data" / "postgres").exists(), "the embedded PostgreSQL was started"


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("a log level logging does not know", ("token", "--role", "service")),
        ("a data dir that is a file", ("token", "--role", "service")),
        ("TLS files gone", ("healthcheck", "--target", "127.0.0.1:1")),
    ],
)
def test_a_bad_setting_or_path_fails_in_one_line_not_a_traceback(
    tmp_path: Path, case: str, args: tuple[str, ...]
) -> None:
    (tmp_path / "a-file").write_text("")
    settings: dict[str, dict[str, object]] = {
        "a log level logging does not know": {"log_level": "verbose"},
        "a data dir that is a file": {"data_dir": tmp_path / "a-file"},
        "TLS files gone": {
            "tls_cert_file": tmp_path / "gone.pem",
            "tls_key_file": tmp_path / "gone.key",
        },
    }
    config = dataclasses.replace(Config(data_dir=tmp_path / "data"), **settings[case])
    result = privrank(config, *args, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("privrank: error:"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


async def test_a_stale_postmaster_pid_of_a_reused_pid_is_not_taken_for_a_running_server(
    tmp_path: Path,
) -> None:
    """After a crash, postmaster.pid names a pid another process has since (a restarted
    container): the embedded PostgreSQL starts again, where pgserver took that process for
    the server and handed out the URI of a socket nobody listened on."""
    from server import embedded

    root = tmp_path / "data"
    root.mkdir()
    with embedded.embedded_postgres(root) as url:
        connection = await asyncpg.connect(url)
        await connection.close()
        pid_file = (root / "postgres" / "postmaster.pid").resolve()
        stale = pid_file.read_text().splitlines()
    assert not pid_file.exists()
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text("\n".join([str(other.pid), *stale[1:]]) + "\n")
        with embedded.embedded_postgres(root) as url:
            connection = await asyncpg.connect(url, timeout=10)
            assert await connection.fetchval("SELECT 1") == 1
            await connection.close()
    finally:
        other.kill()
        other.wait()


def test_the_embedded_postgresql_starts_without_platformdirs_warnings(
    config: Config, tmp_path: Path
) -> None:
    """Without XDG_RUNTIME_DIR (cron, containers) pgserver's import made platformdirs warn
    on stderr, two lines before anything else."""
    embedded = dataclasses.replace(config, database_url=None, data_dir=tmp_path / "data")
    env = {**cli_env(embedded), "PYTHONWARNINGS": "default"}
    env.pop("XDG_RUNTIME_DIR", None)
    result = subprocess.run(
        [*CLI, "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "applied:" in result.stdout
    assert "XDG_RUNTIME_DIR" not in result.stderr, result.stderr
    assert "platformdirs" not in result.stderr, result.stderr


def test_job_steps_run_alone_and_via_python_m_jobs(config: Config, imported: str) -> None:
    for step in ("refresh-features", "train", "precompute", "evaluate", "cleanup"):
        started, *summaries = privrank(
            config, "jobs", step, "--scope", imported
        ).stdout.splitlines()
        assert started.startswith("started run ")
        assert summaries[0].startswith(f"{step} [{imported}]")
        if step == "precompute":  # where its time went, for whoever reads the job's runs
            assert re.search(
                r"overlapped: ranking [\d.]+s, Redis [\d.]+s, ranks table [\d.]+s", summaries[0]
            ), summaries[0]
    # train alone also publishes what it trained
    assert summaries_of(privrank(config, "jobs", "train", "--scope", imported)) == [
        "train",
        "build",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "evaluate", "--scope", imported],
        env=cli_env(config),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "privrank ndcg@10=" in result.stdout


def summaries_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The steps whose summaries a ``jobs`` command printed, in order."""
    return [line.split(" ")[0] for line in result.stdout.splitlines()[1:]]


def test_failed_step_exits_non_zero_with_one_line(config: Config) -> None:
    result = privrank(config, "jobs", "build", "--scope", "never-trained", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("privrank: error: build [never-")


def test_a_failed_nightly_prints_the_other_summaries_and_still_cleans_up(config: Config) -> None:
    result = privrank(config, "jobs", "nightly", "--scope", "nothing-to-train", check=False)
    assert result.returncode == 1
    assert summaries_of(result) == ["refresh-features", "cleanup"]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("privrank: error: train [nothing-to-train]: no positive interactions")
    )


async def test_a_second_concurrent_nightly_refuses(
    config: Config, pg: PgStore, imported: str
) -> None:
    async with pg.job_lock():
        result = await asyncio.to_thread(privrank, config, "jobs", "nightly", check=False)
    assert result.returncode == 75
    assert "another privrank job run is in progress" in result.stderr


async def test_killing_a_run_midway_keeps_the_previous_snapshot(
    config: Config, pg: PgStore, imported: str
) -> None:
    root = config.snapshot_dir
    before = snapshot.current_version(root, imported)
    assert before is not None
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs", "nightly", "--scope", imported],
        env=cli_env(config),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(r.name == "train" and r.status == "running" for r in await pg.job_runs(5)):
            assert process.poll() is None, "the run ended before train started"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert snapshot.current_version(root, imported) == before
    assert snapshot.load_current(root, imported).version == before
    # the next run takes the lock at once and records the killed run as interrupted
    await asyncio.to_thread(privrank, config, "jobs", "build", "--scope", imported)
    runs = await pg.job_runs(10)
    assert any(r.status == "failed" and "interrupted" in r.detail for r in runs)


async def test_serve_drains_in_flight_calls_on_sigterm(
    config: Config, imported: str, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = cli_env(config) | {
        "PRIVRANK_LISTEN": f"127.0.0.1:{port}",
        "PRIVRANK_SHUTDOWN_DELAY_S": "1",
        "PRIVRANK_MAX_QUEUED_RPCS": "1000",  # the 300 calls below arrive at once:
        "PRIVRANK_MAX_PENDING_RPCS": "1000",  # neither admission nor gRPC core sheds them
        "PRIVRANK_SHUTDOWN_GRACE_S": "20",
    }
    process = start_serve(env, log_path)
    try:
        await wait_serving(port, process, log_path)
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            token = privrank(config, "token", "--role", "service").stdout.strip()
            stub = rpc.RankingStub(channel)
            metadata = [("authorization", f"Bearer {token}")]

            async def call(n: int) -> grpc.StatusCode:
                try:
                    await stub.Recommend(
                        pb.RecommendRequest(user_id=f"u{n % 150}", scope=SCOPE, limit=50),
                        metadata=metadata,
                        timeout=10,
                    )
                except aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            calls = [asyncio.create_task(call(n)) for n in range(300)]
            await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            codes = await asyncio.gather(*calls)
        exit_code = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert exit_code == 0
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert codes.count(grpc.StatusCode.OK) > 0
    log = log_path.read_text()
    assert log.index("NOT_SERVING") < log.index("draining"), log
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(aio.AioRpcError) as err:
            await rpc.RankingStub(channel).Recommend(
                pb.RecommendRequest(user_id="u1"), metadata=metadata, timeout=2
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_serve_without_a_snapshot_is_alive_but_not_ready_until_one_is_published(
    config: Config, imported: str, tmp_path: Path
) -> None:
    """A new deployment: `healthcheck` fails (not ready) while `healthcheck --live` passes,
    until a snapshot is published; the snapshot poll then makes it SERVING."""
    port, log_path = free_port(), tmp_path / "serve.log"
    empty = dataclasses.replace(
        config,
        data_dir=tmp_path / "data",
        listen=f"127.0.0.1:{port}",
        snapshot_poll_s=0.5,
        shutdown_delay_s=0.0,
    )
    with serve_process(cli_env(empty), log_path) as process:
        deadline = time.monotonic() + 120
        while "NOT_SERVING: no snapshot published yet" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        probe = ("healthcheck", "--target", empty.listen)
        assert privrank(empty, *probe, "--live").returncode == 0
        assert privrank(empty, *probe, check=False).returncode == 1
        shutil.copytree(config.snapshot_dir, empty.snapshot_dir)
        await wait_serving(port, process, log_path)
        assert privrank(empty, *probe).returncode == 0
        exit_code = await terminate(process)
    assert exit_code == 0


async def test_serve_starts_on_its_snapshots_while_postgresql_is_down(
    config: Config, imported: str, tmp_path: Path
) -> None:
    """A restart during a PostgreSQL outage comes back: SERVING on the snapshots on disk,
    non-personalized (the opt-outs cannot be confirmed), and it stops cleanly."""
    port, log_path = free_port(), tmp_path / "serve.log"
    env = cli_env(config) | {
        "PRIVRANK_LISTEN": f"127.0.0.1:{port}",
        "PRIVRANK_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/privrank",
        "PRIVRANK_SHUTDOWN_DELAY_S": "0",
    }
    with serve_process(env, log_path) as process:
        await wait_serving(port, process, log_path)
        token = privrank(config, "token", "--role", "service").stdout.strip()
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await rpc.RankingStub(channel).Recommend(
                pb.RecommendRequest(user_id="u1", scope=imported, limit=10),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        exit_code = await terminate(process)
    assert len(reply.items) == 10
    assert reply.source == pb.SOURCE_POPULAR
    assert exit_code == 0
    assert "starting without PostgreSQL" in log_path.read_text()


def test_serve_fails_fast_on_a_database_that_refuses(config: Config, pg_url: str) -> None:
    """Reached but refused (here: no such database) is a setting to fix, not an outage."""
    missing = with_database(pg_url, "privrank_no_such_database")
    env = cli_env(config) | {"PRIVRANK_DATABASE_URL": missing, "PRIVRANK_LISTEN": "127.0.0.1:0"}
    result = subprocess.run(
        [*CLI, "serve"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "privrank: error: PostgreSQL: InvalidCatalogNameError" in result.stderr
