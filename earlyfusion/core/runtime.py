"""How commands use the machine: one thread policy for every command.

Every command (training, tokenizer training, evaluation, sampling) uses every core for torch's intra-op
threads unless the user set ``OMP_NUM_THREADS`` (or a GPU does the work): ``use_all_cores()``. Sampling's
per-token steps may run on fewer (``intra_op_threads``), where ``model.decode_plan`` measured that faster.

``use_all_cores()`` also keeps freed memory in the process (``keep_freed_memory``): a training step on a CPU
allocates and frees the same few hundred megabytes of activations and gradients every step, and with glibc's
defaults the larger blocks go back to the kernel when freed and come back page by page, as page faults, on the
next step (about 100 000 faults per step for the ``base`` decoder, 5-7 % of its step time).

Mixed precision (``--mixed-precision`` of every command that trains or samples): ``mixed_precision(choice)``
turns ``auto`` into bf16 autocast where the hardware computes bf16 products fast — a CUDA GPU with bf16, or a
CPU with AMX or AVX512-BF16 (``cpu_has_fast_bf16``) — and fp32 elsewhere: on other CPUs bf16 products are
emulated and slower than fp32. Weights, optimizer state, the quantizer and the losses stay fp32 either way.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

# Set to 1 or 0 to override what ``cpu_has_fast_bf16`` detects (tests force both branches with it; a user can
# force bf16 on, or off, where the detection is wrong for their machine).
FAST_BF16_ENV = "EARLYFUSION_FAST_BF16"

MixedPrecision = Literal["auto", "no", "bf16"]


# glibc's mallopt parameters and the largest mmap threshold it accepts on a 64-bit machine
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def use_all_cores() -> int:
    """Set torch's intra-op threads to this machine's core count, unless ``OMP_NUM_THREADS`` is set or a GPU
    is present, and keep freed memory in the process (``keep_freed_memory``); returns the thread count in
    effect."""
    keep_freed_memory()
    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to serve blocks up to 32 MiB from its heap and never give freed heap memory back
    to the kernel, so that memory a step frees is reused by the next step without page faults. The process
    keeps its peak heap size instead of shrinking between steps. A no-op (False) where the C library is not
    glibc or where ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``GLIBC_TUNABLES`` already set the
    policy (the user's choice wins)."""
    if any(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold is an int: the largest one means "never trim"
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_bf16_features() -> list[str]:
    """The CPU's bf16 matrix instructions that torch can use: a sublist of ["amx_bf16", "avx512_bf16"]."""
    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get is not None else {}
    return [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU: oneDNN is available and the CPU has AMX or
    AVX512-BF16. ``EARLYFUSION_FAST_BF16=1``/``0`` overrides the detection."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_bf16_features()) and torch.backends.mkldnn.is_available()


def mixed_precision(choice: MixedPrecision, device_type: str | None = None) -> tuple[str, str]:
    """("bf16" or "no", why) for ``--mixed-precision choice`` on ``device_type`` (default: cuda when present)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "no":
        return "no", "fp32 (--mixed-precision no)"
    if choice == "bf16":
        return "bf16", "bf16 autocast (--mixed-precision bf16)"
    if choice != "auto":
        raise ValueError(f"--mixed-precision {choice!r} is not one of auto, no, bf16")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16 autocast (auto: this GPU supports bf16)"
        return "no", "fp32 (auto: this GPU has no bf16)"
    if cpu_has_fast_bf16():
        forced = os.environ.get(FAST_BF16_ENV, "").strip() == "1"
        what = f"{FAST_BF16_ENV}=1" if forced else "this CPU has " + " and ".join(
            f.replace("_", "-").upper() for f in cpu_bf16_features())
        return "bf16", f"bf16 autocast (auto: {what})"
    return "no", "fp32 (auto: this CPU has no fast bf16 products; --mixed-precision bf16 forces it)"


def autocast(mode: str, device_type: str):
    """The context a forward pass runs in for ``mode`` ("bf16" or "no")."""
    if mode == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def intra_op_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
