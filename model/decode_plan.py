"""Which per-token decode step the sampler runs: chosen by timing on the machine at hand.

The fastest way to run one decode step depends on the CPU, the model's size, the batch and the precision:
on one machine splitting a product of a row or two across threads costs more in fork/join than it saves, on
another it pays; inductor's row-wise reductions (``model.compile.RowwiseLinear``) beat MKL's matrix-vector
products on some CPUs and lose to them at eight rows on others. So no constant decides. Candidates for a
batch of ``rows`` rows on a CPU:

* ``eager``: the decoder's forward on every intra-op thread;
* ``eager-1``: the same on one thread (only when more than one is set);
* ``eager-rows``: the decoder's forward on every thread with each projection computed row by row, so that the
  rows' products run in parallel (only for several rows and threads; classifier-free guidance samples two rows
  per image);
* with ``compile``: ``compiled-rowwise`` (few-row products as reductions over the weight's rows,
  ``model.compile.RowwiseLinear``) and ``compiled-library`` (library products), both on every thread.

The eager steps on a CPU compute with an (in, out) copy of each projection weight (``TransposedLinear``), made
for the sampling call: MKL's matrix-vector and few-row products run faster in that layout than in nn.Linear's
(out, in) one, up to twice as fast for the vocabulary projection, whose outputs far outnumber its inputs. Where
the copy would not fit in memory (``copies_fit``) they compute with the weights as they are (``RowLinear`` for
``eager-rows``); the plan records which (``DecodePlan.copies``).

A plan is applied from outside the model: ``DecodePlan.stepping`` puts its projections in the place of the
decoder's ``nn.Linear``s (sharing their weights, ``model/swap.py``) for the steps and puts the originals back
afterwards.

The first time a (decoder, rows, compile, precision, threads) combination is sampled, ``decode_plan`` runs
each candidate for a few steps on a scratch KV cache — compiling the compiled ones — interleaved so that load
from other processes falls on all of them, and keeps the fastest median step (timed twice when it compiles,
each candidate keeping its faster median: in the pass that compiles, a newly compiled graph of a model that
already holds others can run slower than it does afterwards, enough to lose to eager); later calls reuse the
choice, remembered here per decoder in a weak map (forgotten with the model, or by ``forget_plans``). Eager is
always a candidate, so ``--compile`` is never slower than eager beyond timing noise. On a GPU nothing is timed:
``compile`` means the compiled step.

``EARLYFUSION_DECODE_STEP`` set to one of the mode names pins the choice (where it applies), for
reproducible timings and tests.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyfusion.core.runtime import intra_op_threads
from earlyfusion.model.compile import RowwiseLinear, compiled
from earlyfusion.model.swap import Swap, applied, sharing, swaps

MODES = ("eager", "eager-1", "eager-rows", "compiled-rowwise", "compiled-library")
PIN_ENV = "EARLYFUSION_DECODE_STEP"
WARMUP_STEPS = 2  # per candidate, before timing (a compiled candidate compiles on its first)
TIMED_ROUNDS = 6  # timed steps per candidate, one per round
PREFILL = 8  # scratch prompt length


def _several_rows(x: Tensor) -> bool:
    """A decode step's input of several rows, one token each, without gradients."""
    return x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1 and not torch.is_grad_enabled()


class TransposedLinear(nn.Linear):
    """An ``nn.Linear`` whose inference products use ``weight_t``, an (in, out) copy of its weight made with the
    module (``of``): ``x @ weight_t``, or with ``rows`` a product of several one-token rows as one matrix-vector
    product per row (``bmm``), spread across threads, where the library's few-row matrix product costs about one
    matrix-vector product per row on one thread. Products with gradients use the weight itself. The copy does not
    follow later changes of the weight: the module lives for one sampling call."""

    rows = False

    @classmethod
    def of(cls, linear: nn.Linear, weight_t: Tensor, *, rows: bool) -> TransposedLinear:
        new = sharing(cls, linear)
        new.weight_t, new.rows = weight_t, rows
        return new

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.bias is not None:
            return F.linear(x, self.weight, self.bias)
        wt = self.weight_t
        if self.rows and _several_rows(x):
            return torch.bmm(x, wt.expand(x.shape[0], *wt.shape))  # (rows, 1, out)
        return x @ wt


