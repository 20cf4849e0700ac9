"""Copies of training images among the drawn ones, compared code grid against code grid.

A drawing is a copy when its code grid equals, code for code, the code grid of a training image; its
best overlap is the fraction of equal codes (same position, same code) with the closest training grid.
The drawings' grids are the codes the sampler chose (``CodeRecorder`` catches them on their way to the
image tokenizer's decoder), not a re-encoding of the decoded pixels, which could differ.

The training grids are the run's training images (``train --data`` as the run recorded it, or
``eval --train-data``) encoded by the run's image tokenizer through the same code cache training used:
the same images and tokenizer load the cached codes, anything else is encoded (and cached) once.
Hub data sets among the sources are not compared (counted in the log).

Grids of different shapes (a vocabulary with grid tokens: each image keeps its aspect ratio) are never
copies of one another: a drawing is compared only with the training grids of its own shape
(``best_overlap`` with ``drawn_grids`` / ``train_grids``; ``flatten_grids`` lays grids of any shape out as
padded rows, as the code cache does).

A run trained with augmented views (``--augment-views``) saw more grids than its images: those views join the
training grids (from the same code cache), and the captions of mirrored views join the training captions.

On the built-in shapes data a drawing may legitimately equal a training image (one-shape scenes are
few, and a scene seen in training has exactly one image), so there only drawings of two-shape scenes
absent from the training captions count (``novel_two_shape``; a scene in a picture of another shape is
another scene).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.tokenizer.preprocess import preprocess_for_codes
from earlyfusion.tokenizer.vocab import check_vocab_matches
from earlyfusion.training.data import SkipReport, local_image_table, resolve_sources
from earlyfusion.training.data.augment import NO_AUGMENT
from earlyfusion.training.data.codes import PAD_CODE, resolve_cache_dir
from earlyfusion.training.data.conversations import conversation_records
from earlyfusion.training.data.records import interleaved_records, pair_records
from earlyfusion.training.trainer import source_key
from earlyfusion.training.shapes import parse_picture

# (drawings x training grids x codes) booleans compared at once
_COMPARE_ELEMENTS = 1 << 25


@dataclass
class TrainingGrids:
    codes: torch.Tensor
    """LongTensor (N, L): one flattened code grid per training image (h*w codes, then the code cache's PAD_CODE up to
    L)."""
    srcs: list[str]
    """The image file of each row."""
    captions: list[str]
    """The captions of the training image-caption pairs."""
    grids: torch.Tensor | None = None
    """LongTensor (N, 2): the (rows, columns) of each training grid."""


class CodeRecorder:
    """Stands in for the image tokenizer while drawing: records every code grid the sampler decodes, in order,
    and decodes it with the real one. Everything else is the real tokenizer's."""

    def __init__(self, vq):
        self._vq = vq
        self.grids: list[torch.Tensor] = []

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.grids.extend(codes.detach().long().cpu())  # (n, h, w) -> n grids
        return self._vq.decode(codes)

    def __getattr__(self, name):
        if name == "_vq":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._vq, name)


@torch.no_grad()
def encode_drawings(vq, images, vocab=None) -> list[torch.Tensor]:
    """The (h, w) code grids the image tokenizer reads in PIL images (for drawings that did not come through a
    ``CodeRecorder``); with a grid-token ``vocab`` each image keeps its aspect ratio, as training read images."""

    device = next(vq.parameters()).device
    max_grid = vocab.grid if vocab is not None and vocab.grid_tokens else None
    pixels = [preprocess_for_codes(im, vq.cfg.image_size, vq.cfg.downsample, max_grid) for im in images]
    grids: list = [None] * len(pixels)
    for shape in dict.fromkeys(tuple(p.shape) for p in pixels):
        idx = [i for i, p in enumerate(pixels) if tuple(p.shape) == shape]
        for j in range(0, len(idx), 64):
            part = idx[j:j + 64]
            for i, g in zip(part, vq.encode(torch.stack([pixels[i] for i in part]).to(device)).cpu()):
                grids[i] = g.long()
    return grids


