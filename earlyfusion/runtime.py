"""How commands use the machine: one thread policy for every command.

Every command (training, tokenizer training, evaluation, sampling) uses every core for torch's intra-op
threads unless the user set ``OMP_NUM_THREADS`` (or a GPU does the work): ``use_all_cores()``. Sampling then
runs its eager per-token steps of a small model on one thread (``step_threads``, inside ``intra_op_threads``):
splitting a product of a row or two by a small matrix across threads costs more in fork/join than it saves.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

# Up to this much work per step (rows x model width) an eager per-token step runs on one CPU thread. Raise it
# if small steps are still faster on one thread on your machine; 0 keeps every step on every thread.
# Compiled steps keep every thread: their few-row products are inductor reductions, which split well.
SERIAL_STEP_WORK = 512


def use_all_cores() -> int:
    """Set torch's intra-op threads to this machine's core count, unless ``OMP_NUM_THREADS`` is set or a GPU
    is present; returns the thread count in effect."""
    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def step_threads(decoder, rows: int, *, compiled: bool = False) -> int:
    """Intra-op threads for the per-token steps of ``rows`` rows: 1 where an eager step is too small to split
    (``SERIAL_STEP_WORK``), else the current setting. A compiled or GPU step is unaffected."""
    now = torch.get_num_threads()
    if compiled or next(decoder.parameters()).device.type != "cpu":
        return now
    return 1 if rows * decoder.config.dim <= SERIAL_STEP_WORK else now


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
