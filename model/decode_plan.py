"""Which per-token decode step the sampler runs: chosen by timing on the machine at hand.

The fastest way to run one decode step depends on the CPU, the model's size, the batch and the precision:
on one machine splitting a product of a row or two across threads costs more in fork/join than it saves, on
another it pays; inductor's row-wise reductions (``model.compile.RowwiseLinear``) beat MKL's matrix-vector
products on some CPUs and lose to them at eight rows on others. So no constant decides. Candidates for a
batch of ``rows`` rows on a CPU:

* ``eager``: the decoder's own forward on every intra-op thread;
* ``eager-1``: the same on one thread (only when more than one is set);
* ``eager-rows``: the decoder's forward on every thread with each projection computed row by row
  (``RowLinear``), so that the rows' products run in parallel (only for several rows and threads;
  classifier-free guidance samples two rows per image);
* with ``compile``: ``compiled-rowwise`` (few-row products as reductions over the weight's rows,
  ``model.compile.RowwiseLinear``) and ``compiled-library`` (library products), both on every thread.

A plan is applied from outside the model: ``DecodePlan.stepping`` puts its projections in the place of the
decoder's ``nn.Linear``s (sharing their weights, ``model/swap.py``) for the steps and puts the originals back
afterwards.

The first time a (decoder, rows, compile, precision, threads) combination is sampled, ``decode_plan`` runs
each candidate for a few steps on a scratch KV cache — compiling the compiled ones — interleaved so that load
from other processes falls on all of them, and keeps the fastest median step (timed twice when it compiles,
each candidate keeping its faster median: in the pass that compiles, a newly compiled graph of a model that
already holds others can run slower than it does afterwards, enough to lose to eager); later calls reuse the choice,
remembered here per decoder in a weak map (forgotten with the model, or by ``forget_plans``). Eager is always a
candidate, so ``--compile`` is never slower than eager beyond timing noise. On a GPU nothing is timed: ``compile`` means the compiled step.

``EARLYFUSION_DECODE_STEP`` set to one of the mode names pins the choice (where it applies), for
reproducible timings and tests.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyfusion.core.runtime import intra_op_threads
from earlyfusion.model.compile import RowwiseLinear, compiled
from earlyfusion.model.swap import sharing, swapped

MODES = ("eager", "eager-1", "eager-rows", "compiled-rowwise", "compiled-library")
PIN_ENV = "EARLYFUSION_DECODE_STEP"
WARMUP_STEPS = 2  # per candidate, before timing (a compiled candidate compiles on its first)
TIMED_ROUNDS = 6  # timed steps per candidate, one per round
PREFILL = 8  # scratch prompt length


class RowLinear(nn.Linear):
    """An ``nn.Linear`` whose inference product of several one-token rows (a decode step) runs as one matrix-vector
    product per row, spread across threads, where the library's few-row matrix product costs about one
    matrix-vector product per row on one thread. Products with gradients or of several tokens per row are
    nn.Linear's. The arithmetic is the same either way."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1 and not torch.is_grad_enabled():
            return torch.bmm(x, self.weight.t().expand(x.shape[0], *self.weight.shape[::-1]))  # (rows, 1, out)
        return F.linear(x, self.weight, self.bias)


# the projections each mode computes with, in the place of the decoder's nn.Linears (None: the decoder's own)
PRODUCTS: dict[str, type[nn.Linear] | None] = {"eager": None, "eager-1": None, "eager-rows": RowLinear,
                                               "compiled-rowwise": RowwiseLinear, "compiled-library": None}


@dataclass(frozen=True)
class DecodePlan:
    mode: str
    """One of ``MODES``."""
    threads: int
    """Intra-op threads the per-token steps run on."""
    step_ms: dict[str, float] | None = None
    """Median milliseconds per step of each candidate timed (None when nothing was timed)."""

    @property
    def compiled(self) -> bool:
        return self.mode.startswith("compiled")

    @contextmanager
    def stepping(self, decoder: nn.Module) -> Iterator[Callable]:
        """The callable for one step (the decoder, or its compiled step), run on the plan's threads with the plan's
        projections in the place of the decoder's ``nn.Linear``s; afterwards the caller's thread count and the
        decoder's own modules come back, also when a step fails."""
        products = PRODUCTS[self.mode]
        swaps = swapped(decoder, _is_linear, lambda lin: sharing(products, lin)) if products else nullcontext()
        with intra_op_threads(self.threads), swaps:
            yield compiled(decoder, dynamic=True) if self.compiled else decoder

    def describe(self) -> str:
        timed = ""
        if self.step_ms:
            timed = " (ms per step: " + ", ".join(f"{m} {t:.2f}" for m, t in self.step_ms.items()) + ")"
        return f"{self.mode} on {self.threads} thread(s){timed}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def candidates(device_type: str, compile: bool, threads: int, rows: int) -> list[DecodePlan]:
    """The plans worth timing for this device, ``compile`` setting, thread count and batch of ``rows`` rows."""
    if device_type != "cpu":
        return [DecodePlan("compiled-library" if compile else "eager", threads)]
    out = [DecodePlan("eager", threads)]
    if threads > 1:
        out.append(DecodePlan("eager-1", 1))
        if rows > 1:
            out.append(DecodePlan("eager-rows", threads))
    if compile:
        out += [DecodePlan("compiled-rowwise", threads), DecodePlan("compiled-library", threads)]
    return out


