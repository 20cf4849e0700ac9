"""torch.compile behind the ``--compile`` options of training and sampling: one wrapper per module and mode.

``compiled(module, dynamic=...)`` returns ``torch.compile(module, dynamic=dynamic)``, made once and kept in
the module's instance dict (not registered as a submodule, so never in its ``state_dict``; it lives exactly
as long as the module). Compilation happens on the first call; if it fails (no C++ compiler, an
unsupported platform) the user gets one ``UserError`` saying to drop ``--compile`` instead of an inductor
traceback. Later calls go straight to the compiled module.

``decode_step(decoder)`` is the sampler's compiled per-token step: on a CPU it first gives the decoder's
projections their (out, in) weight copies (``Decoder.refresh_rows_weights``), so that the products of a few
rows compile to vectorised reductions instead of MKL calls (see ``model.decoder.ROWWISE_MAX_ROWS``).

Measured on the 2-core CPU (bench/RESULTS.md): the sampler at batch 1 2.4-2.7x faster than eager for ``small``,
2.2x for ``base`` (dynamic shapes: the cache grows every step), the ``small`` training step 1.08-1.15x (static
shapes: packed rows are always B x T). Both are opt-in because compiling costs ~20 s the first time (2-6 s
later, from inductor's on-disk cache), and the compiled CPU sampler holds the projection weights twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from earlyfusion.errors import UserError


def compiled(module: torch.nn.Module, *, dynamic: bool) -> Callable:
    """The module's compiled callable for this shape mode (created on first request, then reused)."""
    attr = f"_earlyfusion_compiled_{'dynamic' if dynamic else 'static'}"
    fn = module.__dict__.get(attr)
    if fn is not None:
        return fn
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


def decode_step(decoder: torch.nn.Module) -> Callable:
    """The decoder's compiled per-token step for sampling (dynamic shapes: the KV cache grows every step).
    On a CPU the projections' (out, in) weight copies are made current first (a no-op when the weights did
    not change since the last call); elsewhere the step is compiled as it is."""
    if next(decoder.parameters()).device.type == "cpu":
        decoder.refresh_rows_weights()
    return compiled(decoder, dynamic=True)
