"""The decoder's training loss: next-token cross-entropy over both modalities plus Chameleon's z-loss.

``TokenLosses`` runs the decoder and turns its logits into per-token losses in one module, so that under
``--compile`` the loss is part of the compiled graph: the log-sum-exp reads the output layer's logits (bf16 under
autocast) once, the fp32 logits are never written out, and the backward pass makes the logits' gradient in one
kernel. ``lm_loss`` reduces the per-token losses to the loss to backpropagate and the statistics the log shows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from earlyfusion.training.data import IMAGE, TEXT


class TokenLosses(nn.Module):
    """decoder + per-token losses: (cross-entropy (B, T) fp32, log-sum-exp of the logits (B, T) fp32, mean norm
    of the last block's output (a scalar, no gradient; Chameleon's divergence signal)). Targets of -100 give a
    loss that ``lm_loss`` masks out."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: Tensor, targets: Tensor, positions: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        logits, hidden = self.decoder(tokens, positions=positions, doc_ids=doc_ids, return_hidden=True)
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)  # (B, T)
        target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lse - target_logit, lse, hidden.detach().float().norm(dim=-1).mean()


def lm_loss(losses: tuple[Tensor, Tensor, Tensor], targets: Tensor, modality: Tensor, z_weight: float,
            denom: float | None = None) -> tuple[Tensor, dict]:
    """(loss to backprop, stats) from ``TokenLosses``' output.

    targets (B, T) with -100 = no loss, modality (B, T) of the target token. The loss is the mean cross-entropy
    plus ``z_weight`` × the mean squared log-sum-exp over the target tokens; ``denom`` overrides the number of
    target tokens the mean is taken over (the global count under data parallelism). stats: summed per-modality
    losses and counts, the summed z term and the output norm, as Python numbers."""
    ce, lse, out_norm = losses
    mask = targets != -100
    ce = ce * mask
    z = (lse.square() * mask).sum()
    n = mask.sum().clamp(min=1) if denom is None else denom
    loss = (ce.sum() + z_weight * z) / n
    with torch.no_grad():
        stats = {
            "sum_text": (ce * (modality == TEXT)).sum().item(), "n_text": int(((modality == TEXT) & mask).sum()),
            "sum_image": (ce * (modality == IMAGE)).sum().item(), "n_image": int(((modality == IMAGE) & mask).sum()),
            "sum_all": ce.sum().item(), "sum_z": z.item(), "n_all": int(mask.sum()),
            "out_norm": float(out_norm),
        }
    return loss, stats
