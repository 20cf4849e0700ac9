"""Evaluation of a trained decoder: ``earlyfusion eval``.

* Validation loss per modality on held-out image-caption pairs: image loss on caption->image
  documents (drawing), text loss on image->caption documents (reading), each beside the unigram
  baseline of that modality (the entropy of the held-out tokens' own unigram distribution).
* Reading: greedy caption of every held-out image, parsed back into attributes.
* Drawing: one image per held-out caption (default CFG), judged by ``training.shapes.recognise``,
  an analytic recogniser that does not depend on the model (its accuracy on ground-truth images is tested).
* Tokenizer figures (PSNR, SSIM, codebook usage) of the run's own image tokenizer.

Reading/drawing accuracy needs captions in the built-in data's grammar; for any other imagefolder,
eval reports losses and tokenizer figures and writes caption/generation sheets for a person.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyfusion.checkpoint import save_json
from earlyfusion.errors import UserError
from earlyfusion.logs import log
from earlyfusion.options import MAX_BATCH, MAX_SEED, check_not_file, check_number
from earlyfusion.sampling.generate import DEFAULT_CFG
from earlyfusion.training.monitor import _decode_codes, _sheet, draw_images, read_captions, validation_losses


@dataclass
class EvalConfig:
    checkpoint: str
    """Run directory of `earlyfusion train` (or one of its checkpoints/step-… directories)."""
    data: str
    """Data directory: the built-in data (its test split is used) or an imagefolder directory with captions."""
    json: bool = False
    """Print every figure as one JSON object on the last line."""
    limit: int = 0
    """Evaluate at most this many held-out pairs (0 = all)."""
    cfg: float = DEFAULT_CFG
    """Classifier-free guidance scale for the drawing evaluation (the sampler's default)."""
    image_temperature: float = 0.0
    """Image-code temperature for the drawing evaluation; 0 = greedy (as the reading evaluation is greedy)."""
    batch_size: int = 64
    """Pairs per batch (validation loss, reading and drawing)."""
    seed: int = 0
    """Seed for the drawing samples."""
    out: str = ""
    """Where to write the caption/generation sheets; empty = <checkpoint>/eval."""

    def __post_init__(self):
        check_number("limit", self.limit, 0)
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        check_number("cfg", self.cfg, 0)
        check_number("image-temperature", self.image_temperature, 0)
        check_number("seed", self.seed, 0, MAX_SEED)
        check_not_file("out", self.out)


# ---------------------------------------------------------------- reading and drawing


def _attribute_scores(truths, preds) -> dict[str, float]:
    """Exact-match of the whole scene and per-attribute accuracy (shapes matched by grid position)."""
    exact = sum(t == p for t, p in zip(truths, preds))
    per = Counter()
    n_shapes = 0
    for t, p in zip(truths, preds):
        by_pos = {s.position: s for s in (p or ())}
        for s in t:
            n_shapes += 1
            q = by_pos.get(s.position)
            if q is None:
                continue
            per["position"] += 1
            per["shape"] += q.shape == s.shape
            per["colour"] += q.colour == s.colour
            per["size"] += q.size == s.size
    n = max(len(truths), 1)
    scores = {"exact_match": exact / n, "count_match": sum(len(t) == len(p or ()) for t, p in zip(truths, preds)) / n}
    for k in ("shape", "colour", "size", "position"):
        scores[k] = per[k] / max(n_shapes, 1)
    return scores


# ---------------------------------------------------------------- the command


def evaluate(cfg: EvalConfig) -> dict:
    from earlyfusion.rundir import load_run
    from earlyfusion.training import data as data_mod
    from earlyfusion.training import shapes
    from earlyfusion.training.vq_train import evaluate_tokenizer

    if not Path(cfg.data).expanduser().is_dir():
        what = "is a file, not a directory" if Path(cfg.data).expanduser().exists() else "no such directory"
        raise UserError(f"{cfg.data}: {what}; pass a local data directory (the built-in data or an imagefolder with captions)")
    run = load_run(cfg.checkpoint)
    root = run.path.parent.parent
    out = Path(cfg.out) if cfg.out else root / "eval"
    pairs = data_mod.heldout_pairs([cfg.data], vocab=run.vocab, image_tokenizer=root / "image_tokenizer", limit=cfg.limit)
    if not pairs:
        raise UserError(f"{cfg.data}: no held-out image-caption pairs found; pass the built-in data directory or an imagefolder with captions")
    t0 = time.perf_counter()
    figures: dict = {"pairs": len(pairs), "step": run.config.get("step")}
    figures.update(validation_losses(run.decoder, run.vocab, pairs, batch_size=cfg.batch_size))

    images = torch.stack([p.pixels for p in pairs]) if pairs[0].pixels is not None else None
    if images is not None:
        tok = evaluate_tokenizer(run.vq, images)
        figures.update({"psnr": tok["psnr"], "ssim": tok["ssim"], "codebook_usage": tok["codebook_usage"]})

    reads = read_captions(run.decoder, run.vocab, pairs, batch_size=cfg.batch_size)
    captions = [p.caption for p in pairs]
    drawn = draw_images(run.decoder, run.vocab, run.vq, captions, cfg=cfg.cfg, seed=cfg.seed, batch_size=cfg.batch_size,
                        image_temperature=cfg.image_temperature)
    truths = [shapes.parse_caption(c) for c in captions]
    if all(t is not None for t in truths):
        read_scores = _attribute_scores(truths, [shapes.parse_caption(r) for r in reads])
        draw_scores = _attribute_scores(truths, [shapes.recognise(img) for img in drawn])
        figures["caption_exact_match"] = read_scores.pop("exact_match")
        figures["t2i_exact_match"] = draw_scores.pop("exact_match")
        figures.update({f"caption_{k}": v for k, v in read_scores.items()})
        figures.update({f"t2i_{k}": v for k, v in draw_scores.items()})
    else:
        log.info("captions are not in the built-in grammar: reading/drawing accuracy skipped; see the sheets in %s", out)
        figures["caption_exact_match"] = None
        figures["t2i_exact_match"] = None
    originals = [_decode_codes(run.vq, p.codes) for p in pairs[:16]]
    _sheet([(o, g, p.caption, r) for o, g, p, r in zip(originals, drawn[:16], pairs[:16], reads[:16])], out / "sheet.png")
    figures["eval_seconds"] = time.perf_counter() - t0
    figures["sheet"] = str(out / "sheet.png")
    save_json(out / "figures.json", figures)
    return figures


def format_table(figures: dict) -> str:
    lines = []
    for k, v in figures.items():
        lines.append(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")
    return "\n".join(lines)


def eval_cmd(cfg: EvalConfig) -> int:
    figures = evaluate(cfg)
    print(format_table(figures), file=sys.stderr if cfg.json else sys.stdout)
    if cfg.json:
        print(json.dumps(figures))
    return 0
