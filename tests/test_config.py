"""The one Config: read from PRIVRANK_* once, refusing bad values with the key named."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.errors import ConfigError
from server.config import Config, grpc_experiments, load_or_create_secret
from server.threads import usable_cores


def test_defaults_are_valid() -> None:
    config = Config.from_env({})
    assert config.workers == 1
    assert config.concurrent_rpc_cap > config.max_active_rpcs + config.max_queued_rpcs
    raised = Config.from_env({"PRIVRANK_MAX_QUEUED_RPCS": "1000"})
    assert raised.concurrent_rpc_cap > raised.max_active_rpcs + raised.max_queued_rpcs


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PRIVRANK_WORKERS": "0"}, "PRIVRANK_WORKERS"),
        ({"PRIVRANK_WORKERS": "two"}, "PRIVRANK_WORKERS"),
        ({"PRIVRANK_LISTEN": "nowhere"}, "PRIVRANK_LISTEN"),
        ({"PRIVRANK_MAX_CONCURRENT_RPCS": "-1"}, "PRIVRANK_MAX_CONCURRENT_RPCS"),
        ({"PRIVRANK_MAX_PENDING_RPCS": "-1"}, "PRIVRANK_MAX_PENDING_RPCS"),
        ({"PRIVRANK_MAX_CONNECTIONS": "0"}, "PRIVRANK_MAX_CONNECTIONS"),
        ({"PRIVRANK_MAX_CONNECTION_IDLE_S": "-1"}, "PRIVRANK_MAX_CONNECTION_IDLE_S"),
        ({"PRIVRANK_MAX_CONNECTION_AGE_S": "-0.5"}, "PRIVRANK_MAX_CONNECTION_AGE_S"),
        ({"PRIVRANK_GRPC_TRANSPORT": "h3"}, "PRIVRANK_GRPC_TRANSPORT"),
        ({"PRIVRANK_GRPC_THREADS_NICE": "20"}, "PRIVRANK_GRPC_THREADS_NICE"),
        ({"PRIVRANK_GRPC_THREADS_NICE": "-1"}, "PRIVRANK_GRPC_THREADS_NICE"),
        ({"PRIVRANK_KERNEL_THREADS": "-1"}, "PRIVRANK_KERNEL_THREADS"),
        ({"PRIVRANK_REDIS_KEY_PREFIX": "app*:"}, "PRIVRANK_REDIS_KEY_PREFIX"),  # a glob
        ({"PRIVRANK_REDIS_KEY_PREFIX": "my app:"}, "PRIVRANK_REDIS_KEY_PREFIX"),
        ({"PRIVRANK_REDIS_KEY_PREFIX": "p" * 65}, "PRIVRANK_REDIS_KEY_PREFIX"),
        ({"PRIVRANK_SNAPSHOT_POLL_S": "0"}, "PRIVRANK_SNAPSHOT_POLL_S"),  # a reload loop
        ({"PRIVRANK_SHUTDOWN_GRACE_S": "-1"}, "PRIVRANK_SHUTDOWN_GRACE_S"),
        ({"PRIVRANK_RANKS_RETENTION_H": "-24"}, "PRIVRANK_RANKS_RETENTION_H"),
        ({"PRIVRANK_OFFLOAD_MIN_WORK": "-1"}, "PRIVRANK_OFFLOAD_MIN_WORK"),
        ({"PRIVRANK_LOG_LEVEL": "verbose"}, "PRIVRANK_LOG_LEVEL"),  # logging's own: a traceback
        # NaN passes every `<= 0` check: a staleness bound of NaN would never be fresh
        ({"PRIVRANK_OPTOUT_MAX_STALENESS_S": "nan"}, "PRIVRANK_OPTOUT_MAX_STALENESS_S: .*finite"),
        ({"PRIVRANK_DEFAULT_DEADLINE_S": "inf"}, "PRIVRANK_DEFAULT_DEADLINE_S: .*finite"),
        ({"PRIVRANK_REDIS_TIMEOUT_S": "-nan"}, "PRIVRANK_REDIS_TIMEOUT_S: .*finite"),
        (
            {"PRIVRANK_MAX_CONCURRENT_RPCS": "100", "PRIVRANK_MAX_QUEUED_RPCS": "92"},
            "must exceed",
        ),
    ],
)
def test_bad_values_fail_fast_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


@pytest.mark.parametrize(
    ("setting", "workers", "cores", "threads"),
    [
        ("0", "1", 1, 1),  # a worker with one core keeps one, for large requests
        ("0", "1", 2, 1),
        ("0", "2", 2, 1),
        ("0", "1", 4, 3),
        ("0", "1", 8, 7),
        ("0", "2", 8, 3),
        ("3", "1", 1, 3),  # a setting is taken as it is
    ],
)
def test_kernel_threads_follow_the_cores_each_worker_may_use(
    setting: str, workers: str, cores: int, threads: int
) -> None:
    config = Config.from_env({"PRIVRANK_KERNEL_THREADS": setting, "PRIVRANK_WORKERS": workers})
    assert config.kernel_thread_count(cores) == threads


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("max 100000", None), ("50000 100000", 1), ("100000 100000", 1), ("not a quota", None)],
)
def test_usable_cores_follow_a_cgroup_cpu_quota(
    tmp_path: Path, cpu_max: str, cores: int | None
) -> None:
    """A quota caps the cores (rounded up); no quota, or one unreadable, leaves the affinity."""
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "cpu.max") == (cores or affinity)
    assert usable_cores(tmp_path / "missing") == affinity
    (tmp_path / "cpu.max").write_text(f"{150000 * affinity} 100000\n")  # 1.5 x the cores
    assert usable_cores(tmp_path / "cpu.max") == affinity


def test_usable_cores_follow_the_cpu_affinity() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    pinned = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from server.threads import usable_cores; print(usable_cores())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert pinned.stdout.strip() == "1"


@pytest.mark.parametrize(
    ("experiments", "transport", "chosen"),
    [
        ("", "ph2", "ph2_server"),
        ("", "chttp2", "-ph2_server"),
        ("-event_engine_listener", "ph2", "-event_engine_listener,ph2_server"),
        (" ", "ph2", "ph2_server"),
        # gRPC's own setting of the experiment wins, either way
        ("a, -ph2_server", "ph2", None),
        ("ph2_server", "chttp2", None),
        # left for Config.validate to refuse
        ("", "h3", None),
    ],
)
def test_the_grpc_transport_becomes_a_grpc_experiment(
    experiments: str, transport: str, chosen: str | None
) -> None:
    assert grpc_experiments(experiments, transport) == chosen


def _experiments_after(code: str, **env: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; what it prints, then GRPC_EXPERIMENTS as it stands."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k != "GRPC_EXPERIMENTS" and not k.startswith("PRIVRANK_")
    }
    script = f"{code}; import os; print(os.environ.get('GRPC_EXPERIMENTS'))"
    return subprocess.run(
        [sys.executable, "-c", script],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()


RUNNING = "from server.config import running_grpc_transport as r; print(r())"


def test_importing_the_server_package_chooses_the_transport_before_grpc_starts() -> None:
    assert _experiments_after(f"import server; {RUNNING}") == ["chttp2", "-ph2_server"]
    ph2 = _experiments_after(f"import server.app; {RUNNING}", PRIVRANK_GRPC_TRANSPORT="ph2")
    assert ph2 == ["ph2", "ph2_server"]
    # too late once grpc is imported (gRPC has read its experiments): left alone, and said
    late = _experiments_after(f"import grpc, server; {RUNNING}", PRIVRANK_GRPC_TRANSPORT="ph2")
    assert late == ["chttp2", "None"]


def _secret_at(data_dir: str, start: float) -> str:
    """In a child process: the signing key of ``data_dir``, read from ``start`` (unix s) on."""
    while time.time() < start:
        pass
    try:
        return load_or_create_secret(Path(data_dir))
    except Exception as exc:  # what the losing process got
        return f"raised {exc!r}"


def test_processes_starting_together_on_a_new_data_dir_share_one_secret(tmp_path: Path) -> None:
    """``serve --workers`` on a new data dir: every worker reads the key as the first creates
    it. The loser of exists-then-create got FileExistsError (its worker died at start-up) or
    read the file before it was written (and refused every token)."""
    permissions = set()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for trial in range(40):
            data_dir = tmp_path / f"d{trial}"
            keys = pool.starmap(_secret_at, [(str(data_dir), time.time() + 0.02)] * 2)
            assert len(set(keys)) == 1, keys
            assert len(keys[0]) >= 32, keys
            assert [p.name for p in data_dir.iterdir()] == ["auth_secret"]
            permissions.add(stat.S_IMODE((data_dir / "auth_secret").stat().st_mode))
    assert permissions == {0o600}
