"""How a server process shares its cores (Linux; elsewhere nothing happens): the scheduling
priority of gRPC core's own threads, and how many cores the process may use."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

# the names gRPC core gives its threads: the event engine's pool, timers, executors
GRPC_THREAD_PREFIXES = ("event_engine", "grpc_")
# cgroup v2: "<quota> <period>" in microseconds, or "max <period>" for no limit
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def threads(pid: int | None = None) -> Iterator[tuple[int, str]]:
    """(thread id, name) of each thread of process ``pid`` (default: this one), from /proc;
    nothing where there is no /proc. Threads that end meanwhile are left out."""
    task = Path(f"/proc/{'self' if pid is None else pid}/task")
    try:
        tids = os.listdir(task)
    except OSError:
        return
    for tid in tids:
        try:
            yield int(tid), (task / tid / "comm").read_text().strip()
        except OSError:
            continue


def lower_grpc_threads(nice: int) -> int:
    """Give every gRPC core thread of this process niceness ``nice`` (0-19) where it has less;
    returns how many were changed. The threads come and go with load (new ones inherit the
    niceness of the thread that starts them, mostly one of gRPC's), so call it now and then.

    Why: where the event loop and gRPC's threads share a core, each arriving call otherwise
    wakes a gRPC thread that preempts the loop, and at 3x capacity that per-call switching
    took a quarter of the core. At a lower priority they wait for the loop's time slice to
    end and then read, parse and shed the calls that arrived meanwhile in one go."""
    changed = 0
    for tid, name in threads():
        if not name.startswith(GRPC_THREAD_PREFIXES):
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        except OSError:  # the thread ended meanwhile
            continue
    return changed


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets), capped by its
    cgroup's CPU quota (``cpu.max``, as a container's CPU limit sets it), rounded up; >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or no quota file in it
        pass
    return max(cores, 1)
