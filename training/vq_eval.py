"""Evaluating the VQ-VAE image tokenizer: ``earlyfusion tokenizer eval``, and the pieces training shares.

Images are read through ``earlyfusion.training.data.iter_image_text`` (bad files skipped, counted
and reported; ``strict`` fails instead), preprocessed to the tokenizer's size and kept in memory as
uint8. The figures: PSNR (mean over images and from the pooled squared error), SSIM, codebook usage,
code perplexity and encode + decode speed. ``reconstruction_sheet`` draws originals over their
reconstructions (training writes one every ``--sheet-every`` steps).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.options import MAX_BATCH, check_number
from earlyfusion.core.runtime import use_all_cores
from earlyfusion.tokenizer.preprocess import ImageError, image_grid, preprocess_for_codes, to_pil
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.training.data import SkipReport, iter_image_text

# ---------------------------------------------------------------- options


@dataclass
class VQEvalConfig:
    checkpoint: str
    """Image tokenizer run directory (from `earlyfusion tokenizer train`) or one of its checkpoints/step-* directories."""
    data: str
    """Evaluation images: a directory from `earlyfusion data shapes` or `data photos`, an imagefolder directory, or a hub
    data set name."""
    split: str = "test"
    """Split of --data to evaluate on (held out)."""
    image_column: str = "image"
    """Image column of a hub data set."""
    batch_size: int = 64
    """Images per encode/decode batch."""
    limit: int = 0
    """Evaluate at most this many images (0 = all)."""
    json: bool = False
    """Also print the figures as one JSON object on the last line of stdout."""
    allow_outside_paths: bool = False
    """Read image files that lie outside the data directory (listed by absolute path or '..', or reached through a
    symbolic link out of it, as in a hub download folder whose files link into a shared cache); off, such records are
    skipped and counted as outside_data_dir."""

    def __post_init__(self):
        if Path(self.checkpoint).is_file():
            raise ValueError(f"--checkpoint {self.checkpoint} is a file; pass the run directory of `earlyfusion tokenizer train`")
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        check_number("limit", self.limit, 0)


# ---------------------------------------------------------------- images


def load_images(data: str, size: int, *, split: str = "train", image_column: str = "image",
                strict: bool = False, limit: int = 0, max_grid: tuple[int, int] | None = None, downsample: int = 1,
                allow_outside: bool = False):
    """All images of a split as uint8 (N, 3, size, size), plus the SkipReport of records that were skipped. With
    ``max_grid`` each image is instead resized whole to the largest grid of ``downsample``-pixel codes that keeps
    its shape (as a vocabulary with grid tokens encodes it), and the images come as a list of (3, h, w)."""

    report = SkipReport(strict=strict)
    rows: list[torch.Tensor] = []
    for i, (img, _text) in enumerate(iter_image_text(data, image_column=image_column,
                                                     split=split, report=report, strict=strict, shrink_to=size,
                                                     allow_outside=allow_outside)):
        try:
            t = preprocess_for_codes(img, size, downsample, max_grid)  # (3, size, size) or (3, h, w) in [-1, 1]
        except ImageError as e:
            report.add(e.reason, f"{data} [{split}] record {i}", str(e))  # raises in strict mode
            continue
        rows.append(((t + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{data}: no usable images in split {split!r}"
                        + (f" ({report.summary()})" if report.total else "")
                        + "; pass a directory from `earlyfusion data shapes`, an imagefolder directory or a hub data set name")
    return (rows if max_grid is not None else torch.stack(rows)), report


def to_pixels(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1] (exactly what preprocess returned)."""
    return batch_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------- metrics


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images: gaussian window (11, σ 1.5),
    K1 0.01, K2 0.03, statistics per channel over valid positions, mean over channels and positions.
    The window shrinks (odd) for images smaller than 11 px. Returns (B,)."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    k = min(window, a.shape[-2], a.shape[-1])
    k -= 1 - k % 2
    w = _gaussian_window(k, sigma).to(a.device).expand(C, 1, k, k)

    def filt(t):
        return F.conv2d(t, w, groups=C)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1] (capped at 100 dB for identical images)."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).float()


def code_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of codebook entries used, perplexity exp(H)) of a code histogram (K,)."""
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    nz = p[p > 0]
    return float((counts > 0).double().mean()), float(torch.exp(-(nz * nz.log()).sum()))


@torch.no_grad()
def _batches(images, batch_size: int):
    """Batches of ``images``: slices of one (N, 3, H, W) tensor, or stacks of same-shape images from a sequence of
    (3, H, W) tensors (images of several shapes, as with grid tokens)."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for im in images:
        by_shape.setdefault(tuple(im.shape), []).append(im)
    for group in by_shape.values():
        for i in range(0, len(group), batch_size):
            yield torch.stack(group[i:i + batch_size])


