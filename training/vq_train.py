"""Training and evaluating the VQ-VAE image tokenizer: ``earlyfusion tokenizer train`` / ``tokenizer eval``.

Training: one accelerate loop (the same script runs on one CPU and under ``accelerate launch``).
Images are read once through ``training.sources.iter_image_text`` (bad files skipped, counted and
reported at the end; ``--strict`` fails instead), preprocessed to the preset's size and kept in
memory as uint8. Loss = reconstruction (L1 by default) + the quantizer's commitment loss. The
progress bar shows the loss, codebook usage (codes seen in a sliding window of recent steps ÷
codebook size, as LlamaGen measures it) and the code perplexity of the batch.

RUN layout:

    RUN/config.json, RUN/model.safetensors   latest weights (what --image-tokenizer RUN loads)
    RUN/checkpoints/step-XXXXXXXX/           weights + config + state.{json,safetensors}, MANIFEST.json
    RUN/metrics.jsonl                        one JSON line per optimizer step
    RUN/reconstructions.png                  latest sheet: originals over reconstructions
    RUN/sheets/step-XXXXXXXX.png             the periodic sheets

Exact resume: the data order is a pure function of (seed, epoch), the LR a pure function of the step;
a checkpoint stores the weights (the EMA codebook buffers included), the optimizer state, the global
torch RNG state (k-means init and dead-code replacement draw from it), the usage window and the
counters. On CPU a resumed run reproduces the uninterrupted run's losses exactly (tested).

Non-finite guard: a step whose loss or gradient norm is not finite is skipped (no update, the
codebook's EMA buffers restored) and counted; more than ``max_nonfinite`` in a row stops the run,
leaving the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from earlyfusion.checkpoint import UserError, atomic_dir, latest_good, load_json, load_state, load_weights, prune, save_state, step_dir, step_dirs
from earlyfusion.tokenizer.vqvae import VQ_PRESETS, VQVAE, VQConfig, load_vqvae, read_vq_config, save_vqvae
from earlyfusion.training.loop import metrics_file, warmup_cosine_lr
from earlyfusion.logs import log, progress

CHECKPOINTS = "checkpoints"
SHEET = "reconstructions.png"
SHEETS_DIR = "sheets"
SHEET_IMAGES = 8


# ---------------------------------------------------------------- configs


@dataclass
class VQTrainConfig:
    data: str
    """Training images: a directory from `earlyfusion data shapes`, an imagefolder directory, or a hub data set name."""
    out: str
    """Run directory (RUN): config.json + model.safetensors (for --image-tokenizer RUN), checkpoints/, metrics.jsonl, reconstruction sheets."""
    preset: str = "default"
    """Model size preset: tiny (tests, 16 px) or default (32 px -> 4x4 codes)."""
    steps: int = 1800
    """Optimizer steps (the default preset reaches 32.4 dB PSNR with 127 of its 128 codes used on the built-in 32 px test images, in ~2 min on 2 cores)."""
    batch_size: int = 128
    """Global batch size (images per optimizer step, over all processes). Large enough that a rare patch's code is
    used about once per batch: dead-code replacement resets codes used less than that (built-in data, 128 codes:
    batch 32 left 98 codes in use, 128 left 127)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.05
    """Final LR of the cosine schedule as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    recon_loss: Literal["l1", "mse", "l1+mse"] = "mse"
    """Reconstruction loss on [-1, 1] pixels (mse optimises PSNR directly: with the earlier 4 px-patch preset, 31 dB after 800 steps on the built-in data, l1 24 dB after 2000)."""
    split: str = "train"
    """Split of --data to train on."""
    image_column: str = "image"
    """Image column of a hub data set."""
    text_column: str = "text"
    """Caption column (read but unused by the tokenizer)."""
    checkpoint_every: int = 500
    """Checkpoint every K steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    sheet_every: int = 500
    """Write a reconstruction sheet every K steps (and at the end); 0 = only at the end."""
    log_every: int = 100
    """Print a log line every K steps (the progress bar updates every step)."""
    resume: bool = False
    """Continue from the newest good checkpoint in --out (exactly: same losses as an uninterrupted run)."""
    seed: int = 0
    """Seed for initialisation, data order and codebook initialisation."""
    strict: bool = False
    """Fail on the first unreadable image instead of skipping and counting it."""
    max_nonfinite: int = 5
    """Stop after this many non-finite steps in a row (each one is skipped)."""

    def __post_init__(self):
        if self.preset not in VQ_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(VQ_PRESETS)}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.sheet_every < 0 or self.max_nonfinite < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps, --sheet-every, --max-nonfinite, --grad-clip and --weight-decay must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class VQEvalConfig:
    checkpoint: str
    """Image tokenizer run directory (from `earlyfusion tokenizer train`) or one of its checkpoints/step-* directories."""
    data: str
    """Evaluation images: a directory from `earlyfusion data shapes`, an imagefolder directory, or a hub data set name."""
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

    def __post_init__(self):
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError("--batch-size must be at least 1 and --limit not negative")


