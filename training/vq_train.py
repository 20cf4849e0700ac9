"""Training the VQ-VAE image tokenizer: ``earlyfusion tokenizer train``.

One accelerate loop (the same script runs on one CPU and under ``accelerate launch``) on the shared
``training.trainer.Trainer``. Images are read once (``training.vq_eval.load_images``) and kept in
memory as uint8. The model's shape is a preset with options applied (``VQTrainConfig.model_config``);
the run's config.json records the result. Loss = reconstruction (mse by default) + the quantizer's
commitment loss [+ a perceptual loss from user-supplied VGG16 weights] [+ an adaptively weighted
PatchGAN hinge loss after ``gan_start_step``, with its own discriminator optimizer]
(``training.vq_losses``). The progress bar shows the loss, codebook usage (codes seen in a sliding
window of recent steps ÷ codebook size, as LlamaGen measures it) and the code perplexity of the batch.

RUN layout:

    RUN/config.json, RUN/model.safetensors   latest weights (what --image-tokenizer RUN loads)
    RUN/checkpoints/step-XXXXXXXX/           weights + config + state.{json,safetensors}, MANIFEST.json
    RUN/metrics.jsonl                        one JSON line per optimizer step
    RUN/reconstructions.png                  latest sheet: originals over reconstructions
    RUN/sheets/step-XXXXXXXX.png             the periodic sheets

Exact resume: the data order is a pure function of (seed, epoch), the LR a pure function of the step;
a checkpoint stores the weights (the EMA codebook buffers included), the optimizer state (and the
discriminator's weights and optimizer state when the GAN loss is on), the global torch RNG state
(k-means init and dead-code replacement draw from it), the usage window and the counters. A resumed
run reproduces the uninterrupted run's losses exactly on CPU (tested). The run's identity (model
shape, data, seed, batch size, losses) is recorded in each checkpoint's config; ``--resume`` with other
values is refused.

Non-finite guard: a step whose loss or gradient norm is not finite is skipped (no update, the
codebook's EMA buffers restored) and counted; more than ``max_nonfinite`` in a row stops the run,
leaving the last good checkpoint. The last step is always checkpointed, skipped or not.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from earlyfusion.core.checkpoint import latest_good, load_json, load_weights
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.options import MAX_BATCH, MAX_SEED, MAX_STEPS, check_not_file, check_number
from earlyfusion.core.rundir import CHECKPOINTS_DIR
from earlyfusion.core.runtime import use_all_cores
from earlyfusion.tokenizer.vq_checkpoint import CONFIG, WEIGHTS, load_vqvae, read_vq_config, save_vqvae
from earlyfusion.tokenizer.vq_config import MAX_CODEBOOK, VQConfig
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS, parse_fsq_levels, parse_sets, resolve_vq_config
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.training.trainer import Trainer, check_identity, source_key, warmup_cosine_lr
from earlyfusion.training.vq_eval import code_stats, load_images, reconstruction_sheet, to_pixels
from earlyfusion.training.vq_losses import Adversarial, PerceptualLoss

SHEET = "reconstructions.png"
SHEETS_DIR = "sheets"
SHEET_IMAGES = 8
RECIPE = {"steps": 1800, "batch_size": 128, "lr": 3e-3}
"""Training defaults of the presets not in RECIPES."""
RECIPES: dict[str, dict] = {"photo64": {"steps": 3000, "batch_size": 32, "lr": 2e-3}}
"""Per-preset training defaults (an option given on the command line wins)."""


@dataclass
class VQTrainConfig:
    data: str
    """Training images: a directory from `earlyfusion data shapes` or `data photos`, an imagefolder directory, or a hub
    data set name."""
    out: str
    """Run directory (RUN): config.json + model.safetensors (for --image-tokenizer RUN), checkpoints/, metrics.jsonl, reconstruction sheets."""
    preset: str = "default"
    """Model shape preset: tiny (tests, 16 px), default (built-in 32 px shapes -> 4x4 codes), photo64 (photographs,
    64 px -> 8x8 codes, trains on a CPU), photo256 (256 px -> 16x16 codes of 16384: LlamaGen VQ-16's shape) or
    chameleon512 (512 px -> 32x32 codes of 8192: Chameleon's shape). The options below change its fields."""
    image_size: int | None = None
    """Image side in pixels (a multiple of --downsample); default: the preset's."""
    downsample: int | None = None
    """Pixels per code side (a power of two): the code grid is image-size/downsample per side; default: the preset's."""
    codebook_size: int | None = None
    """Codebook entries (the image vocabulary size); default: the preset's (with --quantizer fsq: the product of the levels)."""
    codebook_dim: int | None = None
    """Dimension of the cosine code lookup (8-32 keeps large codebooks in use); default: the preset's."""
    width: int | None = None
    """Channels of the first conv stage (later stages keep the preset's multiples of it); default: the preset's."""
    depth: int | None = None
    """Residual blocks per encoder stage (the decoder gets one more); default: the preset's."""
    quantizer: Literal["vq", "fsq"] | None = None
    """vq (a learned codebook) or fsq (finite scalar quantization: no codebook to collapse, size = product of
    --fsq-levels); default: the preset's (vq)."""
    fsq_levels: str | None = None
    """Levels per dimension for --quantizer fsq, comma-separated (e.g. 8,8,8,5,5,5: 64000 codes; 8,5,5,5: 1000)."""
    overrides: list[str] = field(default_factory=list, metadata={"flag": "set"})
    """FIELD=VALUE: set any image tokenizer config field (e.g. --set attention=true --set channels=64,128); applied after
    the options above. config.json of the run lists the fields."""
    steps: int | None = None
    """Optimizer steps (default: the preset's recipe, {RECIPE[steps]}; photo64: {RECIPES[photo64][steps]}); raise it
    when the reconstructions still improve at the end (see metrics.jsonl)."""
    batch_size: int | None = None
    """Global batch size (images per optimizer step, over all processes; default: the preset's recipe,
    {RECIPE[batch_size]}; photo64: {RECIPES[photo64][batch_size]}). Keep it large enough that a rare patch's code is used about once per batch: dead-code replacement resets
    codes used less often than that."""
    lr: float | None = None
    """Peak learning rate (AdamW; default: the preset's recipe, {RECIPE[lr]}; photo64: {RECIPES[photo64][lr]})."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.05
    """Final LR of the cosine schedule as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    recon_loss: Literal["l1", "mse", "l1+mse"] = "mse"
    """Reconstruction loss on [-1, 1] pixels; mse optimises PSNR directly."""
    perceptual_weights: str | None = None
    """A safetensors file of VGG16 feature weights (torchvision's names, features.N.weight): adds a perceptual loss
    (LPIPS-style feature distance) for sharper textures. Nothing is downloaded: point to a file you have."""
    perceptual_weight: float = 1.0
    """Weight of the perceptual loss (with --perceptual-weights)."""
    gan_weight: float = 0.0
    """Weight of the adversarial PatchGAN loss (hinge; adaptively balanced against the reconstruction loss at the
    decoder's last layer, as in VQGAN); 0 = off. Sharper textures, slower steps, lower PSNR."""
    gan_start_step: int = 500
    """Step at which the discriminator and the GAN loss switch on (reconstructions collapse if it starts before
    the autoencoder reconstructs well)."""
    keep_aspect: bool = False
    """Train on each image resized whole to the largest code grid that keeps its shape, as a vocabulary built with
    --grid-tokens encodes it (in random square crops the size of the shortest side in the batch), instead of on
    its centre square. Use it for images of several shapes: a tokenizer trained on centre squares sees the
    pictures at another scale than the one it will encode."""
    split: str = "train"
    """Split of --data to train on."""
    image_column: str = "image"
    """Image column of a hub data set."""
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
    allow_outside_paths: bool = False
    """Read image files that lie outside the data directory (listed by absolute path or '..', or reached through a symbolic
    link out of it, as in a hub download folder whose files link into a shared cache); off, such records are skipped
    and counted as outside_data_dir."""
    max_nonfinite: int = 5
    """Stop after this many non-finite steps in a row (each one is skipped)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto = bf16 autocast for the encoder and decoder where bf16 products are fast (a GPU with bf16; a CPU with
    AMX or AVX512-BF16), fp32 elsewhere; the quantizer, weights and losses stay fp32. Use no for bit-exact fp32 runs."""

    def __post_init__(self):
        if self.preset not in VQ_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(VQ_PRESETS)}")
        for name, value in {**RECIPE, **RECIPES.get(self.preset, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("image_size", "downsample", "codebook_size", "codebook_dim", "width", "depth"):
            if getattr(self, name) is not None:
                check_number(name.replace("_", "-"), getattr(self, name), 0 if name == "depth" else 1,
                             MAX_CODEBOOK if name == "codebook_size" else None)
        self.model_config()  # a bad shape fails here, before any data is read
        check_number("perceptual-weight", self.perceptual_weight, 0)
        if self.perceptual_weights and not Path(self.perceptual_weights).expanduser().is_file():
            raise ValueError(f"--perceptual-weights {self.perceptual_weights}: file not found; give a safetensors file of "
                             "VGG16 features (torchvision's names: features.0.weight, ...)")
        check_number("gan-weight", self.gan_weight, 0)
        check_number("gan-start-step", self.gan_start_step, 0, MAX_STEPS)
        if self.gan_weight > 0 and self.gan_start_step >= self.steps:
            raise ValueError(f"--gan-start-step {self.gan_start_step} must be below --steps {self.steps} for the GAN loss to "
                             "switch on; lower it or leave --gan-weight at 0")
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_number(name.replace("_", "-"), getattr(self, name), 1, MAX_STEPS)
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        check_number("lr", self.lr, 0)
        if self.lr == 0:
            raise ValueError("--lr must be positive, got 0")
        for name in ("warmup_steps", "sheet_every", "max_nonfinite"):
            check_number(name.replace("_", "-"), getattr(self, name), 0, MAX_STEPS)
        for name in ("grad_clip", "weight_decay"):
            check_number(name.replace("_", "-"), getattr(self, name), 0)
        check_number("min-lr-ratio", self.min_lr_ratio, 0, 1)
        check_number("seed", self.seed, 0, MAX_SEED)
        check_not_file("out", self.out)

    def model_config(self) -> VQConfig:
        """The image tokenizer's shape: the preset with the options applied (ValueError on a bad combination)."""
        try:
            return resolve_vq_config(
                self.preset, image_size=self.image_size, downsample=self.downsample, codebook_size=self.codebook_size,
                codebook_dim=self.codebook_dim, width=self.width, depth=self.depth, quantizer=self.quantizer,
                fsq_levels=parse_fsq_levels(self.fsq_levels) if self.fsq_levels else None, sets=parse_sets(self.overrides))
        except TypeError as e:
            raise ValueError(f"image tokenizer options: {e}") from None

    def losses(self) -> dict:
        """The loss options a resumed run must share (recorded in the run's identity)."""
        return {"recon": self.recon_loss, "perceptual": self.perceptual_weight if self.perceptual_weights else 0.0,
                "gan": self.gan_weight, "gan_start_step": self.gan_start_step if self.gan_weight > 0 else None}


# ---------------------------------------------------------------- batches


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the training images for one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def crops(images: list[torch.Tensor], step: int, seed: int, align: int) -> torch.Tensor:
    """(B, 3, c, c) uint8: a random c × c crop of each image, c the shortest side among them, at offsets that are
    multiples of ``align`` (the downsampling: each crop's patches are ones the encoder sees when it encodes the
    whole image); the offsets are a pure function of (seed, step), so a resumed run crops as the uninterrupted one."""
    c = min(min(t.shape[-2:]) for t in images)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    out = []
    for t in images:
        top = align * int(torch.randint(0, (t.shape[-2] - c) // align + 1, (1,), generator=g))
        left = align * int(torch.randint(0, (t.shape[-1] - c) // align + 1, (1,), generator=g))
        out.append(t[:, top:top + c, left:left + c])
    return torch.stack(out)


def batch_indices(step: int, seed: int, n: int, batch_size: int) -> torch.Tensor:
    """Global batch of a step: consecutive slices of per-epoch permutations (the tail of an epoch is dropped)."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


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
    return loss, {"recon": rec.detach(), "commit": commit.detach(), "codes": codes.detach(),
                  "reconstruction": recon, "rec_loss": rec}  # the last two keep their graph (perceptual/GAN terms)


def _usage_window_steps(cfg: VQConfig, batch_size: int) -> int:
    """Steps whose codes make up the usage window: about 16 codes' worth of indices per codebook entry."""
    per_step = batch_size * cfg.tokens_per_image
    return max(1, math.ceil(16 * cfg.codebook_size / per_step))


def train(cfg: VQTrainConfig) -> Path:
    """Train the image tokenizer into ``cfg.out`` (resuming it with ``--resume``); returns the run directory."""
    out = Path(cfg.out)
    trainer = Trainer(out=out, checkpoints=out / CHECKPOINTS_DIR, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                      keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, max_nonfinite=cfg.max_nonfinite,
                      grad_clip=cfg.grad_clip, batch_size=cfg.batch_size, precision=cfg.mixed_precision,
                      resume=cfg.resume, desc="tokenizer")
    with trainer:
        _train(cfg, trainer)
    return out


def _read_images(cfg: VQTrainConfig, vq_cfg: VQConfig, world: int):
    """(images, skip report, global batch size): the batch is lowered to what a small image set can fill."""
    images, report = load_images(cfg.data, vq_cfg.image_size, split=cfg.split, image_column=cfg.image_column,
                                 strict=cfg.strict, downsample=vq_cfg.downsample, allow_outside=cfg.allow_outside_paths,
                                 max_grid=vq_cfg.grid_size if cfg.keep_aspect else None)
    n, batch_size = len(images), cfg.batch_size
    if n < batch_size:
        if n < world:
            raise UserError(f"{cfg.data}: only {n} usable image(s), fewer than the {world} processes")
        batch_size = n - n % world
        log.warning("only %d training images: batch size lowered from %d to %d", n, cfg.batch_size, batch_size)
    if cfg.keep_aspect:
        shapes = Counter(f"{t.shape[-1]}x{t.shape[-2]}" for t in images)
        log.info("keeping each image's shape (WxH px: count): %s", ", ".join(f"{k}: {v}" for k, v in shapes.most_common()))
    return images, report, batch_size


def _train(cfg: VQTrainConfig, trainer: Trainer) -> None:
    out, ckpt, main, device = trainer.out, trainer.ckpt, trainer.main, trainer.device
    vq_cfg = cfg.model_config()
    images, report, batch_size = _read_images(cfg, vq_cfg, trainer.world)
    n, per_proc = len(images), batch_size // trainer.world
    identity = {"model": vq_cfg.to_dict(), "data": source_key(cfg.data), "split": cfg.split,
                "image_column": cfg.image_column, "num_images": n, "seed": cfg.seed, "batch_size": batch_size,
                "losses": cfg.losses(), **({"keep_aspect": True} if cfg.keep_aspect else {})}
    perceptual = PerceptualLoss.from_file(cfg.perceptual_weights).to(device) if cfg.perceptual_weights else None

    # ---- the model, its optimizer and the usage window, restored on --resume
    set_seed(cfg.seed)
    model = VQVAE(vq_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    window = _usage_window_steps(vq_cfg, batch_size)
    last_seen = torch.full((vq_cfg.codebook_size,), -(10 ** 9), dtype=torch.long)  # step each code was last used
    gan = Adversarial(vq_cfg.image_size, cfg.lr) if cfg.gan_weight > 0 else None  # after the model: same init without it
    if ckpt is not None:
        state = trainer.load_state()
        saved = (load_json(ckpt / CONFIG).get("training") or {}).get("identity")
        check_identity(saved or {"model": read_vq_config(ckpt).to_dict(), "num_images": state["num_images"],
                                 "seed": state["seed"], "batch_size": state["batch_size"]}, identity, ckpt)
        load_weights(ckpt / WEIGHTS, model)
        last_seen = state["last_seen"].clone()
        if gan is not None:
            if "discriminator" not in state:
                raise UserError(f"--resume: {ckpt} was trained without the GAN loss (no discriminator state); resume "
                                "without --gan-weight or train into another --out")
            gan.disc.load_state_dict(state["discriminator"])
            gan.optimizer.load_state_dict(state["disc_optimizer"])
        trainer.restore(state, optimizer)
    model, optimizer = trainer.prepare(model, optimizer)
    raw: VQVAE = trainer.unwrap(model)
    if gan is not None:
        gan.disc, gan.optimizer = trainer.prepare(gan.disc, gan.optimizer)
        gan.plain = trainer.unwrap(gan.disc)

    def save_checkpoint(step: int) -> None:
        note = {"step": step, "preset": cfg.preset, "data": cfg.data, "identity": identity}
        state = {"last_seen": last_seen, "batch_size": batch_size, "seed": cfg.seed, "num_images": n, "train": asdict(cfg)}
        if gan is not None:
            state.update(discriminator=trainer.unwrap(gan.disc).state_dict(), disc_optimizer=gan.optimizer.state_dict())
        trainer.save(step, optimizer, lambda tmp: save_vqvae(raw, tmp, extra=note), state)
        if main:
            save_vqvae(raw, out, extra=note)  # RUN/config.json + RUN/model.safetensors: the latest weights

    def sheet(step: int) -> None:
        if main:
            path = out / SHEETS_DIR / f"step-{step:08d}.png"
            reconstruction_sheet(raw, images[:SHEET_IMAGES], path)
            (out / SHEET).write_bytes(path.read_bytes())

    n_params = sum(p.numel() for p in raw.parameters())
    log.info("VQ-VAE %s: %.2fM parameters, %d px -> %dx%d codes, codebook %d; %d training images%s; batch %d, %d process(es)",
             cfg.preset, n_params / 1e6, vq_cfg.image_size, *vq_cfg.grid_size, vq_cfg.codebook_size, n,
             f" ({report.total} skipped)" if report.total else "", batch_size, trainer.world)
    log.info(f"precision: {trainer.precision_why}")  # after every check that can refuse the run: an error stays one line

    # ---- the steps
    quant_buffers = dict(raw.quantizer.named_buffers())
    t_last = time.perf_counter()
    for step in trainer.iterate():
        model.train()
        lr = trainer.set_lr(optimizer, lr_at(step, cfg))
        idx = batch_indices(step, cfg.seed, n, batch_size)[trainer.rank * per_proc:(trainer.rank + 1) * per_proc]
        batch = crops([images[i] for i in idx], step, cfg.seed, vq_cfg.downsample) if cfg.keep_aspect else images[idx]
        x = to_pixels(batch).to(device)  # (b, 3, S, S)
        snapshot = {k: v.detach().clone() for k, v in quant_buffers.items()}
        gan_on = gan is not None and step >= cfg.gan_start_step
        extra = {}
        with trainer.autocast():
            loss, parts = compute_loss(model, x, cfg)
            rec = parts["rec_loss"]
            if perceptual is not None:
                p = perceptual(parts["reconstruction"], x)
                rec, loss, extra["perceptual"] = rec + cfg.perceptual_weight * p, loss + cfg.perceptual_weight * p, p.detach()
            if gan_on:
                term, g = gan.generator_loss(parts["reconstruction"], rec, raw.decoder.last_layer, cfg.gan_weight)
                loss = loss + term
                extra.update(g)
        loss_val = trainer.mean(float(loss.detach()))  # one process alone skipping the backward would leave the others waiting
        gnorm = float("nan")
        if math.isfinite(loss_val):
            trainer.backward(loss)
            gnorm = trainer.clip(model.parameters())
        done = step + 1
        skipped = trainer.update(optimizer, step, loss_val, gnorm)
        if skipped:
            with torch.no_grad():
                for k, v in quant_buffers.items():
                    v.copy_(snapshot[k])  # the forward pass updated the EMA codebook from a bad batch
        else:
            if gan_on:
                with trainer.autocast():
                    extra["disc"] = gan.discriminator_step(x, parts["reconstruction"], lr, trainer.backward, trainer.clip,
                                                         trainer.mean)
            codes = parts["codes"]
            if trainer.world > 1:
                codes = trainer.accelerator.gather(codes)
            last_seen[codes.flatten().cpu().unique()] = done
            usage = float((last_seen > done - window).double().mean())
            _, ppl = code_stats(torch.bincount(codes.flatten().cpu(), minlength=vq_cfg.codebook_size))
            now = time.perf_counter()
            record = {"step": done, "loss": loss_val, "recon": float(parts["recon"]), "commit": float(parts["commit"]),
                      "usage": usage, "perplexity": ppl, "grad_norm": gnorm, "lr": lr,
                      "images_per_s": batch_size / max(now - t_last, 1e-9), "skipped_nonfinite": trainer.skipped,
                      **{k: float(v) for k, v in extra.items()}}
            t_last = now
            trainer.record(record, {"loss": f"{loss_val:.4f}", "usage": f"{usage:.1%}", "ppl": f"{ppl:.0f}"},
                           f"step {done}/{cfg.steps} loss {loss_val:.4f} (recon {record['recon']:.4f} commit "
                           f"{record['commit']:.4f}) usage {usage:.1%} perplexity {ppl:.0f} lr {lr:.2e} "
                           f"{record['images_per_s']:.0f} img/s")
            if cfg.sheet_every and done % cfg.sheet_every == 0 or done == cfg.steps:
                sheet(done)
        if trainer.checkpoint_due(done, skipped):
            save_checkpoint(done)
    trainer.close()

    # ---- after the last step
    if trainer.start_step >= cfg.steps and main:
        log.info("%s: already trained for %d steps (--steps %d); nothing to do", out, trainer.start_step, cfg.steps)
        if not (out / WEIGHTS).is_file() and ckpt is not None:
            save_vqvae(load_vqvae(ckpt), out, extra=load_json(ckpt / CONFIG).get("training"))
    if main:
        if report.total:
            log.info("skipped %d unreadable image(s): %s", report.total, report.summary())
        log.info("finished: %s (checkpoint %s, sheet %s)", out, latest_good(out / CHECKPOINTS_DIR), out / SHEET)


def train_cmd(cfg: VQTrainConfig) -> int:
    use_all_cores()
    train(cfg)
    return 0