def _pinned(options: list[DecodePlan]) -> DecodePlan | None:
    want = os.environ.get(PIN_ENV, "").strip()
    if not want:
        return None
    if want not in MODES:
        raise ValueError(f"{PIN_ENV}={want!r} is not one of {', '.join(MODES)}")
    return next((p for p in options if p.mode == want), None)


def _key(rows: int, compile: bool, device: torch.device) -> tuple:
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return rows, compile, str(amp), torch.get_num_threads(), str(device)


@torch.no_grad()
def time_plans(decoder: nn.Module, rows: int, plans: list[DecodePlan]) -> dict[str, float]:
    """Median seconds per decode step of each plan, measured on a scratch cache of ``rows`` rows."""
    device = next(decoder.parameters()).device
    steps = len(plans) * (WARMUP_STEPS + TIMED_ROUNDS)
    context = int(decoder.config.max_seq_len)
    prefill = min(PREFILL, context)
    cache = decoder.new_cache(rows, max_len=prefill + steps + 1)
    token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # id 0 exists in every vocabulary; its cost is any id's
    decoder(token.expand(rows, prefill), positions=torch.arange(prefill, device=device).expand(rows, prefill), cache=cache)

    def step(plan: DecodePlan) -> float:
        # each timed step runs inside its own plan's ``stepping`` (the candidates share the decoder, whose
        # projections it swaps), entered outside the timer;
        # positions wrap inside the model's context (a short-context model still times as many steps)
        pos = torch.full((rows, 1), cache.length % context, dtype=torch.long, device=device)
        with plan.stepping(decoder) as fn:
            t0 = time.perf_counter()
            fn(token, positions=pos, cache=cache)
            return time.perf_counter() - t0

    for plan in plans:
        for _ in range(WARMUP_STEPS):
            step(plan)
    times: dict[str, list[float]] = {p.mode: [] for p in plans}
    for _ in range(TIMED_ROUNDS):
        for plan in plans:
            times[plan.mode].append(step(plan))
    return {m: statistics.median(ts) for m, ts in times.items()}


# decoder -> (_key -> the plan chosen for it); weak, so a plan lives exactly as long as its model
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, DecodePlan]] = weakref.WeakKeyDictionary()


def forget_plans(decoder: nn.Module) -> None:
    """Drop the plans ``decode_plan`` remembered for ``decoder`` (its next call times again)."""
    _PLANS.pop(decoder, None)


def decode_plan(decoder: nn.Module, rows: int, *, compile: bool,
                on_timing: Callable[[str], None] | None = None) -> DecodePlan:
    """The step to run for ``rows`` rows: pinned by ``EARLYFUSION_DECODE_STEP``, remembered from an earlier call,
    or timed now (``on_timing`` is told once before a timing that compiles)."""
    device = next(decoder.parameters()).device
    options = candidates(device.type, compile, torch.get_num_threads(), rows)
    pinned = _pinned(options)
    if pinned is not None:
        return pinned
    if len(options) == 1:
        return options[0]
    plans = _PLANS.setdefault(decoder, {})
    key = _key(rows, compile, device)
    if key not in plans:
        if on_timing is not None and compile:
            on_timing(f"timing {len(options)} ways to run a decode step of {rows} row(s), compiling two of them "
                      "(once per model and batch size)")
        medians = time_plans(decoder, rows, options)
        if compile:  # a second pass, the graphs compiled: seconds against the minute compiling took
            again = time_plans(decoder, rows, options)
            medians = {m: min(t, again[m]) for m, t in medians.items()}
        best = min(options, key=lambda p: medians[p.mode])
        plans[key] = DecodePlan(best.mode, best.threads, {m: t * 1e3 for m, t in medians.items()})
    return plans[key]
