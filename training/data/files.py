"""Files written whole or not at all: a shard (tar or code shard) is visible only once it is complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_TMP = ".tmp-"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file written under a hidden temporary name beside ``path``, flushed to disk and renamed to ``path`` when the
    block ends: ``path`` either does not exist or is complete. An exception removes the temporary."""
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(folder: Path) -> None:
    """Delete the hidden temporaries (``atomic_file``) that killed writers left in ``folder``. Only for a caller that
    holds the folder's lock and has not started any writer: every temporary there is then a dead one's."""
    for tmp in folder.glob(f".*{_TMP}*"):
        tmp.unlink(missing_ok=True)
