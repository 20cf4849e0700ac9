"""torch.compile behind the ``--compile`` options of training and sampling, and the compiled decode step's tuning.

``compiled(module, dynamic=...)`` returns ``torch.compile(module, dynamic=dynamic)``, made once and kept in
the module's instance dict (not registered as a submodule, so never in its ``state_dict``; it lives exactly
as long as the module). Compilation happens on the first call; if it fails (no C++ compiler, an
unsupported platform) the user gets one ``UserError`` saying to drop ``--compile`` instead of an inductor
traceback. Later calls go straight to the compiled module.

``decode_step(decoder)`` is the sampler's compiled per-token step. On a CPU it first turns the decoder's
projections into ``RowwiseLinear``s (``use_rowwise_products``): under compile, without gradients, a product
of at most ``ROWWISE_MAX_ROWS`` rows (a decode step: one token per row) is written as multiply-and-sum over
each output's contiguous row of an (out, in) weight copy, which inductor turns into one vectorised
reduction kernel split across threads, where an MKL matrix-vector call would be slower. The cost: the
projection weights are held twice. Both options are opt-in because compiling takes a while the first time
(less later, from inductor's on-disk cache) and needs a C++ compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from earlyfusion.errors import UserError
from earlyfusion.model.decoder import Linear

# A compiled inference product of at most this many rows is a reduction over ``RowwiseLinear.rows_weight``;
# larger products stay matrix multiplications (each row would read the whole weight copy again). Lower it
# if a machine's matrix-vector products beat inductor's reductions at a few rows.
ROWWISE_MAX_ROWS = 8


def compiled(module: torch.nn.Module, *, dynamic: bool) -> Callable:
    """The module's compiled callable for this shape mode (created on first request, then reused)."""
    attr = f"_earlyfusion_compiled_{'dynamic' if dynamic else 'static'}"
    fn = module.__dict__.get(attr)
    if fn is not None:
        return fn
    # One decoder may keep several graphs on purpose (decode steps with row-wise reductions and with library
    # products, each batch size of one row or more, with and without padding, fp32 and bf16): past dynamo's default
    # of 8 it would silently run the rest eagerly.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    inner = torch.compile(module, dynamic=dynamic)
    compiled_once = False

    def fn(*args, **kwargs):
        nonlocal compiled_once
        if compiled_once:
            return inner(*args, **kwargs)
        try:
            out = inner(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - torch.compile raises many kinds; the user needs one message
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"--compile failed ({type(e).__name__}: {first}); torch.compile needs a working C++ "
                            "compiler on CPU; run without --compile") from e
        compiled_once = True
        return out

    object.__setattr__(module, attr, fn)  # bypasses nn.Module's submodule registration
    return fn


class RowwiseLinear(Linear):
    """A ``Linear`` whose compiled inference products of few rows reduce over an (out, in) weight copy.

    ``rows_weight``: that copy, None until ``refresh_rows_weight`` makes it. It is a plain attribute, never in
    the state dict; it is used only under torch.compile, without gradients, for at most ``ROWWISE_MAX_ROWS``
    rows. Everywhere else (eager calls, training) the forward is ``Linear``'s ``x @ weight``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self._init_rows()

    def _init_rows(self) -> None:
        self.rows_limit = ROWWISE_MAX_ROWS  # 0: library products at every row count (a compiled graph of its own)
        self.rows_weight: Tensor | None = None
        self._rows_source: tuple | None = None  # what ``weight`` was when ``rows_weight`` was copied from it

    @classmethod
    def convert(cls, linear: Linear) -> RowwiseLinear:
        """Turn ``linear`` itself into a RowwiseLinear (same parameters, same state dict), without a copy yet."""
        if not isinstance(linear, cls):
            linear.__class__ = cls
            linear._init_rows()
        return linear

    def forward(self, x: Tensor) -> Tensor:
        wt = self.rows_weight
        if (wt is not None and torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and x.shape[:-1].numel() <= self.rows_limit):
            return (x.unsqueeze(-2) * wt).sum(-1)
        return x @ self.weight

    def refresh_rows_weight(self) -> None:
        """Make ``rows_weight`` equal to the transpose of ``weight``: created the first time, copied in place
        (the same tensor, so a compiled step keeps using it) after ``weight`` changed in place, made anew
        if ``weight`` moved to another device or dtype."""
        w = self.weight
        source = (w.device, w.dtype, tuple(w.shape), w.data_ptr(), w._version)
        if source == self._rows_source:
            return
        with torch.no_grad():
            wt = self.rows_weight
            if wt is not None and (wt.device, wt.dtype, tuple(wt.shape)) == (w.device, w.dtype, tuple(w.shape[::-1])):
                wt.copy_(w.t())
            else:
                self.rows_weight = w.detach().t().contiguous()
        self._rows_source = source


def use_rowwise_products(module: torch.nn.Module, rows_limit: int = ROWWISE_MAX_ROWS) -> None:
    """Turn every ``Linear`` under ``module`` into a ``RowwiseLinear`` with a current (out, in) weight copy;
    a no-op for those whose weight did not change since the last call. The state dict is unchanged.
    ``rows_limit``: products of at most this many rows reduce over the copy under compile; 0 = none do (the
    compiled step then uses library products throughout: dynamo keeps one graph per limit)."""
    for m in module.modules():
        if isinstance(m, Linear):
            lin = RowwiseLinear.convert(m)
            lin.rows_limit = rows_limit
            lin.refresh_rows_weight()


def decode_step(decoder: torch.nn.Module, *, rowwise: bool = True) -> Callable:
    """The decoder's compiled per-token step for sampling (dynamic shapes: the KV cache grows every step).
    On a CPU the projections become ``RowwiseLinear``s with current weight copies first (a no-op when the
    weights did not change since the last call), computing few-row products as reductions (``rowwise``) or
    as library products; elsewhere the step is compiled as it is."""
    if next(decoder.parameters()).device.type == "cpu":
        use_rowwise_products(decoder, ROWWISE_MAX_ROWS if rowwise else 0)
    return compiled(decoder, dynamic=True)
