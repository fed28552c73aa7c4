"""Shared by the benchmark scripts: what machine and libraries a run measured on."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numba
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> list[str]:
    """Lines describing the run: versions, CPU, BLAS environment and threads."""
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores",
    ]
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(f"load average at start (1, 5, 15 min): {load} (other work skews timings)")
    except OSError:
        pass
    names = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    blas_env = {name: os.environ[name] for name in names if name in os.environ}
    lines.append(f"BLAS environment: {blas_env or 'OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset'}")
    try:
        from threadpoolctl import threadpool_info  # optional: not a dependency
    except ImportError:
        lines.append("threadpoolctl not importable: BLAS threads and core type not shown")
    else:
        for pool in threadpool_info():
            lines.append(
                f"{pool.get('user_api')}: {pool.get('internal_api')} {pool.get('version')}, "
                f"{pool.get('num_threads')} threads, core type {pool.get('architecture')}"
            )
    return lines


def verdict(ok: bool, detail: str) -> str:
    return f"HIT  ({detail})" if ok else f"MISS ({detail})"
