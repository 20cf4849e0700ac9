"""Evaluation of a trained decoder: ``earlyfusion eval``, on the built-in data or any imagefolder with captions.

* Validation loss per modality on held-out image-caption pairs: image loss on caption->image
  documents (drawing), text loss on image->caption documents (reading), each beside the unigram
  baseline of that modality (the entropy of the held-out tokens' own unigram distribution).
* Reading: greedy caption of every held-out image, scored against the image's own caption: exact
  match, corpus BLEU-4 and CIDEr-D (``earlyfusion.scores``, which documents the tokenisation). Every
  reading is written to ``<out>/readings.json`` (image, text, read) for scores of your own.
* Drawing: one image per held-out caption (default CFG), every one written as a PNG named by its index
  and caption to ``--images-out`` (default ``<out>/drawn``) with a metadata.jsonl (file_name, text), so
  that the folder is itself a captioned imagefolder for a judge of your own (FID, a classifier).
* Copies: the fraction of drawings whose code grid equals a training image's, and the mean best
  overlap (``earlyfusion.copies``).
* Tokenizer figures (PSNR, SSIM, codebook usage) of the run's own image tokenizer on the held-out images.

Captions in the built-in data's grammar are also parsed back into attributes: caption exact match is then
the parsed scene's (every attribute of every shape right), and the drawings are judged by
``training.shapes_judge.recognise``, an analytic recogniser that does not depend on the model (its accuracy on
ground-truth images is tested), giving the text->image figures. For any other captions, exact match
compares the words and there is no text->image judge (``t2i_exact_match`` is None).

On a ``data photos`` set (recognised by its photos.json) eval reads its ``val`` split when there is one: new
crops of the training photographs, so that reading and drawing can be scored by photograph
(``earlyfusion.photo_judge``): ``photo_caption_accuracy`` (the greedy caption names the crop's photograph),
``photo_drawn_accuracy`` (a classifier trained on the real training crops takes the drawing for a crop of the
captioned photograph), beside that classifier's accuracy on the real crops (``photo_judge_real_accuracy``, the
ceiling) and on the image tokenizer's reconstructions of them (``photo_judge_recon_accuracy``, the ceiling for
anything drawn in its codes). They are None for other data, and for photographs the training split lacks.

Where the held-out captions form a closed set of the training split's captions (``earlyfusion.class_judge``: a few
distinct captions, each a class, as ``data digits`` and ``data photos`` write), reading and drawing are also scored
by class, beside a linear classifier on the raw training pixels (``class_linear_accuracy``, what the split allows the
simplest reader): ``class_caption_accuracy``, ``class_drawn_accuracy`` and the judge's ceilings; None otherwise.

With a run trained on conversations and held-out conversations beside the data (``conversations_test.json``, as
``data shapes --num-conversations`` writes), the test split's eval also scores them (``earlyfusion.chat_eval``:
``vqa_exact_match``, ``multi_image_accuracy``, ``edit_accuracy``, ...). ``--data`` may also be a file of
conversations alone (any LLaVA ``.json`` / ``.jsonl``): then only its answers are scored (exact match, BLEU-4,
CIDEr-D; the built-in kinds' figures where its answers carry kinds) and every drawn answer is written out.
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from earlyfusion.chat_eval import CONVERSATIONS_TEST, conversation_figures, read_conversations
from earlyfusion.class_judge import class_figures
from earlyfusion.copies import (
    CodeRecorder,
    TrainingGrids,
    best_overlap,
    copy_figures,
    encode_drawings,
    flatten_grids,
    novel_two_shape,
    recorded_sources,
    training_grids,
)
from earlyfusion.core.checkpoint import atomic_dir, save_json
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.options import MAX_BATCH, MAX_SEED, check_not_file, check_number
from earlyfusion.core.rundir import IMAGE_TOKENIZER_DIR, run_lock
from earlyfusion.core.runtime import mixed_precision
from earlyfusion.photo_judge import load_split, photo_of_caption, pil_batch, read_photos_info, train_judge
from earlyfusion.sampling.generate import DEFAULT_CFG
from earlyfusion.scores import cider_d, corpus_bleu, exact_match, tokenize
from earlyfusion.tokenizer.preprocess import codes_to_pil
from earlyfusion.training import data as data_mod
from earlyfusion.training import shapes
from earlyfusion.training.data import DataConfig, SkipReport
from earlyfusion.training.data.augment import NO_AUGMENT
from earlyfusion.training.data.conversations import is_conversation_file
from earlyfusion.training.data.records import SPLIT_DIRS, has_images_or_metadata, pair_records
from earlyfusion.training.data.runs import load_run, trained_grids
from earlyfusion.training.monitor import caption_sheet, draw_images, read_captions, validation_losses
from earlyfusion.training.shapes import parse_picture, picture_of
from earlyfusion.training.shapes_judge import recognise
from earlyfusion.training.vq_eval import evaluate_tokenizer


@dataclass
class EvalConfig:
    checkpoint: str
    """Run directory of `earlyfusion train` (or one of its checkpoints/step-… directories)."""
    data: str
    """Data directory: the built-in data (its test split is used) or an imagefolder directory with captions; or a
    file of conversations (LLaVA .json / .jsonl), scored alone."""
    split: str = "auto"
    """Split folder of --data to evaluate: auto = `val` for a `data photos` set that has one (new crops of the
    training photographs, which the which-photograph figures need), else `test`. Name another (test, val, ...)
    to choose it; a photos set's `test` split measures photographs never trained on, with no which-photograph
    figures."""
    json: bool = False
    """Print every figure as one JSON object on the last line."""
    limit: int = 0
    """Evaluate at most this many held-out pairs (0 = all)."""
    cfg: float = DEFAULT_CFG
    """Classifier-free guidance scale for the drawing evaluation (the sampler's default)."""
    image_temperature: float | None = None
    """Image-code temperature for the drawing evaluation; 0 = greedy. Unset = greedy for captions in the built-in
    data's grammar (one right picture per caption, judged exactly) and 1.0 for other captions, which describe many
    pictures: greedy decoding draws the same picture for every crop of a photograph, a flat mode of them."""
    batch_size: int = 64
    """Pairs per batch (validation loss, reading and drawing)."""
    seed: int = 0
    """Seed for the drawing samples."""
    out: str = ""
    """Where to write figures.json and the caption/generation sheet; empty = <checkpoint>/eval."""
    images_out: str = ""
    """Where to write every drawn image (NNNNN-<caption>.png, with metadata.jsonl of file_name and text: an
    imagefolder for a judge of your own); empty = <out>/drawn. Replaced on each run; a folder that holds
    anything else is refused."""
    train_data: list[str] = field(default_factory=list)
    """Training data to look for copies of the drawings in (what `train --data` was given); default: the data the
    run recorded. Give it when that data has moved."""

    def __post_init__(self):
        check_number("limit", self.limit, 0)
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        check_number("cfg", self.cfg, 0)
        if self.image_temperature is not None:
            check_number("image-temperature", self.image_temperature, 0)
        check_number("seed", self.seed, 0, MAX_SEED)
        check_not_file("out", self.out)
        check_not_file("images-out", self.images_out)
        if not self.split.strip() or any(c in self.split for c in "/\\") or self.split in (".", ".."):
            raise ValueError(f"--split must name a split folder of --data (auto, test, val, ...), got {self.split!r}")
        if isinstance(self.train_data, str):
            self.train_data = [self.train_data]
        if any(not isinstance(s, str) or not s.strip() for s in self.train_data):
            raise ValueError("--train-data needs data sources as given to `train --data`")


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


# ---------------------------------------------------------------- what went wrong with the data


def _no_pairs(data: Path, split: str) -> UserError:
    """Why a data directory gave no held-out pairs, as one line."""

    head = f"{data}: no held-out image-caption pairs"
    if (data / split).is_dir():
        root = data / split
    else:
        others = sorted(d.name for d in data.iterdir() if d.is_dir() and d.name in SPLIT_DIRS)
        if others:
            return UserError(f"{head}: it has no '{split}' folder (found: {', '.join(others)}); eval reads "
                             f"DIR/{split} (choose another with --split), or a folder of captioned images itself")
        root = data
    if not has_images_or_metadata(root):
        return UserError(f"{head}: {root} holds no images (an empty split); pass the built-in data directory or an "
                         "imagefolder with captions")
    recs = list(pair_records(root, "text", SkipReport()))
    captioned = sum(bool(t and t.strip()) for _, _, t in recs)
    if not captioned:
        return UserError(f"{head}: the {len(recs)} image(s) in {root} have no captions; add a metadata.jsonl with "
                         "file_name and text for each image")
    return UserError(f"{head}: none of the {captioned} captioned image(s) in {root} could be read (missing or not "
                     "images: see the warning above)")


# ---------------------------------------------------------------- drawn images and copies

DRAWN_MARKER = "drawn.json"  # written into --images-out; a folder holding it may be replaced
_SLUG_CHARS = 60


def drawn_file_names(captions: list[str]) -> list[str]:
    """One file name per caption: its index (zero-padded, which makes them unique) and its words in ASCII."""
    width = max(5, len(str(len(captions) - 1)))
    names = []
    for i, caption in enumerate(captions):
        ascii_words = unicodedata.normalize("NFKD", " ".join(tokenize(caption))).encode("ascii", "ignore").decode()
        slug = "-".join(ascii_words.split())[:_SLUG_CHARS].rstrip("-") or "untitled"
        names.append(f"{i:0{width}d}-{slug}.png")
    return names


def sheet_rows(captions: list[str], n: int = 16) -> list[int]:
    """Which pairs the sheet shows: up to ``n``, spread over the distinct captions (the first pair of each caption in
    order, then the second of each, ...), so that a split of few captions (a photograph each) shows them all."""
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_caption.setdefault(c, []).append(i)
    rows: list[int] = []
    for k in range(max((len(v) for v in by_caption.values()), default=0)):
        rows += [v[k] for v in by_caption.values() if k < len(v)]
        if len(rows) >= n:
            break
    return rows[:n]


def _check_images_out(path: Path) -> None:
    """Refuse a folder that holds anything but what an earlier eval wrote there (before any work is done)."""
    if path.is_dir() and any(path.iterdir()) and not (path / DRAWN_MARKER).is_file():
        raise UserError(f"--images-out {path} holds files that eval did not write; choose another directory or empty it")


def write_drawn(path: Path, images: list, captions: list[str], extra: list[dict], about: dict) -> None:
    """The drawn images as an imagefolder (PNG + metadata.jsonl with file_name, text and ``extra`` per image),
    replacing the folder as a whole once it is complete."""
    with atomic_dir(path) as tmp:
        rows = []
        for name, image, caption, more in zip(drawn_file_names(captions), images, captions, extra):
            image.save(tmp / name)
            rows.append(json.dumps({"file_name": name, "text": caption, **more}))
        (tmp / "metadata.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        save_json(tmp / DRAWN_MARKER, {**about, "images": len(rows)})


def _recorded_augment(config: dict):
    """The augmentation the run trained with (its augmented views are training grids too); none when it records
    none or options this version cannot read."""

    train = config.get("train") or {}
    data = train.get("data") or {}
    names = ("augment_views", "augment_scale", "augment_flip", "augment_flip_words")
    try:
        options = DataConfig(["recorded"], **{k: data[k] for k in names if k in data})
        return options.augment(int(train.get("seed") or 0))
    except (TypeError, ValueError) as e:
        log.warning("copy rate: the run's augmentation options cannot be read (%s); its augmented views are not "
                    "compared", e)
        return NO_AUGMENT


def _reference(cfg: EvalConfig, run) -> TrainingGrids | None:
    """The training grids for the copy rate; None (with a warning) when the run's recorded data cannot be read."""
    sources, data = recorded_sources(run.config)
    options = {"vocab": run.vocab, "image_tokenizer": run.path.parent.parent / IMAGE_TOKENIZER_DIR,
               "split": data.get("split") or "train", "text_column": data.get("text_column") or "text",
               "allow_outside_paths": bool(data.get("allow_outside_paths")), "augment": _recorded_augment(run.config)}
    if cfg.train_data:
        return training_grids(cfg.train_data, **options)
    if not sources:
        log.warning("the run records no training data: no copy rate; pass --train-data")
        return None
    try:
        return training_grids(sources, cache_dir=data.get("cache_dir"), **options)
    except UserError as e:
        log.warning("no copy rate: the run's training data cannot be read (%s); pass --train-data", e)
        return None


def _copies(run, reference: TrainingGrids | None, drawn: list, recorder: CodeRecorder, captions: list[str],
            grammar: bool) -> tuple[dict, list[dict]]:
    """The copy figures, and per drawing its best overlap, closest training image and whether it counts."""
    if reference is None:
        return copy_figures(torch.zeros(0), []) | {"copy_reference_images": 0}, [{} for _ in drawn]
    if len(recorder.grids) == len(drawn):
        grids = recorder.grids  # the (h, w) codes the sampler chose
    else:  # drawings that did not come from the sampler: their codes as the image tokenizer reads them
        grids = encode_drawings(run.vq, drawn, run.vocab)
    if run.vocab.grid_tokens:  # grids of several shapes: each compared with the training grids of its own shape
        codes, shapes = flatten_grids(grids, reference.codes.shape[1])
        overlap, rows = best_overlap(codes, reference.codes, shapes, reference.grids)
    else:
        overlap, rows = best_overlap(torch.stack(grids).flatten(1), reference.codes)
    counted = novel_two_shape(captions, reference.captions) if grammar else [True] * len(drawn)
    figures = copy_figures(overlap, counted) | {"copy_reference_images": len(reference.srcs)}
    per = [{"best_overlap": round(float(o), 6), "closest_training_image": reference.srcs[r] if r >= 0 else None,
            "counted": c} for o, r, c in zip(overlap, rows.tolist(), counted)]
    return figures, per


def _picture_figures(captions: list[str], reads: list[str], drawn: list, scenes: list) -> dict:
    """Built-in data of several picture shapes: whether readings and drawings get the picture's shape (square, wide,
    tall) right, and the exact matches again per shape, the shape included."""

    truth = [parse_picture(c) for c in captions]
    read = [parse_picture(r) for r in reads]
    seen = [(picture_of(*img.size), s) for img, s in zip(drawn, scenes)]
    n = len(truth)
    figures = {"caption_picture": sum(r is not None and r[0] == t[0] for r, t in zip(read, truth)) / n,
               "t2i_picture": sum(d[0] == t[0] for d, t in zip(seen, truth)) / n, "by_picture": {}}
    for picture in sorted({t[0] for t in truth}):
        idx = [i for i, t in enumerate(truth) if t[0] == picture]
        figures["by_picture"][picture] = {
            "pairs": len(idx),
            "caption_exact_match": sum(read[i] == truth[i] for i in idx) / len(idx),
            "t2i_exact_match": sum(seen[i] == truth[i] for i in idx) / len(idx),
            "t2i_picture": sum(seen[i][0] == picture for i in idx) / len(idx)}
    return figures


# ---------------------------------------------------------------- which photograph (data photos)

PHOTO_KEYS = ("photo_pairs", "photo_caption_accuracy", "photo_drawn_accuracy", "photo_judge_real_accuracy",
              "photo_judge_recon_accuracy")
JUDGE_SEED = 0  # one judge for every eval of a data set, whatever --seed the drawings use


def _eval_split(choice: str, data: Path, photos: dict | None) -> str:
    if choice != "auto":
        return choice
    if photos is None:
        return "test"
    if (data / "val").is_dir():
        return "val"
    log.info("%s is a photos data set without a val split: no which-photograph figures; write one with "
             "`earlyfusion data photos --val-crops N`", data)
    return "test"


@torch.no_grad()
def _reconstructions(vq, pairs, batch_size: int) -> torch.Tensor:
    """The image tokenizer's decoding of each pair's codes, rounded to 8 bits as a saved image is: (N, 3, H, W)."""
    out = [vq.decode(torch.stack([p.codes for p in pairs[i:i + batch_size]]).long()).float().cpu()
           for i in range(0, len(pairs), batch_size)]
    return torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1)


def _photo_figures(data: Path, photos: dict | None, run, pairs, reads: list[str], drawn: list,
                   batch_size: int) -> tuple[dict, list[dict]]:
    """Which-photograph accuracy of the readings and, by a judge trained on the real training crops, of the
    drawings (None where there is nothing to judge), and per drawing the photograph the judge saw in it."""
    figures = dict.fromkeys(PHOTO_KEYS)
    if photos is None:
        return figures, [{} for _ in drawn]
    captions = photos["captions"]
    train = set((photos.get("split") or {}).get("train") or ())
    truth = [photo_of_caption(p.caption, captions) for p in pairs]
    known = [i for i, t in enumerate(truth) if t in train]
    if not known:
        log.info("none of the evaluated crops is of a training photograph: no which-photograph figures (evaluate "
                 "the val split)")
        return figures, [{} for _ in drawn]
    labels = [truth[i] for i in known]
    real = [pairs[i] for i in known]
    size = drawn[0].size[0]
    images, names, skipped = load_split(data / "train", {n: captions[n] for n in sorted(train) if n in captions}, size)
    if skipped:
        log.warning("photo judge: %d row(s) of %s skipped (another caption, or not a readable image)", skipped,
                    data / "train")
    if len(set(names)) < 2:
        log.warning("photo judge: %s holds crops of fewer than two photographs: no judge of the drawings",
                    data / "train")
        judge = None
    else:
        judge = train_judge(images, names, seed=JUDGE_SEED)
    figures["photo_pairs"] = len(known)
    figures["photo_caption_accuracy"] = sum(photo_of_caption(reads[i], captions) == truth[i] for i in known) / len(known)
    per = [{} for _ in drawn]
    if judge is not None:
        seen = judge.predict(pil_batch([drawn[i] for i in known]))
        figures["photo_drawn_accuracy"] = sum(s == t for s, t in zip(seen, labels)) / len(known)
        if real[0].pixels is not None:
            figures["photo_judge_real_accuracy"] = judge.accuracy(torch.stack([p.pixels for p in real]), labels)
        figures["photo_judge_recon_accuracy"] = judge.accuracy(_reconstructions(run.vq, real, batch_size), labels)
        for i, s in zip(known, seen):
            per[i] = {"judged_photo": s}
    return figures, per


# ---------------------------------------------------------------- the command


def _outputs(cfg: EvalConfig, run) -> tuple[Path, Path]:
    """(--out, --images-out) with their defaults; a drawings folder eval did not write is refused before any work."""
    out = Path(cfg.out) if cfg.out else run.path.parent.parent / "eval"
    images_out = Path(cfg.images_out) if cfg.images_out else out / "drawn"
    _check_images_out(images_out)
    return out, images_out


def _conversations_only(cfg: EvalConfig, path: Path) -> dict:
    """A file of conversations scored alone: its answers, and every drawn answer written to
    ``<images-out>/answers`` (the folder replaced as a whole, as eval's drawings are)."""
    records, report = read_conversations(path, cfg.limit)
    if not records:
        raise UserError(f"{cfg.data}: no conversation in it can be read "
                        f"({report.summary() if report.records else 'it is empty'}); see docs/conversations.md for the format")
    unused = [flag for flag, given in (("--split", cfg.split != "auto"), ("--cfg", cfg.cfg != DEFAULT_CFG),
                                       ("--image-temperature", cfg.image_temperature is not None),
                                       ("--train-data", bool(cfg.train_data))) if given]
    if unused:
        log.warning("%s: a file of conversations is scored alone (greedy answers); %s not used", cfg.data,
                    ", ".join(unused))
    run = load_run(cfg.checkpoint)
    run.vocab.chat_id("eot")  # a vocabulary without the conversation markers: one line
    out, images_out = _outputs(cfg, run)
    with run_lock(out, "eval"), atomic_dir(images_out) as tmp:
        t0 = time.perf_counter()
        figures: dict = {"step": run.config.get("step"), "data": str(path)}
        figures.update(conversation_figures(run.decoder, run.vocab, run.vq, records, out=tmp / "answers"))
        save_json(tmp / DRAWN_MARKER, {"generator": "earlyfusion eval", "checkpoint": str(run.path), "data": str(path),
                                       "answers": figures["answers"]})
        figures["images_out"] = str(images_out / "answers")
        figures["eval_seconds"] = time.perf_counter() - t0
        save_json(out / "figures.json", figures)
        return figures


def evaluate(cfg: EvalConfig) -> dict:

    data = Path(cfg.data).expanduser()
    if data.is_file() and is_conversation_file(data):
        return _conversations_only(cfg, data)
    if not data.is_dir():
        what = "is a file, not a directory" if data.exists() else "no such directory"
        raise UserError(f"{cfg.data}: {what}; pass a local data directory (the built-in data or an imagefolder with "
                        "captions) or a file of conversations (LLaVA .json / .jsonl)")
    run = load_run(cfg.checkpoint)
    root = run.path.parent.parent
    out, images_out = _outputs(cfg, run)
    # one eval at a time writes into an output directory: two would interleave their files (the drawings, the
    # sheet and figures.json of different runs side by side)
    with run_lock(out, "eval"):
        photos = read_photos_info(data)
        split = _eval_split(cfg.split, data, photos)
        pairs = data_mod.heldout_pairs([cfg.data], vocab=run.vocab, image_tokenizer=root / IMAGE_TOKENIZER_DIR, split=split,
                                       limit=cfg.limit)
        if not pairs:
            raise _no_pairs(data, split)
        t0 = time.perf_counter()
        reference = _reference(cfg, run)
        figures: dict = {"pairs": len(pairs), "step": run.config.get("step"), "split": split}
        figures.update(validation_losses(run.decoder, run.vocab, pairs, batch_size=cfg.batch_size))

        images = [p.pixels for p in pairs] if pairs[0].pixels is not None else None
        if images is not None:  # one tensor when every image has one shape, else the images (grid tokens)
            same = len({tuple(im.shape) for im in images}) == 1
            tok = evaluate_tokenizer(run.vq, torch.stack(images) if same else images)
            figures.update({"psnr": tok["psnr"], "ssim": tok["ssim"], "codebook_usage": tok["codebook_usage"]})

        reads = read_captions(run.decoder, run.vocab, pairs, batch_size=cfg.batch_size)
        captions = [p.caption for p in pairs]
        truths = [shapes.parse_caption(c) for c in captions]
        grammar = all(t is not None for t in truths)
        temperature = cfg.image_temperature if cfg.image_temperature is not None else (0.0 if grammar else 1.0)
        figures["image_temperature"] = temperature
        recorder = CodeRecorder(run.vq)
        drawn = draw_images(run.decoder, run.vocab, recorder, captions, cfg=cfg.cfg, seed=cfg.seed,
                            batch_size=cfg.batch_size, image_temperature=temperature, grids=trained_grids(run) or None)
        if grammar:
            read_scores = _attribute_scores(truths, [shapes.parse_caption(r) for r in reads])
            scenes = [recognise(img) for img in drawn]
            draw_scores = _attribute_scores(truths, scenes)
            figures["caption_exact_match"] = read_scores.pop("exact_match")
            figures["t2i_exact_match"] = draw_scores.pop("exact_match")
            figures.update({f"caption_{k}": v for k, v in read_scores.items()})
            figures.update({f"t2i_{k}": v for k, v in draw_scores.items()})
            if run.vocab.grid_tokens:
                figures.update(_picture_figures(captions, reads, drawn, scenes))
        else:
            log.info("captions are not in the built-in grammar: no text->image judge; the drawings are in %s", images_out)
            figures["caption_exact_match"] = exact_match(reads, captions)
            figures["t2i_exact_match"] = None
        figures["caption_bleu4"] = corpus_bleu(reads, captions)
        figures["caption_cider"] = cider_d(reads, captions)

        copies, per_image = _copies(run, reference, drawn, recorder, captions, grammar)
        figures.update(copies)
        which, judged = _photo_figures(data, photos, run, pairs, reads, drawn, cfg.batch_size)
        figures.update(which)
        per_image = [a | b for a, b in zip(per_image, judged)]
        which, judged = class_figures(data / "train", captions, reads, torch.stack(images) if images and same else None,
                                      drawn, lambda: _reconstructions(run.vq, pairs, cfg.batch_size))
        figures.update(which)
        per_image = [a | b for a, b in zip(per_image, judged)]
        about = {"generator": "earlyfusion eval", "checkpoint": str(run.path), "data": str(data), "cfg": cfg.cfg,
                 "seed": cfg.seed, "image_temperature": temperature}
        write_drawn(images_out, drawn, captions, per_image, about)
        conversations = data / CONVERSATIONS_TEST
        if split == "test" and conversations.is_file() and run.vocab.chat:  # held-out conversations beside the split
            records, report = read_conversations(conversations, cfg.limit)
            if not records:
                log.warning("%s: no conversation in it can be read (%s); its answers are not scored", conversations,
                            report.summary() if report.records else "it is empty")
            figures.update(conversation_figures(run.decoder, run.vocab, run.vq, records, out=images_out / "answers"))
        figures["images_out"] = str(images_out)
        figures["drawn_images"] = len(drawn)
        save_json(out / "readings.json", [{"image": p.path, "text": p.caption, "read": r} for p, r in zip(pairs, reads)])
        figures["readings"] = str(out / "readings.json")
        rows = sheet_rows(captions)
        caption_sheet([(codes_to_pil(run.vq, pairs[i].codes), drawn[i], pairs[i].caption, reads[i]) for i in rows],
               out / "sheet.png")
        figures["eval_seconds"] = time.perf_counter() - t0
        device_type = next(run.decoder.parameters()).device.type
        figures["sampling_precision"] = "bf16" if mixed_precision("auto", device_type)[0] == "bf16" else "fp32"
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
