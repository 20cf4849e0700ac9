"""Parity with transformers' ChameleonForConditionalGeneration (same shape, same weights => same logits).

This pins QK-norm (per-head LayerNorm weight/bias, after projection, before RoPE), the rotate-half RoPE
convention, norm placement (pre-norm and swin-norm) and the eps values to the standard Chameleon
ones, and tests the export/import weight mapping in model/chameleon_hf.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from earlyfusion.model.chameleon_hf import (  # noqa: E402
    from_hf_config,
    from_hf_model,
    from_hf_state_dict,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)
from earlyfusion.model.decoder import Decoder, DecoderConfig  # noqa: E402

V = 101


def randomised(**overrides) -> Decoder:
    """A tiny decoder whose every weight (norm weights and QK-norm biases too) is random, per head."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_preset("tiny", V, max_seq_len=64, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.3 if "norm" in name else 0.05) * torch.randn_like(p))
    return model


def ids(B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
@pytest.mark.parametrize("overrides", [dict(), dict(swin_norm=True), dict(n_kv_heads=2),
                                       dict(swin_norm=True, tie_embeddings=True, rope_theta=500.0)],
                         ids=["prenorm", "swin", "gqa", "swin-tied-theta"])
def test_parity_logits_with_transformers_chameleon(overrides):
    ours = randomised(**overrides)
    hf = to_hf_model(ours)
    x = ids()
    a = ours(x)
    b = hf(input_ids=x).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max()
    assert a.std() > 0.1  # not a trivially small signal
    # and a wrong mapping would be caught: swap q_norm weights between heads
    sd = to_hf_state_dict(ours.state_dict(), ours.config)
    key = "model.layers.0.self_attn.q_norm.weight"
    sd[key] = sd[key].flip(0)
    hf.load_state_dict(sd, strict=False)
    assert (hf(input_ids=x).logits - a).abs().max().item() > 1e-3


@torch.no_grad()
def test_parity_with_transformers_kv_cache_decoding():
    ours = randomised(swin_norm=True)
    hf = to_hf_model(ours)
    x = ids(1, 6)
    out = hf.generate(input_ids=x, max_new_tokens=10, do_sample=False, pad_token_id=0)
    seq = out[0].tolist()
    cache = ours.new_cache(1, max_len=16)
    logits = ours(x, cache=cache)[:, -1]
    mine = x[0].tolist()
    for _ in range(10):
        t = int(logits.argmax(-1))
        mine.append(t)
        logits = ours(torch.tensor([[t]]), cache=cache)[:, -1]
    assert mine == seq


@torch.no_grad()
@pytest.mark.parametrize("overrides", [dict(), dict(swin_norm=True, n_kv_heads=1, tie_embeddings=True)])
def test_parity_round_trip_hf_to_ours(overrides):
    ours = randomised(**overrides)
    hf = to_hf_model(ours)
    back = from_hf_model(hf)
    assert back.config == ours.config
    state, back_state = ours.state_dict(), back.state_dict()
    assert state.keys() == back_state.keys()
    assert all(torch.equal(state[k], back_state[k]) for k in state)
    x = ids()
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)
    # the pure state-dict functions invert each other
    again = from_hf_state_dict(to_hf_state_dict(state, ours.config), tie_embeddings=ours.config.tie_embeddings)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_parity_config_mapping():
    cfg = DecoderConfig.from_preset("tiny", V, n_kv_heads=2, swin_norm=True, rope_theta=123.0, norm_eps=1e-6)
    hf_cfg = to_hf_config(cfg)
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads,
            hf_cfg.intermediate_size) == (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim)
    assert hf_cfg.swin_norm and hf_cfg.vocabulary_map == {}
    assert from_hf_config(hf_cfg) == cfg
    with pytest.raises(ValueError):
        to_hf_config(DecoderConfig.from_preset("tiny", V, qk_norm=False))
    with pytest.raises(KeyError):
        from_hf_state_dict({"model.layers.0.self_attn.q_proj.bias": torch.zeros(3)})
