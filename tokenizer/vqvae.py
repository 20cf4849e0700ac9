"""VQ-VAE image tokenizer: pixels (B, 3, H, W) in [-1, 1] <-> code grid (B, h, w) of codebook ids.

A small convolutional encoder/decoder around the quantizer of vector-quantize-pytorch: a patchify
stem (pixel unshuffle by ``patch_size``: each code's pixels enter as channels, and the decoder emits
them the same way through a pixel shuffle; hard edges come out exact and cheap). The decoder is conv
stages of ResNet blocks (GroupNorm, SiLU) with x2 upsampling for the rest of ``downsample``; the
encoder by default sees only its own patch per code (``encoder_reach``: one kxk conv, then
per-position layers), so codes compose from an image's parts. The quantizer is configured against
codebook collapse:

* low-dimensional lookup: the encoder's ``latent_dim`` features are projected to ``codebook_dim``
  (8-32) before the nearest-code search;
* cosine similarity: inputs and codes are l2-normalised (LlamaGen);
* k-means initialisation of the codebook from the first training batch;
* dead-code replacement: a code whose EMA cluster size drops below ``dead_code_threshold`` is
  replaced by a random encoder output of the current batch.

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
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import VectorQuantize

from earlyfusion.checkpoint import (MANIFEST, CheckpointError, latest_good, load_json, load_weights, save_json, save_weights,
                                    sha256_file, write_manifest)

if TYPE_CHECKING:
    from earlyfusion.tokenizer.vqgan import ChameleonVQGAN, VQGANConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "earlyfusion.vqvae"


# ---------------------------------------------------------------- config


@dataclass
class VQConfig:
    image_size: int = 32
    """Input images are image_size x image_size pixels."""
    downsample: int = 8
    """Spatial reduction factor (a power of two): the code grid is (image_size/downsample)^2."""
    patch_size: int = 8
    """Patchify stem: the first patch_size x downsampling is a pixel (un)shuffle (power of two dividing downsample)."""
    channels: tuple[int, ...] = (128,)
    """Conv channels per resolution level after the stem: log2(downsample/patch_size) + 1 entries."""
    encoder_reach: int | None = 0
    """How far each code sees, in patches: 0 = its own patch, 1 = its 3x3 neighbourhood (one kxk conv, then per-position
    1x1 layers; needs patch_size == downsample); None = the whole image (3x3 convs + GroupNorm). Codes that depend only
    on nearby pixels compose from an image's parts, which a decoder learns much faster on simple synthetic scenes;
    photographs want context (None). The pixel decoder always sees every code."""
    res_blocks: int = 1
    """Encoder residual blocks per resolution level."""
    decoder_res_blocks: int = 2
    """Decoder residual blocks per resolution level."""
    latent_dim: int = 64
    """Channels of the encoder output / decoder input (the quantizer's input dimension)."""
    codebook_size: int = 128
    """Number of codebook entries (image vocabulary size). Raise it when reconstructions lose detail that matters
    (e.g. two shapes sharing one patch); each entry must still be used, so larger codebooks need more images."""
    codebook_dim: int = 16
    """Dimension of the low-dimensional cosine lookup space (8-32 against collapse)."""
    commitment_weight: float = 0.25
    """Weight of the commitment loss (encoder output pulled towards its code)."""
    ema_decay: float = 0.8
    """EMA decay of the codebook updates."""
    dead_code_threshold: float = 1.0
    """Codes whose EMA usage count falls below this are replaced by batch vectors (>= 1 against collapse)."""
    kmeans_iters: int = 10
    """k-means iterations of the codebook initialisation on the first batch."""
    norm_groups: int = 8
    """GroupNorm groups (must divide every entry of channels)."""

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of downsample {self.downsample}")
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1) or self.downsample % self.patch_size:
            raise ValueError(f"patch_size must be a power of two dividing downsample {self.downsample}, got {self.patch_size}")
        if self.encoder_reach is not None:
            if self.encoder_reach < 0:
                raise ValueError(f"encoder_reach must be >= 0 (or None for the whole image), got {self.encoder_reach}")
            if self.patch_size != self.downsample:
                raise ValueError(f"encoder_reach needs patch_size == downsample (each code is one patch), got patch_size "
                                 f"{self.patch_size} and downsample {self.downsample}; or set encoder_reach to None")
        levels = int(math.log2(self.downsample // self.patch_size)) + 1
        if len(self.channels) != levels:
            raise ValueError(f"channels needs {levels} entries for downsample {self.downsample} with patch_size "
                             f"{self.patch_size} (one per resolution level), got {list(self.channels)}")
        if any(c < 1 or c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count must be a positive multiple of norm_groups {self.norm_groups}, got {list(self.channels)}")
        if self.res_blocks < 0 or self.decoder_res_blocks < 0 or self.latent_dim < 1 or self.kmeans_iters < 1:
            raise ValueError("res_blocks and decoder_res_blocks must be >= 0, latent_dim and kmeans_iters >= 1")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if not 1 <= self.codebook_dim <= self.latent_dim:
            raise ValueError(f"codebook_dim must be in [1, latent_dim={self.latent_dim}], got {self.codebook_dim}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.dead_code_threshold < 1.0:
            raise ValueError(f"dead_code_threshold must be >= 1 (dead-code replacement prevents collapse), got {self.dead_code_threshold}")
        if self.commitment_weight < 0:
            raise ValueError("commitment_weight must not be negative")

    @property
    def grid_size(self) -> tuple[int, int]:
        n = self.image_size // self.downsample
        return (n, n)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid_size
        return h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown image tokenizer config keys {unknown}")
        return cls(**d)


VQ_PRESETS: dict[str, VQConfig] = {
    # tests: 16 px -> 4x4 codes, a few thousand parameters
    "tiny": VQConfig(image_size=16, downsample=4, patch_size=4, channels=(16,), res_blocks=1, decoder_res_blocks=1,
                     latent_dim=16, codebook_size=32, codebook_dim=8, norm_groups=4, kmeans_iters=4),
    # built-in 32 px shapes data -> 4x4 = 16 codes per image, one per 8x8 px patch
    "default": VQConfig(),
}


# ---------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the identity."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class LocalResBlock(nn.Module):
    """Per-position LayerNorm -> SiLU -> 1x1 conv, twice, plus the identity: nothing crosses positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.norm2 = nn.LayerNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(channel_norm(self.norm1, x)))
        h = self.conv2(F.silu(channel_norm(self.norm2, h)))
        return x + h


def channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of each position: (B, C, H, W) -> (B, C, H, W)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 conv: (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Patchify (pixel unshuffle) -> conv stages with stride-2 downsampling -> latent_dim channels.

    With ``encoder_reach`` r the first conv is (2r+1)x(2r+1) over patches and every later layer is per-position
    (1x1 convs, LayerNorm over channels): a code is a function of the patches within r of it only."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.patch_size
        self.patch_size, self.local = p, cfg.encoder_reach is not None
        k = 2 * cfg.encoder_reach + 1 if self.local else 3
        self.conv_in = nn.Conv2d(3 * p * p, ch[0], k, padding=k // 2)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [LocalResBlock(c) if self.local else ResBlock(c, g) for _ in range(cfg.res_blocks)]
            if i + 1 < len(ch):
                layers.append(Downsample(c, ch[i + 1]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.LayerNorm(ch[-1]) if self.local else nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.patch_size)  # (B, 3*p*p, H/p, W/p)
        h = self.body(self.conv_in(h))  # (B, ch[-1], h, w)
        h = channel_norm(self.norm_out, h) if self.local else self.norm_out(h)
        return self.conv_out(F.silu(h))  # (B, latent_dim, h, w)


class Decoder(nn.Module):
    """latent_dim channels -> conv stages with x2 upsampling -> 3*p*p channels -> pixel shuffle."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.patch_size
        self.patch_size = p
        self.conv_in = nn.Conv2d(cfg.latent_dim, ch[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            layers += [ResBlock(ch[i], g) for _ in range(cfg.decoder_res_blocks)]
            if i > 0:
                layers.append(Upsample(ch[i], ch[i - 1]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], 3 * p * p, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv_in(z))  # (B, ch[0], H/p, W/p)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 3*p*p, H/p, W/p)
        return F.pixel_shuffle(h, self.patch_size)  # (B, 3, H, W)


# ---------------------------------------------------------------- the model


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantize(
            dim=cfg.latent_dim,
            codebook_size=cfg.codebook_size,
            codebook_dim=cfg.codebook_dim,
            use_cosine_sim=True,
            kmeans_init=True,
            kmeans_iters=cfg.kmeans_iters,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            decay=cfg.ema_decay,
            commitment_weight=cfg.commitment_weight,
            sync_codebook=torch.distributed.is_available() and torch.distributed.is_initialized(),
        )
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def _check_pixels(self, x: torch.Tensor) -> None:
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"expected pixels of shape (B, 3, {s}, {s}), got {tuple(x.shape)}")

    def _quantize(self, z: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> quantized (B, D, h, w) fp32, codes (B, h, w), commitment loss (scalar)."""
        B, D, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(B, h * w, D)  # (B, h*w, D)
        with torch.autocast(device_type=z.device.type, enabled=False):
            q, idx, loss = self.quantizer(flat, **kw)  # (B, h*w, D), (B, h*w), ()
        q = q.reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return q, idx.reshape(B, h, w), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W) unclamped, codes (B, h, w), aux loss)."""
        self._check_pixels(x)
        q, codes, aux = self._quantize(self.encoder(x))
        return self.decoder(q), codes, aux

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> codes LongTensor (B, h, w); never updates the codebook."""
        self._check_pixels(pixels)
        _, codes, _ = self._quantize(self.encoder(pixels), freeze_codebook=True)
        return codes.long()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> quantized latents (B, latent_dim, h, w) (what the decoder sees)."""
        if codes.dtype not in (torch.int32, torch.int64) or codes.ndim != 3:
            raise ValueError(f"expected an integer code grid (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must be in [0, {self.cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        with torch.autocast(device_type=codes.device.type, enabled=False):
            vectors = self.quantizer.codebook[codes.long()]  # (B, h, w, codebook_dim)
            q = self.quantizer.project_out(vectors)  # (B, h, w, latent_dim)
        return q.permute(0, 3, 1, 2)  # (B, latent_dim, h, w)

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
