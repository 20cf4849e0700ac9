"""torch.compile behind the ``--compile`` options of training and sampling: one wrapper per module and mode.

``compiled(module, dynamic=...)`` returns ``torch.compile(module, dynamic=dynamic)``, made once and kept in
the module's instance dict (not registered as a submodule, so never in its ``state_dict``; it lives exactly
as long as the module). Compilation happens on the first call; if it fails (no C++ compiler, an
unsupported platform) the user gets one ``UserError`` saying to drop ``--compile`` instead of an inductor
traceback. Later calls go straight to the compiled module.

Measured on the 2-core CPU (bench/RESULTS.md): the sampler's per-token step of ``small`` 1.2-1.6x faster
(dynamic shapes: the cache grows every step), the ``small`` training step 1.08-1.15x (static shapes: packed
rows are always B x T). Both are opt-in because compiling costs ~20 s the first time (2-6 s later, from
inductor's on-disk cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.io import UserError


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
