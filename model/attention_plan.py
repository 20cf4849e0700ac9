"""How training computes attention: chosen by timing on the machine at hand.

Two kernels compute a training forward's causal attention (``ATTENTION_KERNELS``): torch's
``scaled_dot_product_attention`` ("library", the decoder's own ``ScaledDotProduct``) and ``blocked_attention``
("blocked": products, then an fp32 softmax, a block of queries at a time; ``model.kernels.BlockedAttention``).
Which is faster depends on the CPU and the precision: on a CPU with AVX512-BF16 but no AMX, the library's bf16
path was no faster than its fp32 one while the blocked kernel's bf16 products ran at twice the fp32 speed, so
blocked cut bf16 attention by a third or more there; in fp32 the two were within noise. No constant decides:
``attention_plan`` times one layer's attention, forward and backward, for each kernel on the run's shape (rows,
length, heads, packed or not) in its precision, interleaved so that load from other processes falls on both, and
puts the faster in the place of each block's attention module (``use_attention``: a module swap,
``model/swap.py``); a resumed run keeps the kernel it started with. Timings are remembered per decoder in a weak
map (forgotten with the model). The kernels are timed as the run will call them: eagerly, or, for a run under
``--compile``, each through torch.compile (inductor fuses the blocked kernel's masking and softmax, the library
kernel is one call either way), because eager timings can rank the two the other way round from what the
compiled step runs at.

Only CPUs are timed: on a GPU the library kernel (flash or memory-efficient attention) is kept. The blocked
kernel keeps each block's softmax for the backward pass, about (rows × heads × length² / 2) values per layer,
so it is a candidate only up to ``BLOCKED_MAX_LEN`` tokens. ``EARLYFUSION_ATTENTION`` set to a kernel's name
pins the choice, for reproducible timings and tests.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from earlyfusion.core.runtime import autocast
from earlyfusion.model.decoder import Decoder, ScaledDotProduct
from earlyfusion.model.masks import causal_mask
from earlyfusion.model.kernels import BlockedAttention, blocked_attention
from earlyfusion.model.swap import swap_modules

# kernel name -> the module that computes a forward's attention without a KV cache with it
ATTENTION_KERNELS: dict[str, type[nn.Module]] = {"library": ScaledDotProduct, "blocked": BlockedAttention}
PIN_ENV = "EARLYFUSION_ATTENTION"
BLOCKED_MAX_LEN = 2048
WARMUP = 2  # untimed calls per kernel
ROUNDS = 7  # timed calls per kernel, one per round


@dataclass(frozen=True)
class AttentionPlan:
    kernel: str
    """One of ``ATTENTION_KERNELS``."""
    ms: dict[str, float] | None = None
    """Median milliseconds of one layer's attention, forward and backward, per kernel timed (None: not timed)."""
    why: str = ""

    def describe(self) -> str:
        if self.ms:
            timed = ", ".join(f"{k} {t:.1f}" for k, t in self.ms.items())
            return f"{self.kernel} (one layer's attention forward + backward, ms: {timed})"
        return f"{self.kernel} ({self.why})"


def _check(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")


def use_attention(decoder: nn.Module, kernel: str) -> None:
    """Compute the attention of ``decoder``'s forward passes without a KV cache with ``kernel`` ("library" or
    "blocked"): each attention module of another kernel is replaced by one of this kernel (they hold no weights).
    Decoding with a cache always uses the library kernel. A compiled forward recompiles once for a change."""
    _check(kernel)
    kind = ATTENTION_KERNELS[kernel]
    swap_modules(decoder, lambda m: type(m) in ATTENTION_KERNELS.values() and type(m) is not kind,
                  lambda m: kind().train(m.training))


def attention_kernel(decoder: nn.Module) -> str:
    """The name of the kernel ``decoder``'s attention modules compute with (ValueError when they differ)."""
    names = {name for m in decoder.modules() for name, kind in ATTENTION_KERNELS.items() if type(m) is kind}
    if len(names) != 1:
        raise ValueError(f"the decoder's attention modules use {sorted(names) or 'no known'} kernel(s), not one")
    return names.pop()


def _pinned() -> str | None:
    want = os.environ.get(PIN_ENV, "").strip()
    if not want:
        return None
    if want not in ATTENTION_KERNELS:
        raise ValueError(f"{PIN_ENV}={want!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    return want


# decoder -> (shape, precision, compile, threads) -> the plan timed for it; weak: forgotten with the model
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, AttentionPlan]] = weakref.WeakKeyDictionary()


