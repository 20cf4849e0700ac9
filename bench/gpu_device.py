"""The GPU check's device and clock: peak FLOP/s by device, the timing context each part runs in, and how a
part survives running out of memory (``bench/gpu.py``)."""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/gpu.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


from bench_machine import alternate, cpu_model, git_commit, log  # noqa: E402


# Peak dense bf16 tensor FLOP/s by device name, first match wins (so the PCIe and NVL parts precede the plain
# name, which ``get_device_name`` gives the SXM part: "NVIDIA H100 80GB HBM3"). Vendor datasheets, without sparsity.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
]

# ---------------------------------------------------------------- the device and the clock


def peak_for_name(name: str) -> tuple[float, str] | None:
    """(peak dense bf16 TFLOP/s, the table's key) of a device named as ``torch.cuda.get_device_name`` names it."""
    return next(((value, key) for key, value in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from); None where unknown (a CPU, a GPU not in the table)."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU: MFU is null"
    name = torch.cuda.get_device_name(device)
    found = peak_for_name(name)
    if found is None:
        return None, f"{name} is not in PEAK_BF16_TFLOPS: give --peak-tflops"
    return found[0], f"table ({found[1]})"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "cpu": cpu_model(),
            "logical_cores": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "commit": git_commit(), "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30,
                    multiprocessors=props.multi_processor_count,
                    sdpa_flash_enabled=torch.backends.cuda.flash_sdp_enabled())
    else:
        info["name"] = cpu_model()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


@dataclass
class Context:
    device: torch.device
    quick: bool
    compile: bool
    peak: float | None
    work: Path
    """Scratch directory for files a part writes: outside --out (a run cut short leaves nothing large there),
    removed at the end."""
    deadline: float = math.inf
    """time.monotonic() by which the current part should stop timing more rounds."""

    def synced(self, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn`` followed by waiting for the device: a timer around it then sees the kernels it queued."""
        if self.device.type != "cuda":
            return fn

        def run() -> object:
            out = fn()
            torch.cuda.synchronize(self.device)
            return out

        return run

    def left(self) -> float:
        return self.deadline - time.monotonic()


def rounds(ctx: Context, fns: dict[str, Callable[[], object]], *, warmup: int, iters: int) -> dict[str, list[float]]:
    """``bench_machine.alternate`` one round at a time, stopping after the first timed round once the part's
    deadline has passed. Seconds per call, the device waited for."""
    fns = {k: ctx.synced(fn) for k, fn in fns.items()}
    alternate(fns, warmup, 0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, ts in alternate(fns, 0, 1).items():
            times[k] += ts
        if ctx.left() <= 0:
            break
    return times


def free_device() -> None:
    """Drop compiled graphs (they hold their models) and cached blocks: each part starts with the device empty."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_smaller_batches(run: Callable[[int], dict], batch: int, floor: int = 1) -> dict:
    """``run(batch)``, halving the batch after running out of device memory (down to ``floor``); the result
    records the batch that ran and how many halvings it took."""
    halvings = 0
    while True:
        out_of_memory = False
        try:
            result = run(batch)
            result.update(batch=batch, oom_halvings=halvings)
            return result
        except torch.cuda.OutOfMemoryError:
            if batch <= floor:
                raise
            out_of_memory = True  # freed outside the handler: the traceback holds the failed run's tensors
        if out_of_memory:
            log(f"  out of device memory at batch {batch}: trying {batch // 2}")
            batch, halvings = batch // 2, halvings + 1
            free_device()


