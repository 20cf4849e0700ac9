"""What training shows while it runs: validation loss per modality on held-out pairs, a sheet of the
model's readings and drawings, and the loss curves. ``earlyfusion eval`` reuses the same functions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from earlyfusion.core.logs import progress
from earlyfusion.sampling.generate import DEFAULT_CFG, caption_images, draw_captions
from earlyfusion.tokenizer.preprocess import codes_to_pil
from earlyfusion.training.data import IMAGE, TEXT
from earlyfusion.training.lm_loss import TokenLosses

# ---------------------------------------------------------------- losses


def _pair_documents(vocab, pairs, kind: str):
    """(ids, loss modality) per pair: 'draw' = caption->image, loss on the image span after its <boi>; 'read' =
    image->caption, loss on what follows the image span (the caption and </s>)."""
    docs = []
    for p in pairs:
        segs = [p.caption, p.codes] if kind == "draw" else [p.codes, p.caption]
        ids = vocab.encode_document(segs)
        (span,) = vocab.grammar.parse(ids)
        ids_t = torch.tensor(ids, dtype=torch.long)
        mod = torch.full_like(ids_t, -1)
        if kind == "draw":
            mod[span.start + 1:span.end] = IMAGE
        else:
            mod[span.end:] = TEXT
        docs.append((ids_t, mod))
    return docs


@torch.no_grad()
def validation_losses(decoder, vocab, pairs, device="cpu", batch_size: int = 64) -> dict[str, float]:
    """Mean next-token loss on held-out pairs: ``loss_text`` (reading) and ``loss_image`` (drawing),
    with the unigram baselines ``unigram_text`` / ``unigram_image``."""
    decoder.eval()
    losses_of, result = TokenLosses(decoder), {}
    for kind, name, modality in (("read", "text", TEXT), ("draw", "image", IMAGE)):
        docs = _pair_documents(vocab, pairs, kind)
        total, count = 0.0, 0
        counts: Counter = Counter()
        for i in range(0, len(docs), batch_size):
            chunk = docs[i:i + batch_size]
            T = max(len(ids) for ids, _ in chunk)
            tokens = torch.full((len(chunk), T), vocab.pad, dtype=torch.long)
            mods = torch.full((len(chunk), T), -1, dtype=torch.long)
            for r, (ids, mod) in enumerate(chunk):
                tokens[r, :len(ids)] = ids
                mods[r, :len(ids)] = mod
            targets = tokens[:, 1:].to(device)
            sel = mods[:, 1:].to(device) == modality
            ce = losses_of(tokens[:, :-1].to(device), targets)[0]  # the training loss's own cross-entropy
            total += ce[sel].sum().item()
            count += int(sel.sum())
            counts.update(targets[sel].tolist())
        result[f"loss_{name}"] = total / max(count, 1)
        n = sum(counts.values())
        result[f"unigram_{name}"] = -sum(c / n * math.log(c / n) for c in counts.values()) if n else float("nan")
    return result


# ---------------------------------------------------------------- reading and drawing


def read_captions(decoder, vocab, pairs, batch_size: int = 64, device="cpu") -> list[str]:
    """Greedy caption for each pair's image."""

    out = []
    for i in progress(range(0, len(pairs), batch_size), desc="reading"):
        chunk = pairs[i:i + batch_size]
        out.extend(caption_images(decoder, vocab, [p.codes for p in chunk], device=device))
    return out


def draw_images(decoder, vocab, vq, captions, cfg: float, seed: int, batch_size: int = 64, device="cpu",
                image_temperature: float = 0.0, grids=None):
    """One image per caption (PIL), sampled with classifier-free guidance (greedy codes by default); ``grids``: the
    (rows, columns) an image may take with grid tokens (the model chooses; default any the vocabulary holds)."""

    out = []
    for i in progress(range(0, len(captions), batch_size), desc="drawing"):
        out.extend(draw_captions(decoder, vocab, vq, captions[i:i + batch_size], cfg=cfg, seed=seed + i, device=device,
                                 image_temperature=image_temperature, grids=grids))
    return out


# ---------------------------------------------------------------- sheets and curves


