"""The VQ-VAE's convolutional encoder and decoder, and their blocks.

Both are fully convolutional: any H x W that is a multiple of the downsampling goes through (the attention
blocks attend over however many positions there are). The encoder is a patchify stem (pixel unshuffle by
``patch_size``), conv stages of residual blocks with a stride-2 conv between stages, optionally a
VQGAN-style middle (residual block, self-attention, residual block) at the lowest resolution, and a 1x1 conv
to ``latent_dim``; the decoder mirrors it with nearest x2 upsampling + conv and ends in a pixel shuffle.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from earlyfusion.tokenizer.vq_config import VQConfig


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


class SelfAttention(nn.Module):
    """GroupNorm -> single-head self-attention over all positions of a feature map -> 1x1 projection, plus the input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


def middle(channels: int, groups: int) -> nn.Sequential:
    """VQGAN's middle at the lowest resolution: residual block, self-attention, residual block."""
    return nn.Sequential(ResBlock(channels, groups), SelfAttention(channels, groups), ResBlock(channels, groups))


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
    """Patchify (pixel unshuffle) -> conv stages with stride-2 downsampling [-> middle] -> latent_dim channels.

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
        if cfg.attention:
            self.mid = middle(ch[-1], g)
        self.norm_out = nn.LayerNorm(ch[-1]) if self.local else nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(x, self.patch_size)  # (B, 3*p*p, H/p, W/p)
        h = self.body(self.conv_in(h))  # (B, ch[-1], h, w)
        if hasattr(self, "mid"):
            h = self.mid(h)
        h = channel_norm(self.norm_out, h) if self.local else self.norm_out(h)
        return self.conv_out(F.silu(h))  # (B, latent_dim, h, w)


class Decoder(nn.Module):
    """latent_dim channels [-> middle] -> conv stages with x2 upsampling -> 3*p*p channels -> pixel shuffle."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, g, p = cfg.channels, cfg.norm_groups, cfg.patch_size
        self.patch_size = p
        self.conv_in = nn.Conv2d(cfg.latent_dim, ch[-1], 3, padding=1)
        if cfg.attention:
            self.mid = middle(ch[-1], g)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            layers += [ResBlock(ch[i], g) for _ in range(cfg.decoder_res_blocks)]
            if i > 0:
                layers.append(Upsample(ch[i], ch[i - 1]))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], 3 * p * p, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the decoder's last layer (where VQGAN's adaptive GAN weight compares gradient norms)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch[-1], h, w)
        if hasattr(self, "mid"):
            h = self.mid(h)
        h = self.body(h)  # (B, ch[0], H/p, W/p)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, 3*p*p, H/p, W/p)
        return F.pixel_shuffle(h, self.patch_size)  # (B, 3, H, W)
