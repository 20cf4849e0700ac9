"""Validation shared by every command's config ``__post_init__``: numbers that must be finite and in range,
and directory options that must not name a file. Each raises ValueError, which the CLI prints as one line."""

from __future__ import annotations

import math
from pathlib import Path

MAX_BATCH = 65536
"""The largest --batch-size an option accepts."""
MAX_SEED = 2 ** 32 - 1
MAX_STEPS = 10 ** 9
"""The largest step count (--steps, the every-K-steps options, warmup) an option accepts: far beyond any run,
and small enough that step numbers stay ordinary integers everywhere they are stored or formatted."""


def check_number(flag: str, value, lo=None, hi=None, *, hi_open: bool = False) -> None:
    """Option validation for a config's ``__post_init__``: ValueError unless ``value`` is a finite number
    in [lo, hi] ([lo, hi) with ``hi_open``; a bound of None is no bound)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--{flag} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and (value >= hi if hi_open else value > hi)):
        if hi is None:
            want = f"at least {lo}"
        elif lo is None:
            want = f"at most {hi}"
        else:
            want = f"in [{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"--{flag} must be {want}, got {value}")


def check_not_file(flag: str, value: str | None) -> None:
    """A directory option must not name something that exists and is not a directory (a file, a pipe)."""
    path = Path(value).expanduser() if value else None
    if path is not None and path.exists() and not path.is_dir():
        raise ValueError(f"--{flag} {value} exists and is not a directory; choose a directory")
