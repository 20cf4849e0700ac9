"""VQ-VAE image tokenizer: pixels (B, 3, H, W) in [-1, 1] <-> code grid (B, h, w) of codebook ids.

A convolutional encoder/decoder (``earlyfusion.tokenizer.nets``) around a quantizer of vector-quantize-pytorch
(``earlyfusion.tokenizer.quantizers``), shaped by a ``VQConfig`` (``earlyfusion.tokenizer.vq_config``; named
shapes in ``earlyfusion.tokenizer.vq_presets``). The encoder starts with a patchify stem (pixel unshuffle by
``patch_size``: each code's pixels enter as channels, and the decoder emits them the same way through a pixel
shuffle; hard edges come out exact and cheap), then conv stages of ResNet blocks (GroupNorm, SiLU) with
stride-2 downsampling, optionally self-attention at the lowest resolution; the decoder mirrors it with x2
upsampling. By default each code sees only its own patch (``encoder_reach``), so codes compose from an image's
parts; the photograph presets see the whole image. Both networks are fully convolutional: encode and decode
take any image whose sides are multiples of ``downsample``, up to ``image_size``. The default quantizer is
configured against codebook collapse:

* low-dimensional lookup: the encoder's ``latent_dim`` features are projected to ``codebook_dim``
  (8-32) before the nearest-code search;
* cosine similarity: inputs and codes are l2-normalised (LlamaGen);
* k-means initialisation of the codebook from the first training batch;
* dead-code replacement: a code whose EMA cluster size drops below ``dead_code_threshold`` is
  replaced by a random encoder output of the current batch;

the alternative (``quantizer="fsq"``) is finite scalar quantization, which has no codebook to collapse.

The codebook is an EMA buffer (``quantizer._codebook.embed`` / ``embed_avg`` / ``cluster_size`` /
``initted``): it is part of ``state_dict()`` and therefore of every checkpoint. The quantizer runs
in fp32 even under autocast.

Checkpoint directory: ``config.json`` (the VQConfig fields at top level, ``codebook_size`` among them)
+ ``model.safetensors`` + ``MANIFEST.json`` (their sizes and sha256). Every reader verifies the two files
against the manifest before trusting them (a failure names the run's newest good step checkpoint, which can be
passed instead), and ``load_vqvae`` checks keys and shapes strictly. The config's "format" picks the architecture:
``earlyfusion.vqvae`` (this module) or ``earlyfusion.chameleon_vqgan`` (Chameleon's VQGAN, ``earlyfusion.tokenizer.vqgan``);
``read_vq_config``, ``load_vqvae`` and ``vq_fingerprint`` read either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from earlyfusion.checkpoint import (MANIFEST, CheckpointError, latest_good, load_json, load_weights, save_json, save_weights,
                                    sha256_file, write_manifest)
from earlyfusion.tokenizer.nets import (  # noqa: F401 - re-exported: the blocks were defined here before
    Decoder, Downsample, Encoder, LocalResBlock, ResBlock, SelfAttention, Upsample, channel_norm,
)
from earlyfusion.tokenizer.quantizers import build_quantizer, code_latents, quantize
from earlyfusion.tokenizer.vq_config import VQConfig
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS, resolve_vq_config  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from earlyfusion.tokenizer.vqgan import ChameleonVQGAN, VQGANConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "earlyfusion.vqvae"


# ---------------------------------------------------------------- the model


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def _check_pixels(self, x: torch.Tensor) -> None:
        """Exactly image_size x image_size pixels (what a fixed-size architecture such as Chameleon's VQGAN takes)."""
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"expected pixels of shape (B, 3, {s}, {s}), got {tuple(x.shape)}")

    def _check_grid(self, x: torch.Tensor) -> None:
        """Any H x W whose sides are multiples of downsample, up to image_size (the networks are fully convolutional)."""
        s, d = self.cfg.image_size, self.cfg.downsample
        if (x.ndim != 4 or x.shape[1] != 3 or not 0 < x.shape[2] <= s or not 0 < x.shape[3] <= s
                or x.shape[2] % d or x.shape[3] % d):
            raise ValueError(f"expected pixels of shape (B, 3, H, W) with H and W multiples of {d} up to {s} "
                             f"(e.g. (B, 3, {s}, {s})), got {tuple(x.shape)}")

    def _quantize(self, z: torch.Tensor, freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> quantized (B, D, h, w) fp32, codes (B, h, w), commitment loss (scalar)."""
        B, D, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(B, h * w, D)  # (B, h*w, D)
        q, idx, loss = quantize(self.quantizer, flat, freeze)  # (B, h*w, D), (B, h*w), ()
        q = q.reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return q, idx.reshape(B, h, w), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W) unclamped, codes (B, h, w), aux loss)."""
        self._check_grid(x)
        q, codes, aux = self._quantize(self.encoder(x))
        return self.decoder(q), codes, aux

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> codes LongTensor (B, h, w); never updates the codebook."""
        self._check_grid(pixels)
        _, codes, _ = self._quantize(self.encoder(pixels), freeze=True)
        return codes.long()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> quantized latents (B, latent_dim, h, w) (what the decoder sees)."""
        if codes.dtype not in (torch.int32, torch.int64) or codes.ndim != 3:
            raise ValueError(f"expected an integer code grid (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must be in [0, {self.cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return code_latents(self.quantizer, codes)  # (B, latent_dim, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes LongTensor (B, h, w) -> pixels (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.lookup(codes)).clamp(-1.0, 1.0)


# ---------------------------------------------------------------- checkpoint directory


def save_vqvae(model: VQVAE, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors``, ``config.json`` and their ``MANIFEST.json`` (each atomically) into ``directory``.

    ``extra`` (e.g. the training step) is stored under the key "training" and ignored on load.
    """
    directory = Path(directory)
    save_weights(directory / WEIGHTS, model.state_dict())
    h, w = model.cfg.grid_size
    config = {**model.cfg.to_dict(), "format": getattr(model, "FORMAT", FORMAT), "grid": [h, w]}
    if extra:
        config["training"] = extra
    save_json(directory / CONFIG, config)
    write_manifest(directory, [WEIGHTS, CONFIG])


def _resolve(directory: str | Path) -> Path:
    """The verified directory to read an image tokenizer from: ``directory`` itself (a run's top level or one of its
    step checkpoints), or the newest good step checkpoint under it when it has no files of its own."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: image tokenizer directory not found; pass the --out directory of `earlyfusion tokenizer train`")
    if (directory / CONFIG).is_file():
        try:
            _verify_against_manifest(directory)
        except CheckpointError as e:
            ckpt = latest_good(directory / "checkpoints")
            hint = f"; its newest good step checkpoint is {ckpt}: pass that directory instead" if ckpt else ""
            raise CheckpointError(f"{e}{hint}") from None
        return directory
    ckpt = latest_good(directory / "checkpoints")
    if ckpt is not None:
        return ckpt
    raise CheckpointError(f"{directory / CONFIG}: file not found; is {directory} an image tokenizer run directory?")


def _verify_against_manifest(directory: Path) -> None:
    """If the directory carries a MANIFEST.json (step checkpoints, copies), check the two files we load."""
    if not (directory / MANIFEST).is_file():
        return
    files = load_json(directory / MANIFEST).get("files", {})
    for name in (CONFIG, WEIGHTS):
        info = files.get(name)
        if info is None:
            continue
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in {MANIFEST} but missing; the checkpoint is incomplete")
        if p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p}: changed since it was saved (its checksum in {MANIFEST} differs): truncated, corrupted "
                                  f"or edited; {CONFIG} and {WEIGHTS} must stay as `tokenizer train` wrote them")