def time_kernels(rows: int, length: int, n_heads: int, n_kv_heads: int, head_dim: int, *, precision: str,
                 packed: bool, compile: bool = False, device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds of one attention layer's forward + backward for each kernel, on random inputs of this shape
    (``packed``: rows of two documents each, masked like packed training rows) under ``precision``'s autocast;
    ``compile``: each kernel through torch.compile (compiled before it is timed), as a ``--compile`` run calls it.
    Where compiling fails, the kernels are timed eagerly (the run's own compile then reports the failure)."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(rows, heads, length, head_dim, generator=g).to(device, dtype).requires_grad_()

    q, k, v = rand(n_heads), rand(n_kv_heads), rand(n_kv_heads)
    grad = torch.randn(rows, n_heads, length, head_dim, generator=g).to(device, dtype)
    mask = None
    if packed:
        doc_ids = (torch.arange(length, device=device) >= length // 2).long().expand(rows, length)
        mask = causal_mask(rows, length, 0, torch.device(device), doc_ids=doc_ids)

    def library(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=n_heads != n_kv_heads)

    eager = {"library": library, "blocked": blocked_attention}
    kernels = eager

    def run(fn) -> float:
        t0 = time.perf_counter()
        with autocast(precision, torch.device(device).type):
            out = fn(q, k, v, mask)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - t0

    if compile:
        try:
            kernels = {name: torch.compile(fn, dynamic=False) for name, fn in kernels.items()}
            for fn in kernels.values():
                run(fn)  # compiles
        except Exception:  # noqa: BLE001 - no compiler here: the run's own compile says so to the user
            kernels = eager
    for fn in kernels.values():
        for _ in range(WARMUP):
            run(fn)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(ROUNDS):
        for name, fn in kernels.items():
            times[name].append(run(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_plan(decoder: Decoder, rows: int, length: int, *, precision: str, packed: bool,
                   compile: bool = False, kernel: str | None = None) -> AttentionPlan:
    """Choose the attention kernel for training forwards of ``rows`` × ``length`` tokens under ``precision`` ("bf16"
    or "no"), compiled (``compile``) or eager, put it in ``decoder`` (``use_attention``) and return the plan; the
    timing is remembered for the decoder.
    ``kernel``: the kernel a resumed run started with, kept so that it continues exactly (None: choose)."""
    device = next(decoder.parameters()).device
    if kernel is not None:
        _check(kernel)
        plan = AttentionPlan(kernel, why="the kernel this run started with")
    elif (pinned := _pinned()) is not None:
        plan = AttentionPlan(pinned, why=f"{PIN_ENV}={pinned}")
    elif device.type != "cpu":
        plan = AttentionPlan("library", why=f"the library's kernels on {device.type}")
    elif length > BLOCKED_MAX_LEN:
        plan = AttentionPlan("library", why=f"sequences of {length} tokens are longer than the blocked kernel's "
                                            f"{BLOCKED_MAX_LEN}")
    else:
        plans = _PLANS.setdefault(decoder, {})
        key = (rows, length, precision, packed, compile, torch.get_num_threads())
        if key not in plans:
            c = decoder.config
            medians = time_kernels(rows, length, c.n_heads, c.n_kv_heads, c.head_dim, precision=precision,
                                   packed=packed, compile=compile, device=device)
            plans[key] = AttentionPlan(min(medians, key=medians.get), {n: t * 1e3 for n, t in medians.items()})
        plan = plans[key]
    use_attention(decoder, plan.kernel)
    return plan
