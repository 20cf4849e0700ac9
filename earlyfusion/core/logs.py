"""One logger and one progress-bar factory for every stage.

Progress bars are shown only on a terminal and only on the main process (rank 0); the logger
prints on the main process only.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

log = logging.getLogger("earlyfusion")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the first call),
    so a redirected or replaced stderr never receives writes meant for a closed one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: bool = False) -> None:
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO if is_main_process() else logging.WARNING)


def progress(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool | None = None, **kw):
    """A tqdm bar that is silent off-terminal and on non-main processes (``enabled`` overrides)."""
    if enabled is None:
        enabled = is_main_process() and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False, **kw)
