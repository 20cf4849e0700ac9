"""Packing documents into batches, sharding them over processes, and resuming the stream exactly.

Packing: rows of exactly T tokens hold whole documents (an image span is never split: documents are
never split at all); each row is filled first-fit from a look-ahead of the next 16 documents of the
stream, so little is padding. Separation: positions restart at 0 in every document and ``doc_ids``
let the decoder attend only within the document (block-diagonal causal mask), so packing changes
nothing a document sees: a packed row trains exactly like separate unpadded rows, and no document
conditions on an unrelated predecessor (which would teach the model to continue one caption with the
next image). The last token of a document has no target (its "next token" is the next document's
``<s>``), padding has target IGNORE (-100), doc id -1 and modality NO_TARGET (-1).

Without ``reading_image_loss`` a reading example has no loss on its image span (``<boi> codes <eoi>``
as targets): it trains only the caption, and unconditional image modelling is left to the
caption-dropped examples.

Batches (``PackedBatches``) are dicts of (B, T) tensors: tokens, targets (IGNORE = no loss), positions,
doc_ids (int64) and modality (int8: TEXT 0, IMAGE 1 for an image code, ``<eoi>`` or a grid token, NO_TARGET
-1) of the target token. All randomness (mixture choice, reading/drawing, condition dropout, epoch shuffles)
comes from one seeded ``torch.Generator`` plus per-(part, epoch) permutation seeds; a pair with K
augmented code grids (``--augment-views``) shows grid (o + epoch) mod K, o a per-(seed, part, pair)
offset, so every grid is used once in K epochs and the generator's draws are those of a run without
augmentation; ``state_dict()``
is plain JSON, and a fresh ``PackedBatches`` given it continues with identical batches. Every process
builds the same global batch; ``sharded(rank, world)`` yields one process's rows of it.

``noisy_image_codes`` corrupts a batch's inputs for training (``--image-token-noise``): some codes of each picture
being drawn become random codes, the targets stay true.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import check_vocab_matches

from .config import DEFAULT_READING_RATIO, IGNORE, PIPELINE_VERSION, DataConfig
from .documents import READ, PreparedData, pair_document, pair_overhead, prepare
from .records import SkipReport
from .sources import resolve_sources
from .stream import StreamedBatches, streamed_batches
from .rows import LOOKAHEAD  # noqa: F401 - the look-ahead is read from here by bench/bench_scale.py
from .rows import batch_of, first_fit_row, mixture_part, pair_variant, row_arrays


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _check_shape(context_len: int, batch_size: int) -> None:
    if context_len < 4 or batch_size < 1:
        raise ValueError(f"context_len must be >= 4 and batch_size >= 1 (got {context_len}, {batch_size})")


class PackedBatches:
    """Infinite iterator of packed global batches (see the module docstring); exact resume via state_dict."""

    def __init__(self, data: PreparedData, vocab, *, context_len: int, batch_size: int,
                 reading_ratio: float = DEFAULT_READING_RATIO, cond_dropout: float = DataConfig.cond_dropout,
                 reading_image_loss: bool = DataConfig.reading_image_loss, seed: int = 0):
        _check_shape(context_len, batch_size)
        self.data = data
        self.vocab = vocab
        self.T = context_len
        self.B = batch_size
        self.reading_ratio = reading_ratio
        self.cond_dropout = cond_dropout
        self.reading_image_loss = reading_image_loss
        self.seed = seed
        w = np.asarray([p.weight for p in data.parts], np.float64)
        self._cum = list(np.cumsum(w / w.sum()))
        for p in data.parts:
            longest = max((len(d) for d in p.docs), default=0) if p.kind != "pairs" else \
                max((len(c) for c in p.captions), default=0) + pair_overhead(vocab)
            if longest > context_len:
                raise ValueError(f"{p.name}: a document of {longest} tokens exceeds context_len {context_len}; "
                                 "prepare the data with the same context length")
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch = [0] * len(data.parts)
        self._pos = [0] * len(data.parts)
        self._perm: list[list[int] | None] = [None] * len(data.parts)
        self._pending: list[tuple[tuple[int, int, int, int], np.ndarray]] = []  # ((part, item, variant, view), ids)
        self.batches = 0

    @property
    def report(self) -> SkipReport:
        return self.data.report

    # ------------------------------------------------------------ documents
    def _take(self, p: int) -> int:
        n = len(self.data.parts[p])
        if self._pos[p] >= n:
            self._epoch[p] += 1
            self._pos[p] = 0
            self._perm[p] = None
        if self._perm[p] is None:
            g = torch.Generator().manual_seed(_seed_for(self.seed, "perm", p, self._epoch[p]))
            self._perm[p] = torch.randperm(n, generator=g).tolist()
        item = self._perm[p][self._pos[p]]
        self._pos[p] += 1
        return item

    def _document(self, p: int, item: int, variant: int, view: int = 0) -> np.ndarray:
        part = self.data.parts[p]
        if part.kind != "pairs":
            return part.docs[item]
        return pair_document(self.vocab, part.image(item, view), part.caption(item, view), variant)

    def _view(self, p: int, item: int) -> int:
        """Which code grid of a pair this epoch shows (0 without augmentation); draws nothing from the generator."""
        k = self.data.parts[p].n_views
        return 0 if k == 1 else (_seed_for(self.seed, "view", p, item) + self._epoch[p]) % k

    def _draw(self) -> tuple[tuple[int, int, int, int], np.ndarray]:
        r0, r1, r2 = torch.rand(3, generator=self._gen, dtype=torch.float64).tolist()
        p = mixture_part(self._cum, r0)
        item = self._take(p)
        part = self.data.parts[p]
        variant = READ
        if part.kind == "pairs":
            variant = pair_variant(len(part.captions[item]) > 0, r1, r2, self.reading_ratio, self.cond_dropout)
        desc = (p, item, variant, self._view(p, item))
        return desc, self._document(*desc)

    def _untrained_prefix(self, desc: tuple[int, int, int, int]) -> int | np.ndarray:
        """How many leading targets of the document get no loss: the image span of a reading example without
        ``reading_image_loss`` (<s> predicts <boi>, ..., the last code predicts <eoi>), else none; for a
        conversation, which of its tokens are trained (``rows.row_arrays``)."""
        p, item, variant, _ = desc
        part = self.data.parts[p]
        if part.trained is not None:
            return part.trained[item]
        if variant == READ and not self.reading_image_loss and part.kind == "pairs":
            return self.vocab.span_length(part.grid(item))
        return 0

    # ------------------------------------------------------------ batches
    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.B):
            row = first_fit_row(self._pending, self._draw, self.T)
            rows.append([(doc, self._untrained_prefix(desc)) for desc, doc in row])
        self.batches += 1
        return batch_of(row_arrays(rows, self.vocab.pad, self.T), self.vocab)

    def sharded(self, rank: int, world: int) -> ShardedBatches:
        return ShardedBatches(self, rank, world)

    # ------------------------------------------------------------ exact resume
    def _signature(self) -> str:
        sig = [PIPELINE_VERSION, self.T, self.B, self.seed, self.reading_ratio, self.cond_dropout, self.reading_image_loss,
               [(p.kind, round(p.weight, 12), len(p)) for p in self.data.parts]]  # not paths: data may move
        views = [p.n_views for p in self.data.parts]
        if any(k > 1 for k in views):  # absent without augmentation: such runs keep their signature
            sig.append(["views", views])
        mirrors = [p.mirrored for p in self.data.parts if p.mirror_captions is not None]
        if mirrors:  # captions of mirrored views exchange words: which views, and the captions they get
            sig.append(["mirror", mirrors, hashlib.sha256(b"".join(c.tobytes() for p in self.data.parts
                                                                     for c in p.mirror_captions or [])).hexdigest()])
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "version": PIPELINE_VERSION,
            "signature": self._signature(),
            "generator": base64.b64encode(self._gen.get_state().numpy().tobytes()).decode("ascii"),
            "epoch": list(self._epoch),
            "pos": list(self._pos),
            "pending": [list(desc) for desc, _ in self._pending],
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("signature") != self._signature():
            raise UserError("the data stream cannot be resumed exactly: the data, the context length, the batch size, "
                            "the seed or the mixture differ from the checkpoint's; resume with the same data and options")
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self._gen.set_state(torch.from_numpy(raw))
        self._epoch = [int(e) for e in state["epoch"]]
        self._pos = [int(p) for p in state["pos"]]
        self._perm = [None] * len(self.data.parts)
        descs = [tuple(d) + (0,) * (4 - len(d)) for d in state["pending"]]  # (part, item, variant[, view])
        self._pending = [(d, self._document(*d)) for d in descs]
        self.batches = int(state["batches"])


class ShardedBatches:
    """One process's rows of every global batch: rows [rank*B/world, (rank+1)*B/world)."""

    def __init__(self, batches: PackedBatches, rank: int, world: int):
        if world < 1 or not 0 <= rank < world or batches.B % world:
            raise ValueError(f"batch size {batches.B} must be divisible by world size {world} (rank {rank})")
        self.batches = batches
        per = batches.B // world
        self.rows = slice(rank * per, (rank + 1) * per)

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {k: v[self.rows] for k, v in next(self.batches).items()}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def training_batches(cfg: DataConfig, *, vocab, image_tokenizer: str | Path, context_len: int, batch_size: int,
                     seed: int, fit_captions: bool = False) -> PackedBatches | StreamedBatches:
    """What the trainer calls: prepare the sources and return the packed global-batch stream (``fit_captions``:
    see ``prepare``); code shards (``earlyfusion encode``) are streamed instead (``stream.StreamedBatches``)."""
    _check_shape(context_len, batch_size)
    specs = resolve_sources(cfg.sources, cfg.split)
    if any(s.stream for s in specs):
        return streamed_batches(cfg, specs, vocab=vocab, context_len=context_len, batch_size=batch_size, seed=seed,
                                image_tokenizer_fingerprint=check_vocab_matches(vocab, image_tokenizer, "training data"),
                                fit_captions=fit_captions)
    data = prepare(cfg, vocab, image_tokenizer, context_len=context_len, seed=seed, fit_captions=fit_captions)
    return PackedBatches(data, vocab, context_len=context_len, batch_size=batch_size, reading_ratio=cfg.reading,
                         cond_dropout=cfg.cond_dropout, reading_image_loss=cfg.reading_image_loss, seed=seed)


def noisy_image_codes(tokens: torch.Tensor, targets: torch.Tensor, image_ids: range, rate: float, *, seed: int,
                      step: int) -> torch.Tensor:
    """``tokens`` with each image code that has a target (an image being drawn) replaced, with probability
    ``rate``, by a uniformly drawn image code. The image of a reading example has no targets unless
    ``reading_image_loss``, so its caption is still read from the true picture. The draw is a function of
    (seed, step) alone: every process and a resumed run make the same one."""
    g = torch.Generator().manual_seed(seed * 1000003 + step)
    code = (tokens >= image_ids.start) & (tokens < image_ids.stop) & (targets != IGNORE)
    hit = code & (torch.rand(tokens.shape, generator=g) < rate)
    return torch.where(hit, torch.randint(image_ids.start, image_ids.stop, tokens.shape, generator=g,
                                          dtype=tokens.dtype), tokens)