# ---------------------------------------------------------------- data


def load_images(data: str, size: int, *, split: str = "train", image_column: str = "image", text_column: str = "text",
                strict: bool = False, limit: int = 0):
    """All images of a split as uint8 (N, 3, size, size), plus the SkipReport of records that were skipped."""
    from earlyfusion.tokenizer.preprocess import ImageError, preprocess
    from earlyfusion.training.sources import SkipReport, iter_image_text

    report = SkipReport(strict=strict)
    rows: list[torch.Tensor] = []
    for i, (img, _text) in enumerate(iter_image_text(data, image_column=image_column, text_column=text_column,
                                                     split=split, report=report, strict=strict, shrink_to=size)):
        try:
            t = preprocess(img, size)  # (3, size, size) in [-1, 1]
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
    return torch.stack(rows), report


def to_pixels(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [-1, 1] (exactly what preprocess returned)."""
    return batch_u8.float() / 127.5 - 1.0


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the training images for one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(step: int, seed: int, n: int, batch_size: int) -> torch.Tensor:
    """Global batch of a step: consecutive slices of per-epoch permutations (the tail of an epoch is dropped)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


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
def evaluate_tokenizer(model: VQVAE, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Reconstruction quality and code statistics of ``model`` on ``images``.

    images: (N, 3, S, S) float in [-1, 1] or uint8. Returns psnr (dB, mean over images, pixels in
    [0, 1]), psnr_global (from the mean squared error over the whole set), ssim, codebook_usage
    (fraction of codebook entries used over the whole set), perplexity (of the code distribution),
    images_per_s (encode + decode), num_images.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected images (N, 3, S, S) with N >= 1, got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = model.cfg.codebook_size
    counts = torch.zeros(K, dtype=torch.long)
    psnrs, ssims, sq = [], [], 0.0
    seconds = 0.0
    try:
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
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
            counts += torch.bincount(codes.flatten().cpu(), minlength=K)
    finally:
        model.train(was_training)
    n = len(images)
    mse = sq / images[0].numel() / n
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
def reconstruction_sheet(model: VQVAE, images_u8: torch.Tensor, path: Path, scale: int = 4) -> None:
    """PNG: a row of originals over a row of their reconstructions (nearest-upscaled ``scale``×)."""
    from PIL import Image

    from earlyfusion.tokenizer.preprocess import image_grid, to_pil

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = to_pixels(images_u8).to(device)
        rec = model.decode(model.encode(x)).cpu()
    finally:
        model.train(was_training)
    size = images_u8.shape[-1] * scale

    def big(t):
        return to_pil(t).resize((size, size), Image.NEAREST)

    tiles = [big(t) for t in to_pixels(images_u8)] + [big(t) for t in rec]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image_grid(tiles, ncols=len(images_u8)).save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------- training


def lr_at(step: int, cfg: VQTrainConfig) -> float:
    """The LR of a step: linear warmup, then cosine decay to min_lr_ratio·lr."""
    return warmup_cosine_lr(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)


def compute_loss(model, x: torch.Tensor, cfg: VQTrainConfig) -> tuple[torch.Tensor, dict]:
    """(loss to backprop, {"recon", "commit": detached scalars, "codes": (B, h, w)}) for one batch of pixels."""
    recon, codes, commit = model(x)
    recon = recon.float()
    if cfg.recon_loss == "l1":
        rec = (recon - x).abs().mean()
    elif cfg.recon_loss == "mse":
        rec = F.mse_loss(recon, x)
    else:
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
    loss = rec + commit
    return loss, {"recon": rec.detach(), "commit": commit.detach(), "codes": codes.detach()}


def _usage_window_steps(cfg: VQConfig, batch_size: int) -> int:
    """Steps whose codes make up the usage window: about 16 codes' worth of indices per codebook entry."""
    per_step = batch_size * cfg.tokens_per_image
    return max(1, math.ceil(16 * cfg.codebook_size / per_step))


def train(cfg: VQTrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    out = Path(cfg.out)
    ckpt_root = out / CHECKPOINTS
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if not cfg.resume and step_dirs(ckpt_root):
        raise UserError(f"{out} already holds a tokenizer run ({step_dirs(ckpt_root)[0].name}); "
                        "pass --resume to continue it or choose another --out")

    vq_cfg = VQ_PRESETS[cfg.preset]
    images, report = load_images(cfg.data, vq_cfg.image_size, split=cfg.split, image_column=cfg.image_column,
                                 text_column=cfg.text_column, strict=cfg.strict)
    n = len(images)
    batch_size = cfg.batch_size
    if n < batch_size:
        if n < world:
            raise UserError(f"{cfg.data}: only {n} usable image(s), fewer than the {world} processes")
        batch_size = n - n % world
        log.warning("only %d training images: batch size lowered from %d to %d", n, cfg.batch_size, batch_size)
    per_proc = batch_size // world
    sheet_images = images[:SHEET_IMAGES]

    set_seed(cfg.seed)
    model = VQVAE(vq_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    window = _usage_window_steps(vq_cfg, batch_size)
    last_seen = torch.full((vq_cfg.codebook_size,), -(10 ** 9), dtype=torch.long)  # step each code was last used
    start_step, skipped_total, bad_in_row = 0, 0, 0

    if cfg.resume:
        ckpt = latest_good(ckpt_root)
        if ckpt is None:
            log.info("--resume: no checkpoint in %s yet; starting from scratch", ckpt_root)
        else:
            saved = read_vq_config(ckpt)
            if saved != vq_cfg:
                raise UserError(f"{ckpt / 'config.json'}: the run was trained with another model shape than --preset "
                                f"{cfg.preset}; resume with the options of the original run")
            load_weights(ckpt / "model.safetensors", model)
            state = load_state(ckpt, "state")
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            last_seen = state["last_seen"].clone()
            start_step, skipped_total, bad_in_row = state["step"], state["skipped_nonfinite"], state["bad_in_row"]
            if state["batch_size"] != batch_size or state["seed"] != cfg.seed or state["num_images"] != n:
                raise UserError(f"{ckpt}: saved with batch size {state['batch_size']}, seed {state['seed']} and "
                                f"{state['num_images']} images; now {batch_size}, {cfg.seed}, {n}. "
                                "Resume with the same --data, --batch-size and --seed")
            log.info("resumed from %s (step %d)", ckpt, start_step)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw: VQVAE = accelerator.unwrap_model(model)
    metrics_path = metrics_file(out, start_step) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(step: int) -> None:
        if main:
            state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step,
                     "skipped_nonfinite": skipped_total, "bad_in_row": bad_in_row, "last_seen": last_seen,
                     "batch_size": batch_size, "seed": cfg.seed, "num_images": n, "train": asdict(cfg)}
            note = {"step": step, "preset": cfg.preset, "data": cfg.data}
            with atomic_dir(step_dir(ckpt_root, step)) as tmp:
                save_vqvae(raw, tmp, extra=note)
                save_state(tmp, "state", state)
            prune(ckpt_root, cfg.keep_checkpoints)
            save_vqvae(raw, out, extra=note)  # RUN/config.json + RUN/model.safetensors: the latest weights
        accelerator.wait_for_everyone()

    def sheet(step: int) -> None:
        if main:
            path = out / SHEETS_DIR / f"step-{step:08d}.png"
            reconstruction_sheet(raw, sheet_images, path)
            (out / SHEET).write_bytes(path.read_bytes())

    n_params = sum(p.numel() for p in raw.parameters())
    log.info("VQ-VAE %s: %.2fM parameters, %d px -> %dx%d codes, codebook %d; %d training images%s; batch %d, %d process(es)",
             cfg.preset, n_params / 1e6, vq_cfg.image_size, *vq_cfg.grid_size, vq_cfg.codebook_size, n,
             f" ({report.total} skipped)" if report.total else "", batch_size, world)

    quant_buffers = dict(raw.quantizer.named_buffers())
    bar = progress(range(start_step, cfg.steps), total=cfg.steps, initial=start_step, desc="tokenizer")
    t_last = time.perf_counter()
    for step in bar:
        model.train()
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = batch_indices(step, cfg.seed, n, batch_size)[rank * per_proc:(rank + 1) * per_proc]
        x = to_pixels(images[idx]).to(device)  # (b, 3, S, S)
        snapshot = {k: v.detach().clone() for k, v in quant_buffers.items()}
        with accelerator.autocast():
            loss, parts = compute_loss(model, x, cfg)
        loss_val = float(loss.detach())
        gnorm = float("nan")
        if math.isfinite(loss_val):
            accelerator.backward(loss)
            gnorm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if world > 1:
            loss_val = float(accelerator.reduce(torch.tensor([loss_val], device=device), reduction="mean"))
        if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in quant_buffers.items():
                    v.copy_(snapshot[k])  # the forward pass updated the EMA codebook from a bad batch
            skipped_total += 1
            bad_in_row += 1
            log.warning("step %d: non-finite loss/gradient (loss %s, grad norm %s); step skipped (%d in a row)",
                        step + 1, loss_val, gnorm, bad_in_row)
            if bad_in_row > cfg.max_nonfinite:
                raise UserError(
                    f"stopped: {bad_in_row} non-finite steps in a row (limit --max-nonfinite {cfg.max_nonfinite}); "
                    f"the last good checkpoint is {latest_good(ckpt_root)}. Lower --lr or check the data."
                )
            continue
        bad_in_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        codes = parts["codes"]
        if world > 1:
            codes = accelerator.gather(codes)
        last_seen[codes.flatten().cpu().unique()] = done
        usage = float((last_seen > done - window).double().mean())
        _, ppl = code_stats(torch.bincount(codes.flatten().cpu(), minlength=vq_cfg.codebook_size))
        now = time.perf_counter()
        record = {"step": done, "loss": loss_val, "recon": float(parts["recon"]), "commit": float(parts["commit"]),
                  "usage": usage, "perplexity": ppl, "grad_norm": gnorm, "lr": lr,
                  "images_per_s": batch_size / max(now - t_last, 1e-9), "skipped_nonfinite": skipped_total}
        t_last = now
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_val:.4f}", usage=f"{usage:.1%}", ppl=f"{ppl:.0f}", refresh=False)
            if done % cfg.log_every == 0 or done == cfg.steps:
                msg = (f"step {done}/{cfg.steps} loss {loss_val:.4f} (recon {record['recon']:.4f} commit {record['commit']:.4f}) "
                       f"usage {usage:.1%} perplexity {ppl:.0f} lr {lr:.2e} {record['images_per_s']:.0f} img/s")
                (bar.write if not bar.disable else log.info)(msg)
        if cfg.sheet_every and done % cfg.sheet_every == 0 or done == cfg.steps:
            sheet(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(done)
    bar.close()
    if start_step >= cfg.steps and main:
        log.info("%s: already trained for %d steps (--steps %d); nothing to do", out, start_step, cfg.steps)
        if not (out / "model.safetensors").is_file():
            ckpt = latest_good(ckpt_root)
            if ckpt is not None:
                save_vqvae(load_vqvae(ckpt), out, extra=load_json(ckpt / "config.json").get("training"))
    if main:
        if skipped_total:
            log.info("skipped %d non-finite step(s)", skipped_total)
        if report.total:
            log.info("skipped %d unreadable image(s): %s", report.total, report.summary())
        log.info("finished: %s (checkpoint %s, sheet %s)", out, latest_good(ckpt_root), out / SHEET)
    accelerator.end_training()
    return out


def train_cmd(cfg: VQTrainConfig) -> int:
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the CPU is shared; a GPU does the work elsewhere
    train(cfg)
    return 0


# ---------------------------------------------------------------- evaluation


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
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # the CPU is shared; a GPU does the work elsewhere
    model = load_vqvae(cfg.checkpoint)
    images, report = load_images(cfg.data, model.cfg.image_size, split=cfg.split, image_column=cfg.image_column,
                                 limit=cfg.limit)
    if report.total:
        log.info("skipped %d unreadable image(s): %s", report.total, report.summary())
    fig = evaluate_tokenizer(model, images, batch_size=cfg.batch_size)
    fig["codebook_size"] = model.cfg.codebook_size
    print(format_table(fig, cfg.checkpoint, cfg.data, cfg.split), flush=True)
    if cfg.json:
        print(json.dumps(fig), flush=True)
    return 0


__all__ = ["VQTrainConfig", "VQEvalConfig", "train", "train_cmd", "eval_cmd", "evaluate_tokenizer", "load_images",
           "ssim", "psnr", "code_stats", "reconstruction_sheet"]
