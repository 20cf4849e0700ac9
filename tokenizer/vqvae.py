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

import torch
import torch.nn as nn

from earlyfusion.tokenizer.nets import Decoder, Encoder
from earlyfusion.tokenizer.quantizers import build_quantizer, code_latents, quantize
from earlyfusion.tokenizer.vq_config import VQConfig

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
