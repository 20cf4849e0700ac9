"""The decoder's training loss (training/lm_loss.py) against torch's cross-entropy and log-sum-exp."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from earlyfusion.model.compile import compiled
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.training.data import IMAGE, TEXT
from earlyfusion.training.lm_loss import TokenLosses, lm_loss

V = 53


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2, 20), generator=g)
    targets = torch.randint(0, V, (2, 20), generator=g)
    targets[0, :3] = -100
    targets[1, -5:] = -100
    modality = torch.where(torch.arange(20) < 12, TEXT, IMAGE).expand(2, 20)
    return tokens, targets, modality


def test_loss_and_stats_equal_the_reference():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_preset("tiny", V))
    tokens, targets, modality = batch()
    loss, stats = lm_loss(TokenLosses(model)(tokens, targets), targets, modality, z_weight=1e-3)
    logits = model(tokens)
    flat, tgt = logits.reshape(-1, V), targets.reshape(-1)
    keep = tgt != -100
    ce = F.cross_entropy(flat[keep], tgt[keep], reduction="none")
    z = torch.logsumexp(flat[keep], -1).square().sum()
    torch.testing.assert_close(loss, (ce.sum() + 1e-3 * z) / keep.sum(), rtol=1e-6, atol=1e-6)
    mod = modality.reshape(-1)[keep]
    assert stats["n_all"] == int(keep.sum()) == stats["n_text"] + stats["n_image"]
    assert abs(stats["sum_text"] - float(ce[mod == TEXT].sum())) < 1e-4
    assert abs(stats["sum_image"] - float(ce[mod == IMAGE].sum())) < 1e-4
    _, hidden = model(tokens, return_hidden=True)
    assert abs(stats["out_norm"] - float(hidden.norm(dim=-1).mean())) < 1e-5
    # gradients reach every weight, and masked targets contribute nothing
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compiled_loss_equals_eager():
    torch.manual_seed(1)
    model = Decoder(DecoderConfig.from_preset("tiny", V))
    tokens, targets, _ = batch(1)
    losses = TokenLosses(model)
    eager = losses(tokens, targets)
    fused = compiled(losses, dynamic=False)(tokens, targets)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