def caption_sheet(rows: list[tuple[Image.Image, Image.Image, str, str]], path: Path, scale: int = 3) -> None:
    """One row per example: the test image as tokenized (decoded from the codes the model reads) | generated
    from its caption, with the caption and the model's reading."""
    if not rows:
        return
    w = max(max(o.width, g.width) for o, g, _, _ in rows)  # images of several shapes keep theirs
    h = max(max(o.height, g.height) for o, g, _, _ in rows)
    W, H = w * scale, h * scale
    text_w = 430
    sheet = Image.new("RGB", (2 * W + 3 * 4 + text_w, len(rows) * (H + 4) + 20), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "as tokenized", fill="black")
    draw.text((W + 8, 4), "drawn from caption", fill="black")
    for r, (orig, gen, truth, read) in enumerate(rows):
        y = 20 + r * (H + 4)
        sheet.paste(orig.resize((orig.width * scale, orig.height * scale), Image.NEAREST), (4, y))
        sheet.paste(gen.resize((gen.width * scale, gen.height * scale), Image.NEAREST), (W + 8, y))
        draw.text((2 * W + 14, y + 4), f"caption: {truth}", fill="black")
        draw.text((2 * W + 14, y + 22), f"read:    {read}", fill="darkgreen" if read.strip() == truth.strip() else "red")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def sample_sheet(decoder, vocab, vq, pairs, path: Path, n: int = 6, seed: int = 0, cfg: float = DEFAULT_CFG) -> None:
    """A few held-out pairs: the model's caption of each image and its drawing of each caption."""
    chunk = pairs[:n]
    if not chunk:
        return
    was_training = decoder.training
    decoder.eval()
    rng_state = torch.get_rng_state()  # sampling must not disturb training's RNG stream
    try:
        reads = read_captions(decoder, vocab, chunk)
        drawn = draw_images(decoder, vocab, vq, [p.caption for p in chunk], cfg=cfg, seed=seed)
    finally:
        torch.set_rng_state(rng_state)
        decoder.train(was_training)
    originals = [codes_to_pil(vq, p.codes) for p in chunk]
    caption_sheet([(o, g, p.caption, r) for o, g, p, r in zip(originals, drawn, chunk, reads)], path)


def loss_curves_png(metrics_path: Path, png: Path, size=(720, 420)) -> None:
    """Plot train loss per modality (and validation points) from metrics.jsonl with PIL."""
    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):  # a torn or hostile line: not a record
            continue
    series = {
        "train text": ([r["step"] for r in rows if r.get("loss_text") is not None], [r["loss_text"] for r in rows if r.get("loss_text") is not None], (200, 60, 40)),
        "train image": ([r["step"] for r in rows if r.get("loss_image") is not None], [r["loss_image"] for r in rows if r.get("loss_image") is not None], (40, 90, 200)),
        "val text": ([r["step"] for r in rows if "val_loss_text" in r], [r["val_loss_text"] for r in rows if "val_loss_text" in r], (255, 150, 0)),
        "val image": ([r["step"] for r in rows if "val_loss_image" in r], [r["val_loss_image"] for r in rows if "val_loss_image" in r], (0, 180, 200)),
    }
    ys = [y for _, v, _ in series.values() for y in v if math.isfinite(y)]
    xs = [x for k, _, _ in series.values() for x in k]
    if not ys:
        return
    W, H = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = 0.0, max(ys) * 1.05
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        d.text((5, py(yv) - 6), f"{yv:.2f}", fill="black")
        xv = x0 + (x1 - x0) * i / 5
        d.text((px(xv) - 10, H - bottom + 6), f"{int(xv)}", fill="black")
    d.text((W // 2 - 20, H - 16), "step", fill="black")
    lx = left + 10
    for name, (sx, sy, colour) in series.items():
        pts = [(px(x), py(y)) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts if name.startswith("val") else []:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        if pts:
            d.text((lx, 8), name, fill=colour)
            lx += 110
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)


def tensorboard_writer(out: Path):
    """A TensorBoard writer into RUN/tensorboard, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSONL logging only
        return None
    return SummaryWriter(str(out / "tensorboard"))