class RowLinear(nn.Linear):
    """``TransposedLinear`` with ``rows`` on, without a copy: each one-token row's product with the (out, in)
    weight on its own, spread across threads (where a copy would not fit in memory)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None and _several_rows(x):
            w = self.weight
            return torch.bmm(x, w.t().expand(x.shape[0], *w.shape[::-1]))  # (rows, 1, out)
        return F.linear(x, self.weight, self.bias)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def copies_fit(decoder: nn.Module) -> bool:
    """Whether an (in, out) copy of every projection weight of ``decoder`` (on a CPU) takes at most half the memory
    the system has available (``MemAvailable`` in /proc/meminfo; False where that cannot be read)."""
    need = sum(m.weight.numel() * m.weight.element_size() for m in decoder.modules() if _is_linear(m))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return 2 * need <= available


@dataclass(frozen=True)
class DecodePlan:
    mode: str
    """One of ``MODES``."""
    threads: int
    """Intra-op threads the per-token steps run on."""
    step_ms: dict[str, float] | None = None
    """Median milliseconds per step of each candidate timed (None when nothing was timed)."""
    copies: bool = True
    """Eager steps compute with (in, out) copies of the projection weights (``TransposedLinear``)."""

    @property
    def compiled(self) -> bool:
        return self.mode.startswith("compiled")

    def products(self, decoder: nn.Module, shared: dict[int, Tensor] | None = None) -> list[Swap]:
        """The projections this plan computes with in the place of ``decoder``'s ``nn.Linear``s (made, not yet put
        in; empty: the decoder's own). ``shared``: (in, out) weight copies to share between plans, by weight id."""
        if self.mode == "compiled-rowwise":
            return swaps(decoder, _is_linear, lambda lin: sharing(RowwiseLinear, lin))
        if self.compiled:
            return []
        rows = self.mode == "eager-rows"
        if not self.copies:
            return swaps(decoder, _is_linear, lambda lin: sharing(RowLinear, lin)) if rows else []
        made = {} if shared is None else shared

        def transposed(lin: nn.Linear) -> TransposedLinear:
            if id(lin.weight) not in made:
                made[id(lin.weight)] = lin.weight.detach().t().contiguous()
            return TransposedLinear.of(lin, made[id(lin.weight)], rows=rows)

        return swaps(decoder, _is_linear, transposed)

    @contextmanager
    def stepping(self, decoder: nn.Module, products: list[Swap] | None = None) -> Iterator[Callable]:
        """The callable for one step (the decoder, or its compiled step), run on the plan's threads with the plan's
        projections (``products``, made now when not given) in the place of the decoder's ``nn.Linear``s;
        afterwards the caller's thread count and the decoder's own modules come back, also when a step fails."""
        products = self.products(decoder) if products is None else products
        with intra_op_threads(self.threads), applied(products):
            yield compiled(decoder, dynamic=True) if self.compiled else decoder

    def describe(self) -> str:
        timed = ""
        if self.step_ms:
            timed = " (ms per step: " + ", ".join(f"{m} {t:.2f}" for m, t in self.step_ms.items()) + ")"
        copies = ", (in, out) weight copies" if self.copies and not self.compiled else ""
        return f"{self.mode} on {self.threads} thread(s){copies}{timed}"


def candidates(device_type: str, compile: bool, threads: int, rows: int, copies: bool = True) -> list[DecodePlan]:
    """The plans worth timing for this device, ``compile`` setting, thread count and batch of ``rows`` rows;
    ``copies``: whether the eager steps on a CPU may compute with (in, out) weight copies."""
    if device_type != "cpu":
        return [DecodePlan("compiled-library" if compile else "eager", threads, copies=False)]
    out = [DecodePlan("eager", threads, copies=copies)]
    if threads > 1:
        out.append(DecodePlan("eager-1", 1, copies=copies))
        if rows > 1:
            out.append(DecodePlan("eager-rows", threads, copies=copies))
    if compile:
        out += [DecodePlan("compiled-rowwise", threads, copies=copies),
                DecodePlan("compiled-library", threads, copies=copies)]
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
    shared: dict[int, Tensor] = {}  # one (in, out) copy of each weight, for every plan that computes with copies
    products = {p.mode: p.products(decoder, shared) for p in plans}

    def step(plan: DecodePlan) -> float:
        # each timed step runs inside its own plan's ``stepping`` (the candidates share the decoder, whose
        # projections it swaps), entered outside the timer;
        # positions wrap inside the model's context (a short-context model still times as many steps)
        pos = torch.full((rows, 1), cache.length % context, dtype=torch.long, device=device)
        with plan.stepping(decoder, products[plan.mode]) as fn:
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
    copies = device.type == "cpu" and copies_fit(decoder)
    options = candidates(device.type, compile, torch.get_num_threads(), rows, copies)
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
        plans[key] = DecodePlan(best.mode, best.threads, {m: t * 1e3 for m, t in medians.items()}, best.copies)
    return plans[key]
