"""Chameleon's VQGAN as an image tokenizer: pixels (B, 3, S, S) in [-1, 1] <-> code grid (B, h, w).

The taming-transformers VQGAN that Meta released with Chameleon / Anole (``vqgan.ckpt`` + ``vqgan.yaml``):
a convolutional encoder (ResNet blocks with GroupNorm(32) and swish, optional self-attention at the listed
resolutions, stride-2 downsampling with asymmetric padding), a 1x1 ``quant_conv`` into the codebook space, a
nearest-entry lookup (euclidean distance) in an ``nn.Embedding`` codebook, and the mirrored decoder behind a 1x1
``post_quant_conv``. The module names follow taming's exactly, so ``state_dict()`` keys are the ones in Meta's
checkpoint and in transformers' ``ChameleonVQVAE`` (which keeps the encoder half only). The encoder arithmetic
matches transformers' operation by operation, so both give the same codes.

It is used for encoding and decoding only (the release is frozen); ``tokenizer train`` builds our own VQ-VAE.
The directory it is stored in is the same as our VQ-VAE's (``config.json`` with ``"format":
"earlyfusion.chameleon_vqgan"`` + ``model.safetensors`` + ``MANIFEST.json``), so ``load_vqvae``,
``read_vq_config`` and ``vq_fingerprint`` in ``earlyfusion.tokenizer.vqvae`` read it unchanged.
``convert_vqgan`` writes such a directory from Meta's files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from earlyfusion.tokenizer.nets import Upsample
from earlyfusion.tokenizer.vq_config import VQConfig
from earlyfusion.tokenizer.vqvae import VQVAE

FORMAT = "earlyfusion.chameleon_vqgan"
YAML = "vqgan.yaml"
CKPT = "vqgan.ckpt"
SAFETENSORS = "vqgan.safetensors"
CHUNK_PIXELS = 8 * 512 * 512
"""encode/decode run the images through the network in chunks of about this many pixels, to bound activation memory."""


# ---------------------------------------------------------------- config


@dataclass
class VQGANConfig:
    embed_dim: int = 256
    """Dimension of the codebook entries (quant_conv maps z_channels to it)."""
    n_embed: int = 8192
    """Number of codebook entries (image vocabulary size)."""
    ch: int = 128
    """Base channel count; level i has ch * ch_mult[i] channels."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; each level but the last halves the resolution."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder has one more per level)."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sizes (in pixels per side) at which a self-attention block follows each ResNet block."""
    resolution: int = 512
    """Input images are resolution x resolution pixels."""
    in_channels: int = 3
    """Channels of the input images (RGB)."""
    out_ch: int = 3
    """Channels of the decoded images (RGB)."""
    z_channels: int = 256
    """Channels of the encoder output / decoder input."""
    double_z: bool = False
    """Encoder emits 2 * z_channels (a KL autoencoder's layout); a VQGAN has it off."""
    dropout: float = 0.0
    """Dropout inside the ResNet blocks (inactive here: the model only encodes and decodes)."""

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions or ())
        counts = {"embed_dim": self.embed_dim, "n_embed": self.n_embed, "ch": self.ch, "num_res_blocks": self.num_res_blocks,
                  "resolution": self.resolution, "z_channels": self.z_channels}
        for name, v in [*counts.items(), *((f"ch_mult entry {m}", m) for m in self.ch_mult),
                        *((f"attn_resolutions entry {r}", r) for r in self.attn_resolutions)]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.n_embed < 2:
            raise ValueError(f"n_embed must be at least 2, got {self.n_embed}")
        if not self.ch_mult:
            raise ValueError("ch_mult needs at least one entry")
        if self.in_channels != 3 or self.out_ch != 3:
            raise ValueError(f"in_channels and out_ch must be 3 (RGB images), got {self.in_channels} and {self.out_ch}")
        if self.double_z is not False:
            raise ValueError("double_z must be false: a VQGAN's encoder emits z_channels (true is a KL autoencoder's layout)")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError(f"every ch * ch_mult entry must be a multiple of 32 (GroupNorm groups), got ch {self.ch} and "
                             f"ch_mult {list(self.ch_mult)}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} must be a multiple of the downsampling {self.downsample}")
        if not (isinstance(self.dropout, (int, float)) and math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    grid_size = VQConfig.grid_size  # (image_size / downsample,) * 2, as for our VQ-VAE
    tokens_per_image = VQConfig.tokens_per_image
    pixels_of_grid = VQConfig.pixels_of_grid
    grid_of_pixels = VQConfig.grid_of_pixels

    @property
    def codebook_size(self) -> int:
        return self.n_embed

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    from_dict = classmethod(VQConfig.from_dict.__func__)  # rejects unknown keys, as for our VQ-VAE


# ---------------------------------------------------------------- blocks (taming's names)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus the input (through a 1x1 ``nin_shortcut`` when channels change)."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, plus the input."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        w = torch.bmm(q.reshape(B, C, H * W).permute(0, 2, 1), k.reshape(B, C, H * W))  # (B, HW query, HW key)
        w = F.softmax(w * (int(C) ** (-0.5)), dim=2)
        out = torch.bmm(v.reshape(B, C, H * W), w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 conv3x3: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _middle(c: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """(B, 3, S, S) -> (B, z_channels, S/downsample, S/downsample)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, c_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, cfg.ch * mult, cfg.dropout))
                c_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _middle(c_in, cfg.dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = _run_level(level, h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*downsample, w*downsample), unclamped; ``up[0]`` is full resolution."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in, res = cfg.ch * cfg.ch_mult[-1], cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, cfg.dropout)
        levels: list[nn.Module] = [None] * n  # built from the lowest resolution up
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, cfg.ch * cfg.ch_mult[i], cfg.dropout))
                c_in = cfg.ch * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_in))
            levels[i] = _level(blocks, attns)
            if i != 0:
                levels[i].upsample = Upsample(c_in, c_in)
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = _run_level(self.up[i], h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook (``embedding``, n_embed x embed_dim) and the nearest-entry search."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, h, w) -> index of the nearest entry by euclidean distance (B, h, w), computed in fp32."""
        B, D, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).contiguous().view(-1, D)  # (B*h*w, D)
            e = self.embedding.weight.float()  # (K, D)
            dist = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
                    - 2 * torch.einsum("bd,dn->bn", flat, e.transpose(0, 1)))  # (B*h*w, K)
        return torch.argmin(dist, dim=1).view(B, h, w)


# ---------------------------------------------------------------- the model


class ChameleonVQGAN(nn.Module):
    """Encoder + quant_conv + codebook + post_quant_conv + decoder, with taming's state_dict keys."""

    FORMAT = FORMAT

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    codebook_size, grid_size, _check_pixels = VQVAE.codebook_size, VQVAE.grid_size, VQVAE._check_pixels  # read self.cfg

    def forward(self, x: torch.Tensor):
        raise NotImplementedError("Chameleon's VQGAN is frozen here: use encode / decode (it cannot be trained with "
                                  "`earlyfusion tokenizer train`)")

    def _chunk(self) -> int:
        return max(1, CHUNK_PIXELS // (self.cfg.image_size ** 2))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) in [-1, 1] -> codes LongTensor (B, h, w) of the nearest codebook entries."""
        self._check_pixels(pixels)
        pixels = pixels.to(self.quant_conv.weight.dtype)
        out = [self.quantize.nearest(self.quant_conv(self.encoder(x))) for x in pixels.split(self._chunk())]
        return torch.cat(out).long()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> codebook vectors (B, embed_dim, h, w) (what post_quant_conv sees)."""
        if codes.dtype not in (torch.int32, torch.int64) or codes.ndim != 3:
            raise ValueError(f"expected an integer code grid (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must be in [0, {self.cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return self.quantize.embedding(codes.long()).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> pixels (B, 3, S, S) clamped to [-1, 1]."""
        q = self.lookup(codes)
        out = [self.decoder(self.post_quant_conv(z)) for z in q.split(self._chunk())]
        return torch.cat(out).clamp(-1.0, 1.0)
