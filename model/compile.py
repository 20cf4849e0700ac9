"""torch.compile behind the ``--compile`` options of training and sampling, and the compiled decode step's products.

``compiled(module, dynamic=...)`` returns ``torch.compile(module, dynamic=dynamic)``. No compiled callable is kept
on the module: dynamo keeps its graphs with the module's code, guarded on the module's structure, so asking again
for the same module and shape mode runs the graphs compiled the first time. Before compiling, every plain
``nn.Embedding`` under the module is replaced for good by an ``IndexAddEmbedding`` sharing its weight
(``model/swap.py``): the same forward, and a backward that compiled graphs run as one ``index_add_`` instead of
inductor's element-by-element atomics.
Compilation happens on the first call; if it fails (no C++ compiler, an unsupported platform) the user gets one
``UserError`` saying to drop ``--compile`` instead of an inductor traceback.

``RowwiseLinear`` is the projection of the "compiled-rowwise" decode step on a CPU (``model/decode_plan.py`` swaps
it in for the steps): under compile, without gradients, a product of at most ``ROWWISE_MAX_ROWS`` rows (a decode
step: one token per row) is written as multiply-and-sum over each output's contiguous row of the (out, in)
weight, which inductor turns into one vectorised reduction kernel split across threads, where an MKL
matrix-vector call would be slower. It reads nn.Linear's own weight: nothing is copied. Both options are opt-in
because compiling takes a while the first time (less later, from inductor's on-disk cache) and needs a C++
compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyfusion.core.errors import UserError
from earlyfusion.model.kernels import IndexAddEmbedding
from earlyfusion.model.swap import swap_modules

# A compiled inference product of at most this many rows is a reduction over the weight's rows; larger products
# stay matrix multiplications (each row would read the whole weight again). Lower it if a machine's matrix-vector
# products beat inductor's reductions at a few rows.
ROWWISE_MAX_ROWS = 8


def compiled(module: torch.nn.Module | Callable, *, dynamic: bool) -> Callable:
    """The module's compiled callable for this shape mode (graphs compiled on its first call, reused after)."""
    # One decoder may keep several graphs on purpose (decode steps with row-wise reductions and with library
    # products, each batch size of one row or more, with and without padding, fp32 and bf16): past dynamo's default
    # of 8 it would silently run the rest eagerly.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    if isinstance(module, nn.Module):
        swap_modules(module, IndexAddEmbedding.replaces, IndexAddEmbedding.sharing)
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

    return fn


class RowwiseLinear(nn.Linear):
    """An ``nn.Linear`` whose compiled inference products of at most ``rows_limit`` rows reduce over the weight's
    rows. Everywhere else (eager calls, training, more rows) its forward is nn.Linear's."""

    rows_limit = ROWWISE_MAX_ROWS

    def forward(self, x: Tensor) -> Tensor:
        if (torch.compiler.is_compiling() and not torch.is_grad_enabled() and self.bias is None
                and x.shape[:-1].numel() <= self.rows_limit):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight, self.bias)
