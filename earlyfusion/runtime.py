"""How commands use the machine: one thread policy for every command.

Training, tokenizer training and evaluation use every core for torch's intra-op threads unless the
user set ``OMP_NUM_THREADS`` (or a GPU does the work).
"""

from __future__ import annotations

import os

import torch


def use_all_cores() -> int:
    """Set torch's intra-op threads to this machine's core count, unless ``OMP_NUM_THREADS`` is set or a GPU
    is present; returns the thread count in effect."""
    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()
