"""The VQ-VAE image tokenizer's shape: ``VQConfig``, one field per choice, validated in ``__post_init__``.

The config is what ``config.json`` of a trained tokenizer stores (at top level) and what every later stage
derives the code grid and the image vocabulary size from. Fields added later have defaults that rebuild the
models saved before them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal


MAX_CODEBOOK = 2 ** 20
"""The most codebook entries: the codebook, its EMA statistics and the image vocabulary all grow with it, and a
million codes already passes any published image tokenizer."""
MAX_CHANNELS = 8192
"""The most channels of a conv stage or of the latent (a 3x3 conv at this width is already gigabytes)."""
MAX_RES_BLOCKS = 64
"""The most residual blocks per resolution level."""
MIN_GRID = 2
"""The fewest codes per side of the largest grid: an image of one code is no picture (nothing to place, no layout
for the decoder to learn)."""


def grid_pixels(rows: int, cols: int, downsample: int) -> tuple[int, int]:
    """(height, width) in pixels of a rows x cols code grid at ``downsample`` pixels a code a side (``VQConfig.
    pixels_of_grid``; this for code that is given the factor alone, such as the preprocessing)."""
    return rows * downsample, cols * downsample


def pixel_grid(height: int, width: int, downsample: int) -> tuple[int, int]:
    """(rows, columns) of the code grid of a height x width image at ``downsample`` pixels a code a side
    (``VQConfig.grid_of_pixels``); ValueError unless both sides are positive multiples of it."""
    if min(height, width) < downsample or height % downsample or width % downsample:
        raise ValueError(f"a {width}x{height} px image is not a whole number of {downsample}x{downsample} px codes")
    return height // downsample, width // downsample


@dataclass
class VQConfig:
    image_size: int = 32
    """Input images are image_size x image_size pixels (the largest grid; encode/decode also take smaller images
    whose sides are multiples of downsample)."""
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
    (e.g. two shapes sharing one patch); each entry must still be used, so larger codebooks need more images.
    With quantizer fsq it is the product of fsq_levels."""
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
    attention: bool = False
    """A residual block, single-head self-attention and another residual block at the lowest resolution of the
    encoder and of the decoder (VQGAN's middle): every code sees the whole image. Needs encoder_reach None."""
    quantizer: Literal["vq", "fsq"] = "vq"
    """vq: a learned codebook (EMA updates, k-means init, dead-code replacement); fsq: finite scalar quantization,
    each of len(fsq_levels) dimensions rounded to its number of levels (no codebook to collapse)."""
    fsq_levels: tuple[int, ...] = ()
    """Levels per dimension of the fsq quantizer (e.g. 8,8,8,5,5,5); unused by vq."""

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        for name in ("image_size", "downsample", "patch_size", "res_blocks", "decoder_res_blocks", "latent_dim",
                     "codebook_size", "codebook_dim", "kmeans_iters", "norm_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("commitment_weight", "ema_decay", "dead_code_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of downsample {self.downsample}")
        if self.image_size > 8192:
            raise ValueError(f"image_size must be at most 8192, got {self.image_size}")
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1) or self.downsample % self.patch_size:
            raise ValueError(f"patch_size must be a power of two dividing downsample {self.downsample}, got {self.patch_size}")
        if self.encoder_reach is not None:
            if not isinstance(self.encoder_reach, int) or self.encoder_reach < 0:
                raise ValueError(f"encoder_reach must be >= 0 (or None for the whole image), got {self.encoder_reach}")
            if self.patch_size != self.downsample:
                raise ValueError(f"encoder_reach needs patch_size == downsample (each code is one patch), got patch_size "
                                 f"{self.patch_size} and downsample {self.downsample}; or set encoder_reach to None")
            if self.attention:
                raise ValueError("attention lets every code see the whole image: it needs encoder_reach None")
        levels = int(math.log2(self.downsample // self.patch_size)) + 1
        if len(self.channels) != levels:
            raise ValueError(f"channels needs {levels} entries for downsample {self.downsample} with patch_size "
                             f"{self.patch_size} (one per resolution level), got {list(self.channels)}")
        if self.norm_groups < 1 or any(c < 1 or c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count must be a positive multiple of norm_groups {self.norm_groups}, got {list(self.channels)}")
        if self.res_blocks < 0 or self.decoder_res_blocks < 0 or self.latent_dim < 1 or self.kmeans_iters < 1:
            raise ValueError("res_blocks and decoder_res_blocks must be >= 0, latent_dim and kmeans_iters >= 1")
        if max(self.res_blocks, self.decoder_res_blocks) > MAX_RES_BLOCKS:
            raise ValueError(f"res_blocks and decoder_res_blocks must be at most {MAX_RES_BLOCKS}, got "
                             f"{max(self.res_blocks, self.decoder_res_blocks)}")
        if max(self.latent_dim, *self.channels) > MAX_CHANNELS:
            raise ValueError(f"channels and latent_dim must be at most {MAX_CHANNELS}, got "
                             f"{max(self.latent_dim, *self.channels)}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if self.codebook_size > MAX_CODEBOOK:
            fsq = self.quantizer == "fsq" and math.prod(self.fsq_levels) == self.codebook_size
            what = f"the product of fsq_levels {list(self.fsq_levels)}" if fsq else "codebook_size"
            raise ValueError(f"{what} must be at most {MAX_CODEBOOK} codes (the codebook and the image vocabulary "
                             f"grow with it), got {self.codebook_size}")
        if not 1 <= self.codebook_dim <= self.latent_dim:
            raise ValueError(f"codebook_dim must be in [1, latent_dim={self.latent_dim}], got {self.codebook_dim}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.dead_code_threshold < 1.0:
            raise ValueError(f"dead_code_threshold must be >= 1 (dead-code replacement prevents collapse), got {self.dead_code_threshold}")
        if self.commitment_weight < 0:
            raise ValueError("commitment_weight must not be negative")
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be vq or fsq, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or any(v < 3 for v in self.fsq_levels) or len(self.fsq_levels) > self.latent_dim:
                raise ValueError(f"fsq_levels needs 1 to latent_dim={self.latent_dim} entries, each >= 3 (e.g. 8,8,8,5,5,5), "
                                 f"got {list(self.fsq_levels)}")
            if math.prod(self.fsq_levels) != self.codebook_size:
                raise ValueError(f"with quantizer fsq the codebook size is the product of fsq_levels "
                                 f"{list(self.fsq_levels)} = {math.prod(self.fsq_levels)}, got codebook_size {self.codebook_size}")

    @property
    def levels(self) -> int:
        """Resolution levels after the stem (len(channels))."""
        return int(math.log2(self.downsample // self.patch_size)) + 1

    @property
    def grid_size(self) -> tuple[int, int]:
        """The code grid (rows, columns) of an image_size x image_size image: the largest grid."""
        return self.grid_of_pixels(self.image_size, self.image_size)

    def pixels_of_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """(height, width) in pixels of the image a rows x cols code grid encodes (and decodes to)."""
        return grid_pixels(rows, cols, self.downsample)

    def grid_of_pixels(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the code grid of a height x width image; ValueError unless both sides are whole codes."""
        return pixel_grid(height, width, self.downsample)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.grid_size
        return h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["fsq_levels"] = list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown image tokenizer config keys {unknown}")
        return cls(**d)
