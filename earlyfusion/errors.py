"""The errors a user can cause. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by what the user gave us; the CLI prints it as one line, no traceback."""


class CheckpointError(UserError):
    """A checkpoint directory or file is missing, incomplete, corrupted or does not match."""