def flatten_grids(grids, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Code grids of any shapes (a sequence of (h, w) tensors) -> (LongTensor (n, length) of each grid's codes in
    raster order padded with the code cache's PAD_CODE, LongTensor (n, 2) of their shapes); ``length`` defaults to
    the largest h*w."""

    sizes = [int(g.shape[0]) * int(g.shape[1]) for g in grids]
    length = max(sizes, default=0) if length is None else length
    codes = torch.full((len(sizes), length), PAD_CODE, dtype=torch.long)
    for i, (g, n) in enumerate(zip(grids, sizes)):
        codes[i, :n] = g.reshape(-1).long()
    return codes, torch.tensor([list(g.shape) for g in grids], dtype=torch.long).reshape(-1, 2)


def best_overlap(drawn: torch.Tensor, train: torch.Tensor, drawn_grids: torch.Tensor | None = None,
                 train_grids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each drawn grid (D, L), the fraction of codes equal to those of its closest training grid (N, L)
    and that grid's row (the first on a tie). Grids of another length than the training ones never overlap.

    With ``drawn_grids`` (D, 2) and ``train_grids`` (N, 2), rows are grids of those shapes padded with PAD_CODE
    (``flatten_grids``): a drawing is compared only with training grids of its own shape (overlap 0 and row -1
    when there is none), and the fraction is of its own h*w codes."""

    D, L = drawn.shape
    if (drawn_grids is None) != (train_grids is None):
        raise ValueError("give the shapes of both the drawn and the training grids, or of neither")
    if len(train) == 0 or train.shape[1] != L or L == 0:
        return torch.zeros(D), torch.full((D,), -1, dtype=torch.long)
    shaped = drawn_grids is not None
    n_codes = drawn_grids.prod(1).double() if shaped else None
    step = max(1, _COMPARE_ELEMENTS // (len(train) * L))
    fractions, rows = [], []
    for i in range(0, D, step):
        d = drawn[i:i + step, None, :]
        equal = d == train[None, :, :]  # (d, N, L)
        if shaped:
            equal &= d != PAD_CODE
        same = equal.sum(-1)  # (d, N) equal codes
        if shaped:  # another shape is never a copy, whatever its codes
            other = (drawn_grids[i:i + step, None, :] != train_grids[None, :, :]).any(-1)  # (d, N)
            same = same.masked_fill(other, -1)
        best, row = same.max(dim=1)
        if shaped:
            fractions.append(best.clamp(min=0).double() / n_codes[i:i + step].clamp(min=1))
            rows.append(torch.where(best < 0, -1, row))
        else:
            fractions.append(best.double() / L)
            rows.append(row)
    return torch.cat(fractions).float(), torch.cat(rows)


def copy_figures(overlap: torch.Tensor, counted: Sequence[bool]) -> dict:
    """copy_rate (fraction of exact copies) and copy_best_overlap (mean best overlap) over the counted drawings,
    copy_counted (how many); the figures are None when no drawing counts."""
    mask = torch.tensor(list(counted), dtype=torch.bool)
    n = int(mask.sum())
    if n == 0:
        return {"copy_rate": None, "copy_best_overlap": None, "copy_counted": 0}
    sel = overlap[mask]
    return {"copy_rate": float((sel == 1.0).float().mean()), "copy_best_overlap": float(sel.mean()), "copy_counted": n}


def novel_two_shape(captions: Sequence[str], training_captions: Sequence[str]) -> list[bool]:
    """Per caption of the built-in grammar: whether it names two shapes in a scene (in a picture of its shape) no
    training caption names."""

    seen = {parse_picture(c) for c in training_captions}
    scenes = [parse_picture(c) for c in captions]
    return [s is not None and len(s[1]) == 2 and s not in seen for s in scenes]


# ---------------------------------------------------------------- the training images


def recorded_sources(config: dict) -> tuple[list[str], dict]:
    """(the run's training sources, its data options) from a checkpoint's config.json; ([], {}) when it records none.

    A source is taken as it was given to ``train`` when it still names the same path from here (so that the
    code cache training wrote is found), else as the absolute path the run recorded."""

    data = (config.get("train") or {}).get("data") or {}
    given = [s for s in data.get("sources") or [] if isinstance(s, str)]
    recorded = [s for s in ((config.get("identity") or {}).get("data") or {}).get("sources") or [] if isinstance(s, str)]
    if len(given) != len(recorded):
        return given or recorded, data
    return [g if source_key(g) == r else r for g, r in zip(given, recorded)], data


def training_grids(sources: Sequence[str], *, vocab, image_tokenizer: str | Path, split: str = "train",
                   text_column: str = "text", cache_dir: str | None = None,
                   allow_outside_paths: bool = False, augment=None) -> TrainingGrids:
    """The code grids of every local training image of ``sources`` (image-caption pairs and the images of
    interleaved documents), as training read them, with the augmented views of ``augment`` (an ``Augment``; the
    run's) as training saw them. UserError when a source cannot be read or none has images."""

    augment = augment or NO_AUGMENT
    report = SkipReport()
    images: dict[str, tuple[list[str], list[str]]] = {}  # per --data entry, as training groups them
    captions: list[str] = []
    hub = []
    for spec in resolve_sources(sources, split):
        if spec.hub:
            hub.append(spec.location)
            continue
        if spec.kind == "text" or spec.stream is not None:  # shards: too many images to compare drawings with
            continue
        paths, wheres = images.setdefault(spec.source, ([], []))
        if spec.kind == "pairs":
            for where, path, text in pair_records(Path(spec.location), text_column, report, allow_outside_paths):
                paths.append(str(path))
                wheres.append(where)
                if text:
                    captions.append(text)
                    if augment.mirrors_captions:
                        captions.append(augment.mirror_caption(text))  # what training showed with mirrored views
        elif spec.kind == "conversations":
            for where, _, turns in conversation_records(Path(spec.location), report, allow_outside_paths):
                for x in (x for t in turns for kind, x in t.segments if kind == "i"):
                    paths.append(x)
                    wheres.append(where)
        else:
            for where, segs in interleaved_records(Path(spec.location), report, allow_outside_paths):
                for kind, x in segs:
                    if kind == "i":
                        paths.append(x)
                        wheres.append(where)
    if hub:
        log.warning("copy rate: hub data set(s) %s not compared (only local training images are)", ", ".join(hub))
    vq_fp = check_vocab_matches(vocab, image_tokenizer, "training images")
    cache_root = resolve_cache_dir(cache_dir, list(sources))
    codes, grids, srcs = [], [], []
    for source, (paths, wheres) in images.items():
        table = local_image_table(paths, wheres, image_tokenizer, vq_fp, cache_root, augment=augment,
                                  grid_tokens=vocab.grid_tokens)
        good = [i for i, r in enumerate(table.reasons) if not r]
        for i, r in enumerate(table.reasons):
            if r:
                report.add(r, table.srcs[i])
        if good:
            for view in range(augment.views if table.views is not None else 1):
                rows = table.codes[good] if view == 0 else table.views[good, view - 1]
                codes.append(torch.from_numpy(rows.astype(np.int64)))
                grids.append(torch.from_numpy(table.grids[good].astype(np.int64)))
                srcs += [table.srcs[i] if view == 0 else f"{table.srcs[i]} (augmented view {view}"
                         f"{', mirrored' if augment.mirrored(view) else ''})" for i in good]
    if report.total:
        log.warning("copy rate, training images: %s", report.summary())
    if not srcs:
        raise UserError(f"{', '.join(sources)}: no training images to compare the drawings with; "
                        "pass the run's training data with --train-data")
    return TrainingGrids(codes=torch.cat(codes), srcs=srcs, captions=captions, grids=torch.cat(grids))
