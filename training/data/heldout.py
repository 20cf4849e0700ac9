"""Held-out image-caption pairs, for the validation losses and sheets of training and for ``earlyfusion eval``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.tokenizer.preprocess import preprocess_for_codes, to_pil
from earlyfusion.tokenizer.vocab import check_vocab_matches
from earlyfusion.tokenizer.vq_checkpoint import read_vq_config

from .code_shards import CodeSet, is_code_dir
from .codes import local_image_table, resolve_cache_dir
from .records import SkipReport, has_images_or_metadata, pair_records, split_root, validation_split
from .sources import parse_source


@dataclass
class HeldoutPair:
    caption: str
    codes: torch.Tensor
    """LongTensor (h, w): the image's own grid (any grid up to the vocabulary's with grid tokens)."""
    pixels: torch.Tensor | None
    """(3, h·downsample, w·downsample) float in [-1, 1], the image as the image tokenizer saw it (None for pairs read
    from code shards, which keep only the codes)."""
    path: str
    where: str

    @property
    def image(self):
        """The preprocessed image as PIL."""
        return to_pil(self.pixels)


def check_heldout_split(path: Path, split: str) -> None:
    """UserError unless the data directory ``path`` has the held-out split ``split``: a split folder of an
    imagefolder (or the folder itself when it has no split folders), a code-shard directory ``path/split`` of a
    code-shard directory."""
    if not is_code_dir(path):
        split_root(path, split)
    elif not is_code_dir(path / split):
        raise UserError(f"{path}: no held-out split '{split}' (a code-shard directory {path / split}); encode one with "
                        f"`earlyfusion encode --data SRC --split {split} --image-tokenizer VQ --out {path / split}`")


def code_pairs(root: Path, vocab, image_tokenizer: str | Path, limit: int = 0) -> list[HeldoutPair]:
    """The captioned pairs of the code-shard directory ``root`` (a corpus's held-out split, ``earlyfusion encode
    --split val --out CODES/val``), at most ``limit`` (0: all). Their pixels are not kept in code shards (None)."""
    codes = CodeSet.open(root)
    if codes.kind != "pairs":
        raise UserError(f"{root}: holds {codes.kind} documents; held-out pairs must be image-caption pairs")
    codes.check_tokenizer(check_vocab_matches(vocab, image_tokenizer, "held-out pairs"), vocab.grid_tokens,
                          "this run")
    out = []
    for i, shard in enumerate(codes.shards):
        reader = codes.reader(i)
        grids, captions = reader.read(0, len(reader))
        out += [HeldoutPair(caption=c, codes=torch.from_numpy(g.astype(np.int64)), pixels=None,
                            path=str(root / shard.name), where=f"{root / shard.name}[{k}]")
                for k, (g, c) in enumerate(zip(grids, captions)) if c.strip()]
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def heldout_pairs(sources: Sequence[str], *, vocab, image_tokenizer: str | Path, cache_dir: str | None = None,
                  split: str | None = "test", text_column: str = "text", limit: int = 0, strict: bool = False
                  ) -> list[HeldoutPair]:
    """Captioned images of the held-out split of every local data directory in ``sources``.

    ``DIR/split`` when present (``split=None``: each directory's ``validation_split``, as training validates); a
    plain imagefolder without split folders is used as is (then the pairs are not held out from training, a
    warning says so). For a directory of code shards, ``DIR/split`` must itself be one (``code_pairs``). Files, hub names and directories that have other splits but not the split contribute nothing.
    """
    report = SkipReport(strict=strict)
    out: list[HeldoutPair] = []
    vq_fp = None
    for spec in sources:
        path = Path(parse_source(spec)[0]).expanduser()
        if not path.is_dir():
            continue
        name = split or validation_split(path)
        if is_code_dir(path):
            if is_code_dir(path / name):
                out += code_pairs(path / name, vocab, image_tokenizer, limit - len(out) if limit else 0)
            if limit and len(out) >= limit:
                break
            continue
        try:
            root = split_root(path, name)
        except UserError:
            continue
        if not has_images_or_metadata(root):
            continue
        if root == path:
            log.warning("%s has no '%s' folder: validation uses its own (training) images", path, name)
        vq_fp = vq_fp or check_vocab_matches(vocab, image_tokenizer, "held-out pairs")
        recs = [(w, str(p), t) for w, p, t in pair_records(root, text_column, report) if t and t.strip()]
        if limit:
            recs = recs[:limit - len(out)]
        cache_root = resolve_cache_dir(cache_dir, [str(path)])
        table = local_image_table([p for _, p, _ in recs], [w for w, _, _ in recs], image_tokenizer, vq_fp, cache_root,
                                  strict, grid_tokens=vocab.grid_tokens)
        vq_cfg = None
        for where, p, text in recs:
            row = table.index[p]
            if table.reasons[row]:
                report.add(table.reasons[row], where)
                continue
            if vq_cfg is None:

                vq_cfg = read_vq_config(image_tokenizer)
            codes = torch.from_numpy(table.image(row).astype(np.int64))
            pixels = preprocess_for_codes(p, vq_cfg.image_size, vq_cfg.downsample,
                                          vocab.grid if vocab.grid_tokens else None)
            out.append(HeldoutPair(caption=text, codes=codes, pixels=pixels, path=p, where=where))
            report.ok()
        if limit and len(out) >= limit:
            break
    if report.total:
        log.warning("held-out pairs: %s", report.summary())
    return out
