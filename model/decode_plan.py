"""Which per-token decode step the sampler runs: chosen by timing on the machine at hand.

The fastest way to run one decode step depends on the CPU, the model's size, the batch and the precision:
on one machine splitting a product of a row or two across threads costs more in fork/join than it saves, on
another it pays; inductor's row-wise reductions (``model.compile.RowwiseLinear``) beat MKL's matrix-vector
products on some CPUs and lose to them at eight rows on others. So no constant decides. Candidates for a
batch of ``rows`` rows on a CPU:

* ``eager``: the decoder's own forward on every intra-op thread;
* ``eager-1``: the same on one thread (only when more than one is set);
* ``eager-rows``: the decoder's forward on every thread with each projection computed row by row
  (``model.decoder.use_row_products``), so that the rows' products run in parallel (only for several rows
  and threads; classifier-free guidance samples two rows per image);
* with ``compile``: ``compiled-rowwise`` (few-row products as reductions over a transposed weight copy)
  and ``compiled-library`` (library products), both on every thread.

The first time a (decoder, rows, compile, precision, threads) combination is sampled, ``decode_plan`` runs
each candidate for a few steps on a scratch KV cache — compiling the compiled ones — interleaved so that load
from other processes falls on all of them, and keeps the fastest median step (timed twice when it compiles,
each candidate keeping its faster median: in the pass that compiles, a newly compiled graph of a model that
already holds others can run slower than it does afterwards, enough to lose to eager); later calls reuse the choice
(kept on the decoder, so it lives as long as the model). Eager is always a candidate, so ``--compile`` is
never slower than eager beyond timing noise. On a GPU nothing is timed: ``compile`` means the compiled step.

``EARLYFUSION_DECODE_STEP`` set to one of the mode names pins the choice (where it applies), for
reproducible timings and tests.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from earlyfusion.model.compile import decode_step
from earlyfusion.model.decoder import use_row_products
from earlyfusion.runtime import intra_op_threads

MODES = ("eager", "eager-1", "eager-rows", "compiled-rowwise", "compiled-library")
PIN_ENV = "EARLYFUSION_DECODE_STEP"
WARMUP_STEPS = 2  # per candidate, before timing (a compiled candidate compiles on its first)
TIMED_ROUNDS = 6  # timed steps per candidate, one per round
PREFILL = 8  # scratch prompt length


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

    def step_fn(self, decoder: torch.nn.Module) -> Callable:
        """The callable for one step: the decoder, or its compiled step with current weight copies. Call it right
        before stepping: each plan sets the decoder's projections to its kind of product."""
        use_row_products(decoder, self.mode == "eager-rows")
        if not self.compiled:
            return decoder
        return decode_step(decoder, rowwise=self.mode == "compiled-rowwise")

    @contextmanager
    def stepping(self, decoder: torch.nn.Module) -> Iterator[Callable]:
        """The step callable (``step_fn``), on the plan's threads; afterwards the caller's thread count and the
        decoder's usual products come back, also when a step fails."""
        try:
            with intra_op_threads(self.threads):
                yield self.step_fn(decoder)
        finally:
            use_row_products(decoder, False)

    def describe(self) -> str:
        timed = ""
        if self.step_ms:
            timed = " (ms per step: " + ", ".join(f"{m} {t:.2f}" for m, t in self.step_ms.items()) + ")"
        return f"{self.mode} on {self.threads} thread(s){timed}"


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
def time_plans(decoder: torch.nn.Module, rows: int, plans: list[DecodePlan]) -> dict[str, float]:
    """Median seconds per decode step of each plan, measured on a scratch cache of ``rows`` rows."""
    device = next(decoder.parameters()).device
    steps = len(plans) * (WARMUP_STEPS + TIMED_ROUNDS)
    context = int(decoder.config.max_seq_len)
    prefill = min(PREFILL, context)
    cache = decoder.new_cache(rows, max_len=prefill + steps + 1)
    token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # id 0 exists in every vocabulary; its cost is any id's
    decoder(token.expand(rows, prefill), positions=torch.arange(prefill, device=device).expand(rows, prefill), cache=cache)

    def step(plan: DecodePlan) -> float:
        # ``stepping`` sets the projections' kind of product for this plan (the candidates share the decoder's
        # modules) before every timed step, outside the timer, and puts them back after it
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


def decode_plan(decoder: torch.nn.Module, rows: int, *, compile: bool,
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
    plans = decoder.__dict__.setdefault("_earlyfusion_decode_plans", {})
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


def pin_plan(decoder: torch.nn.Module, rows: int, plan: DecodePlan, *, compile: bool) -> None:
    """Make ``decode_plan`` return ``plan`` for this decoder and ``rows`` (the bench times each mode this way)."""
    device = next(decoder.parameters()).device
    decoder.__dict__.setdefault("_earlyfusion_decode_plans", {})[_key(rows, compile, device)] = plan
