"""The packing rules every batch stream shares (``packing.PackedBatches`` in memory, ``stream.StreamedBatches`` from
code shards): which part of the mixture and which document a draw gives, how a row is filled first-fit from a
look-ahead of drawn documents, and how rows of documents become the batch's tensors (see ``packing``'s docstring
for what the tensors hold)."""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from .config import IGNORE, IMAGE, NO_TARGET, TEXT
from .documents import DRAW, READ, UNCOND

LOOKAHEAD = 16
"""Drawn documents a row is filled from (first fit): enough that little of a row is padding."""
BATCH_KEYS = ("tokens", "targets", "positions", "doc_ids")


def mixture_part(cumulative: list[float], r: float) -> int:
    """The part a uniform draw ``r`` picks, ``cumulative`` the running sum of the normalised weights."""
    return min(bisect.bisect_right(cumulative, r), len(cumulative) - 1)


def pair_variant(has_caption: bool, r1: float, r2: float, reading_ratio: float, cond_dropout: float) -> int:
    """READ, DRAW or UNCOND for a pair, from two uniform draws: a pair without caption is always UNCOND."""
    if not has_caption:
        return UNCOND
    if r1 < reading_ratio:
        return READ
    return UNCOND if r2 < cond_dropout else DRAW


def first_fit_row(pending: list, draw: Callable[[], tuple], context_len: int) -> list:
    """One row's documents: keep ``pending`` at LOOKAHEAD drawn entries (``draw()``; each a tuple whose second item is
    the document's ids) and take, while two tokens are left, the first one that fits. Taken entries leave
    ``pending``; the others wait for the next row."""
    row, room = [], context_len
    while room >= 2:
        while len(pending) < LOOKAHEAD:
            pending.append(draw())
        i = next((i for i, entry in enumerate(pending) if len(entry[1]) <= room), None)
        if i is None:
            break
        row.append(pending.pop(i))
        room -= len(row[-1][1])
    return row


def row_arrays(rows: list[list[tuple[np.ndarray, int | np.ndarray]]], pad: int, context_len: int) -> np.ndarray:
    """(len(rows), 4, T) int32 — tokens, targets, positions, doc ids — of rows of (document ids, how many of its
    leading targets get no loss, or a bool per token: whether it is a target with loss)."""
    T = context_len
    out = np.empty((len(rows), 4, T), np.int32)
    out[:, 0] = pad
    out[:, 1] = IGNORE
    out[:, 3] = -1
    for r, row in enumerate(rows):
        tokens, targets, positions, doc_ids = out[r]
        o = 0
        for k, (doc, untrained) in enumerate(row):
            n = len(doc)
            tokens[o:o + n] = doc
            targets[o:o + n - 1] = doc[1:]  # its last token has no target (the next one starts another document)
            if isinstance(untrained, np.ndarray):
                targets[o:o + n - 1][~untrained[1:]] = IGNORE
            else:
                targets[o:o + untrained] = IGNORE
            positions[o:o + n] = np.arange(n)
            doc_ids[o:o + n] = k
            o += n
        positions[o:] = np.arange(T - o)
    return out


def batch_of(arrays: np.ndarray | torch.Tensor, vocab) -> dict[str, torch.Tensor]:
    """The batch dict of ``row_arrays`` output: int64 tokens, targets, positions, doc_ids and the int8 modality of each
    target (TEXT, IMAGE for an image code, ``<eoi>`` or a grid token, NO_TARGET without target)."""
    t = torch.as_tensor(arrays).to(torch.long)
    batch = {k: t[:, i].contiguous() for i, k in enumerate(BATCH_KEYS)}
    targets = batch["targets"]
    is_image = vocab.is_image_part(targets)
    batch["modality"] = torch.where(targets == IGNORE, NO_TARGET, torch.where(is_image, IMAGE, TEXT)).to(torch.int8)
    return batch
