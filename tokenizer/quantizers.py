"""The VQ-VAE's quantizers, from vector-quantize-pytorch, and the two operations the model needs of them.

* ``vq``: ``VectorQuantize`` configured against codebook collapse: a low-dimensional cosine lookup
  (``codebook_dim``), k-means initialisation from the first training batch, EMA updates and dead-code
  replacement. Its codebook is an EMA buffer (``_codebook.embed`` / ``embed_avg`` / ``cluster_size`` /
  ``initted``) and therefore part of ``state_dict()``.
* ``fsq``: ``FSQ`` (finite scalar quantization): a linear projection to ``len(fsq_levels)`` dimensions, each
  bounded and rounded to its number of levels; the code id enumerates the grid of levels, so the codebook
  size is their product and no entry can die.

Both run in fp32 even under autocast (``quantize`` and ``code_latents`` switch it off).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from earlyfusion.tokenizer.vq_config import VQConfig


def build_quantizer(cfg: VQConfig) -> nn.Module:
    if cfg.quantizer == "fsq":
        return FSQ(levels=list(cfg.fsq_levels), dim=cfg.latent_dim)
    return VectorQuantize(
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


def quantize(quantizer: nn.Module, flat: torch.Tensor, freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flat (B, N, D) -> quantized (B, N, D) fp32, code ids (B, N), auxiliary (commitment) loss (scalar, fp32).

    ``freeze``: never update a learned codebook (encoding only)."""
    with torch.autocast(device_type=flat.device.type, enabled=False):
        flat = flat.float()
        if isinstance(quantizer, FSQ):
            q, idx = quantizer(flat)  # (B, N, D), (B, N)
            return q, idx, flat.new_zeros(())
        return quantizer(flat, freeze_codebook=True) if freeze else quantizer(flat)


def code_latents(quantizer: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> the quantized latents the decoder sees (B, D, h, w), fp32."""
    with torch.autocast(device_type=codes.device.type, enabled=False):
        if isinstance(quantizer, FSQ):
            return quantizer.indices_to_codes(codes.long())  # (B, D, h, w)
        vectors = quantizer.codebook[codes.long()]  # (B, h, w, codebook_dim)
        return quantizer.project_out(vectors).permute(0, 3, 1, 2)  # (B, D, h, w)
