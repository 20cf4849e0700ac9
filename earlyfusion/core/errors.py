"""The errors a user can cause. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import dataclasses


class UserError(Exception):
    """An error caused by what the user gave us; the CLI prints it as one line, no traceback."""


class CheckpointError(UserError):
    """A checkpoint directory or file is missing, incomplete, corrupted or does not match."""


def build_config(cls, values: dict, where: str):
    """``cls(**values)`` for a config dataclass read from a file: an unknown field or a value its ``__post_init__``
    refuses becomes one CheckpointError that names ``where``."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; it was written by another "
                              "version of earlyfusion or edited by hand")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
