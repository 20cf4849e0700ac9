"""How commands use the machine: one thread policy for every command.

Every command (training, tokenizer training, evaluation, sampling) uses every core for torch's intra-op
threads unless the user set ``OMP_NUM_THREADS`` (or a GPU does the work): ``use_all_cores()``. Sampling's
per-token steps may run on fewer (``intra_op_threads``), where ``model.decode_plan`` measured that faster.

Mixed precision (``--mixed-precision`` of every command that trains or samples): ``mixed_precision(choice)``
turns ``auto`` into bf16 autocast where the hardware computes bf16 products fast — a CUDA GPU with bf16, or a
CPU with AMX or AVX512-BF16 (``cpu_has_fast_bf16``) — and fp32 elsewhere: on other CPUs bf16 products are
emulated and slower than fp32. Weights, optimizer state, the quantizer and the losses stay fp32 either way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

# Set to 1 or 0 to override what ``cpu_has_fast_bf16`` detects (tests force both branches with it; a user can
# force bf16 on, or off, where the detection is wrong for their machine).
FAST_BF16_ENV = "EARLYFUSION_FAST_BF16"

MixedPrecision = Literal["auto", "no", "bf16"]


def use_all_cores() -> int:
    """Set torch's intra-op threads to this machine's core count, unless ``OMP_NUM_THREADS`` is set or a GPU
    is present; returns the thread count in effect."""
    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


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