def evaluate_tokenizer(model: VQVAE, images, batch_size: int = 64) -> dict:
    """Reconstruction quality and code statistics of ``model`` on ``images``.

    images: (N, 3, S, S) float in [-1, 1] or uint8, or a sequence of (3, H, W) images of any shapes (each a multiple
    of the downsampling; encoded in batches of one shape). Returns psnr (dB, mean over images, pixels in
    [0, 1]), psnr_global (from the mean squared error over the whole set), ssim, codebook_usage
    (fraction of codebook entries used over the whole set), perplexity (of the code distribution),
    images_per_s (encode + decode), num_images.
    """
    if len(images) == 0 or (isinstance(images, torch.Tensor) and images.ndim != 4):
        raise ValueError(f"expected images (N, 3, S, S) with N >= 1, got {tuple(getattr(images, 'shape', ()))}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = model.cfg.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    psnrs, ssims, sq, values = [], [], 0.0, 0
    seconds = 0.0
    try:
        for chunk in _batches(images, batch_size):
            x = to_pixels(chunk) if chunk.dtype == torch.uint8 else chunk.float()
            x = x.to(device)
            t0 = time.perf_counter()
            codes = model.encode(x)  # (b, h, w)
            rec = model.decode(codes)  # (b, 3, S, S) in [-1, 1]
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            a, b = (x.clamp(-1, 1) + 1) / 2, (rec + 1) / 2  # [0, 1]
            psnrs.append(psnr(a, b).cpu())
            ssims.append(ssim(a, b).cpu())
            sq += float((a.double() - b.double()).square().sum())
            values += a.numel()
            counts += torch.bincount(codes.flatten().cpu(), minlength=K)
    finally:
        model.train(was_training)
    n = len(images)
    mse = sq / values
    usage, ppl = code_stats(counts)
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "psnr_global": 10 * math.log10(1.0 / max(mse, 1e-10)),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": usage,
        "codes_used": int((counts > 0).sum()),
        "perplexity": ppl,
        "images_per_s": n / max(seconds, 1e-9),
        "num_images": n,
    }


# ---------------------------------------------------------------- sheet


@torch.no_grad()
def reconstruction_sheet(model: VQVAE, images_u8: torch.Tensor | list[torch.Tensor], path: Path, scale: int = 4) -> None:
    """PNG: a row of originals over a row of their reconstructions (nearest-upscaled ``scale``×); a list of images
    of several shapes is encoded one by one, each at its own shape."""


    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        if isinstance(images_u8, torch.Tensor):
            rec = list(model.decode(model.encode(to_pixels(images_u8).to(device))).cpu())
        else:
            rec = [model.decode(model.encode(to_pixels(t[None]).to(device)))[0].cpu() for t in images_u8]
    finally:
        model.train(was_training)

    def big(t):
        return to_pil(t).resize((t.shape[-1] * scale, t.shape[-2] * scale), Image.NEAREST)

    tiles = [big(to_pixels(t)) for t in images_u8] + [big(t) for t in rec]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image_grid(tiles, ncols=len(images_u8)).save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------- the command


def format_table(fig: dict, where: str, data: str, split: str) -> str:
    rows = [
        ("image tokenizer", where),
        ("data", f"{data} [{split}], {fig['num_images']} images"),
        ("PSNR", f"{fig['psnr']:.2f} dB (mean over images; {fig['psnr_global']:.2f} dB from the pooled MSE)"),
        ("SSIM", f"{fig['ssim']:.4f}"),
        ("codebook usage", f"{fig['codebook_usage']:.1%} ({fig['codes_used']} of {fig['codebook_size']} codes)"),
        ("code perplexity", f"{fig['perplexity']:.1f}"),
        ("speed", f"{fig['images_per_s']:.0f} images/s (encode + decode)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def eval_cmd(cfg: VQEvalConfig) -> int:
    use_all_cores()
    model = load_vqvae(cfg.checkpoint)
    images, report = load_images(cfg.data, model.cfg.image_size, split=cfg.split, image_column=cfg.image_column,
                                 limit=cfg.limit, allow_outside=cfg.allow_outside_paths)
    if report.total:
        log.info("skipped %d unreadable image(s): %s", report.total, report.summary())
    fig = evaluate_tokenizer(model, images, batch_size=cfg.batch_size)
    fig["codebook_size"] = model.cfg.codebook_size
    print(format_table(fig, cfg.checkpoint, cfg.data, cfg.split), flush=True)
    if cfg.json:
        print(json.dumps(fig), flush=True)
    return 0