def _architectures() -> dict[str, tuple[type, type]]:
    """The config's "format" -> (config class, model class) of each image tokenizer architecture."""
    from earlyfusion.tokenizer.vqgan import FORMAT as VQGAN_FORMAT, ChameleonVQGAN, VQGANConfig

    return {FORMAT: (VQConfig, VQVAE), VQGAN_FORMAT: (VQGANConfig, ChameleonVQGAN)}


def read_vq_config(directory: str | Path) -> VQConfig | VQGANConfig:
    """The config stored in ``directory/config.json`` (its class chosen by "format"); CheckpointError naming the file if invalid."""
    path = _resolve(directory) / CONFIG
    raw = load_json(path)
    fmt = raw.get("format", FORMAT) if isinstance(raw, dict) else None
    if fmt is None or (fmt == FORMAT and "codebook_size" not in raw):
        raise CheckpointError(f"{path}: not an image tokenizer config (no 'codebook_size'); is this an `earlyfusion tokenizer train` run?")
    kinds = _architectures()
    if fmt not in kinds:
        raise CheckpointError(f"{path}: format {fmt!r} is not one of {sorted(kinds)}")
    d = {k: v for k, v in raw.items() if k not in ("format", "grid", "training")}
    try:
        cfg = kinds[fmt][0].from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid image tokenizer config: {e}") from e
    if "grid" in raw and list(raw["grid"]) != list(cfg.grid_size):
        raise CheckpointError(f"{path}: 'grid' {raw['grid']} disagrees with image_size/downsample ({list(cfg.grid_size)})")
    return cfg


def load_vqvae(directory: str | Path) -> VQVAE | ChameleonVQGAN:
    """Build the model from ``config.json`` and load ``model.safetensors`` with strict key/shape checks.

    Accepts a run directory (top-level files) or a ``checkpoints/step-*`` directory.
    """
    directory = _resolve(directory)
    cfg = read_vq_config(directory)
    model = {config_cls: model_cls for config_cls, model_cls in _architectures().values()}[type(cfg)](cfg)
    try:
        load_weights(directory / WEIGHTS, model)
    except CheckpointError as e:
        if (directory / WEIGHTS).is_file() and "do not match" in str(e):
            raise CheckpointError(f"{directory / CONFIG} does not describe the weights beside it: {e}") from e
        raise
    return model.eval()


def vq_fingerprint(directory: str | Path) -> str:
    """sha256 over the config (canonical JSON, training notes excluded) and the weights file."""
    directory = _resolve(directory)
    raw = load_json(directory / CONFIG)
    raw = {k: v for k, v in raw.items() if k != "training"}
    h = hashlib.sha256()
    h.update(json.dumps(raw, sort_keys=True).encode())
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file not found")
    h.update(sha256_file(weights).encode())
    return h.hexdigest()
