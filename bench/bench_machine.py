"""What the bench knows of the machine: timing helpers (alternating rounds, medians), CPU facts and load,
and the matmul / copy / matrix-vector ceilings every figure is compared with."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- an id layout (what the sampler needs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Run each function ``warmup`` times untimed, then ``iters`` timed rounds, alternating between them
    (so a burst of load from other processes falls on every side). Returns seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------- machine and ceilings


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` (from /proc/stat) while this process sleeps: the load
    other processes put on the machine."""

    def sample() -> tuple[int, int]:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def busy_processes(limit: int = 5) -> list[str]:
    """Other processes using CPU right now (``ps``), to say whether figures were taken under load."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    me = os.getpid()
    rows = []
    for line in out:
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[0]) != me and float(parts[1]) >= 10.0:
            rows.append(parts[2])
    return rows[:limit]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(threads: int) -> dict:
    import transformers

    from earlyfusion.core.runtime import cpu_bf16_features, cpu_has_fast_bf16

    return {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
        "cpu_bf16_features": cpu_bf16_features(), "fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "commit": git_commit(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


class MatmulCeiling:
    """An n×n @ n×n ``torch.mm`` in ``dtype`` (2n³ flops); ``rate(seconds)`` -> GFLOP/s."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32) -> None:
        self.n = n
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.out = torch.empty(n, n, dtype=dtype)
        self()  # warm-up

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def rate(self, seconds: float) -> float:
        return 2 * self.n ** 3 / seconds / 1e9


class CopyCeiling:
    """``dst.copy_(src)`` over a large fp32 tensor, ``times`` over; ``rate(seconds)`` -> GB/s (read + write)."""

    def __init__(self, megabytes: int = 256, times: int = 1) -> None:
        n = megabytes * 2 ** 20 // 4
        self.bytes, self.times = 2 * n * 4, times
        self.src, self.dst = torch.randn(n), torch.empty(n)
        self()  # warm-up, pages touched

    def __call__(self) -> None:
        for _ in range(self.times):
            self.dst.copy_(self.src)

    def rate(self, seconds: float) -> float:
        return self.bytes * self.times / seconds / 1e9


class MatvecCeiling:
    """``torch.mv`` of a large fp32 matrix (MKL's product; what an eager batch-1 decode step is made of);
    ``rate(seconds)`` -> GB/s of matrix bytes read: how fast MKL streams weights through it."""

    def __init__(self, megabytes: int = 256) -> None:
        n = int((megabytes * 2 ** 20 // 4) ** 0.5)
        self.bytes = n * n * 4
        self.w, self.x, self.out = torch.randn(n, n), torch.randn(n), torch.empty(n)
        self()

    def __call__(self) -> None:
        torch.mv(self.w, self.x, out=self.out)

    def rate(self, seconds: float) -> float:
        return self.bytes / seconds / 1e9


def matvec_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Best GB/s (matrix bytes read) of a large fp32 matrix-vector product."""
    mv = MatvecCeiling(megabytes)
    return mv.rate(min(timed(mv) for _ in range(repeats)))


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an n×n @ n×n ``torch.mm`` in ``dtype``."""
    mm = MatmulCeiling(n, dtype)
    return mm.rate(min(timed(mm) for _ in range(repeats)))


def copy_gbps(megabytes: int = 256, repeats: int = 5) -> float:
    """Best memory bandwidth of ``dst.copy_(src)`` over a large fp32 tensor, read + write bytes counted."""
    cp = CopyCeiling(megabytes)
    return cp.rate(min(timed(cp) for _ in range(repeats)))


# ---------------------------------------------------------------- models
