"""Weight mapping between our Decoder and transformers' ``ChameleonForConditionalGeneration``.

The export/import path, and the reference for ``tests/test_parity.py`` (same shape + same weights
=> same text logits). transformers is imported lazily: it is a test/benchmark/export dependency only.

Name mapping (ours -> transformers), per layer ``i``. Both sides store projection weights in nn.Linear's
(out_features, in_features) layout, so tensors cross unchanged (fused ones split or concatenated).

    tok_emb.weight                 model.embed_tokens.weight
    layers.i.attn.qkv.weight       model.layers.i.self_attn.{q,k,v}_proj.weight   (split along dim 0)
    layers.i.attn.proj.weight      model.layers.i.self_attn.o_proj.weight
    layers.i.attn.qk_norm.*        model.layers.i.self_attn.{q,k}_norm.*          (rows [:n_heads] are q's)
    layers.i.attn_norm.weight      model.layers.i.input_layernorm.weight
    layers.i.mlp_norm.weight       model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.gate_up.weight    model.layers.i.mlp.{gate,up}_proj.weight       (split along dim 0)
    layers.i.mlp.down.weight       model.layers.i.mlp.down_proj.weight
    norm.weight                    model.norm.weight
    output.weight                  lm_head.weight  (tok_emb.weight when embeddings are tied)

``iter_from_hf`` / ``iter_to_hf`` convert one tensor at a time (what ``earlyfusion import`` / ``export``
stream through); the state-dict functions are built on them. ``reorder_vocab`` reorders the vocabulary
axis (embedding rows, output-layer columns) when the two sides number their tokens differently.

transformers' model also holds Chameleon's VQGAN encoder (``model.vqmodel.*``); the mapping leaves those
weights alone. Unless told otherwise, the config carries a tiny placeholder ``vq_config``
(``placeholder_vq_state`` gives matching weights) and an empty ``vocabulary_map``, so transformers'
masking of "IMGIMG" image-token logits is a no-op and every logit is the model's own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from earlyfusion.model.decoder import Decoder, DecoderConfig

HF_PREFIX = "model."
VQ_PREFIX = "model.vqmodel."

# A minimal VQGAN encoder for transformers' (unused) image path: keeps the exported model small.
PLACEHOLDER_VQ_CONFIG: dict[str, Any] = dict(
    embed_dim=4, num_embeddings=16, latent_channels=32, resolution=16, base_channels=32,
    channel_multiplier=[1], num_res_blocks=1,
)

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# per-layer one-to-one names: ours -> transformers
_LAYER_NAMES = {
    "attn.proj.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
# our fused tensors: name -> transformers parts, concatenated along dim 0 in this order
_FUSED = {
    "attn.qkv.weight": _QKV,
    "mlp.gate_up.weight": _GATE_UP,
    "attn.qk_norm.weight": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
    "attn.qk_norm.bias": ("self_attn.q_norm.bias", "self_attn.k_norm.bias"),
}
_PART_OF = {part: ours for ours, parts in _FUSED.items() for part in parts}


# DecoderConfig field -> ChameleonConfig field, for the fields that carry over unchanged (both directions)
_CONFIG_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "swin_norm": "swin_norm", "tie_embeddings": "tie_word_embeddings",
}


def to_hf_config(cfg: DecoderConfig, vq_config: dict[str, Any] | None = None, **fields: Any):
    """A ``transformers.ChameleonConfig`` with the same shape as ``cfg``; ``fields`` (``vocabulary_map``, special token
    ids) replace the defaults below."""
    from transformers import ChameleonConfig

    if not cfg.qk_norm:
        raise ValueError("transformers' Chameleon always applies QK-norm: only qk_norm=True decoders can be exported")
    if cfg.image_positions:
        raise ValueError("transformers' Chameleon has no image place embeddings (train --image-positions): only "
                         "decoders trained without them can be exported")
    values = dict(
        **{hf: getattr(cfg, ours) for ours, hf in _CONFIG_NAMES.items()},
        num_key_value_heads=cfg.n_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=0.0,
        vocabulary_map={},
        vq_config=dict(vq_config or PLACEHOLDER_VQ_CONFIG),
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return ChameleonConfig(**{**values, **fields})


def from_hf_config(hf_config) -> DecoderConfig:
    """Our DecoderConfig for a transformers ChameleonConfig (dropout 0: transformers' Chameleon has none)."""
    rope = hf_config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only the default RoPE is supported, not {rope.get('rope_type')!r}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Chameleon configs with biases are not supported (our decoder has none)")
    fields = {ours: getattr(hf_config, hf) for ours, hf in _CONFIG_NAMES.items()}
    fields.update(swin_norm=bool(fields["swin_norm"]), tie_embeddings=bool(fields["tie_embeddings"]))
    return DecoderConfig(
        **fields,
        n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        qk_norm=True,
    )


def iter_to_hf(items: Iterable[tuple[str, Tensor]], cfg: DecoderConfig) -> Iterator[tuple[str, Tensor]]:
    """Our decoder tensors -> (transformers name, tensor), one input tensor at a time (no tied ``lm_head``;
    fused tensors come out as views of their parts: ``.contiguous()`` them before saving)."""
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for name, t in items:
        if name == "tok_emb.weight":
            yield "model.embed_tokens.weight", t
        elif name == "norm.weight":
            yield "model.norm.weight", t
        elif name == "output.weight":
            yield "lm_head.weight", t
        elif m := _LAYER_RE.match(name):
            i, rest = m.groups()
            pre = f"{HF_PREFIX}layers.{i}."
            if rest in _FUSED:
                sizes = {"attn.qkv.weight": [H * hd, KV * hd, KV * hd], "mlp.gate_up.weight": [cfg.hidden_dim] * 2}
                for hf_name, part in zip(_FUSED[rest], t.split(sizes.get(rest, [H, KV]), dim=0)):
                    yield pre + hf_name, part
            elif rest in _LAYER_NAMES:
                yield pre + _LAYER_NAMES[rest], t
            else:
                raise KeyError(f"no transformers name for decoder weight {name!r}")
        else:
            raise KeyError(f"no transformers name for decoder weight {name!r}")


def to_hf_state_dict(state: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """Our decoder state dict -> transformers' names (decoder weights only; no ``model.vqmodel.*``)."""
    out = dict(iter_to_hf(state.items(), cfg))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def iter_from_hf(items: Iterable[tuple[str, Tensor]], *, tie_embeddings: bool = False) -> Iterator[tuple[str, Tensor]]:
    """transformers' (name, tensor) pairs -> ours, as they arrive (``model.vqmodel.*`` ignored): a fused
    tensor comes out once all its parts have been seen; KeyError for an unknown name or a missing part."""
    fused: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, t in items:
        if name.startswith(VQ_PREFIX):
            continue
        if name == "model.embed_tokens.weight":
            yield "tok_emb.weight", t
        elif name == "model.norm.weight":
            yield "norm.weight", t
        elif name == "lm_head.weight":
            if not tie_embeddings:
                yield "output.weight", t
        elif m := _HF_LAYER_RE.match(name):
            i, rest = m.groups()
            if rest in _PART_OF:
                key = (i, _PART_OF[rest])
                parts = fused.setdefault(key, {})
                parts[rest] = t
                order = _FUSED[key[1]]
                if len(parts) == len(order):
                    del fused[key]
                    yield f"layers.{i}.{key[1]}", torch.cat([parts.pop(p) for p in order], dim=0)
            elif rest in _HF_LAYER_NAMES:
                yield f"layers.{i}.{_HF_LAYER_NAMES[rest]}", t
            else:
                raise KeyError(f"unsupported transformers Chameleon weight {name!r}")
        else:
            raise KeyError(f"unsupported transformers Chameleon weight {name!r}")
    for (i, ours), parts in fused.items():
        missing = [p for p in _FUSED[ours] if p not in parts]
        raise KeyError(f"layer {i}: missing {', '.join(missing)}")


def from_hf_state_dict(hf_state: dict[str, Tensor], *, tie_embeddings: bool = False) -> dict[str, Tensor]:
    """transformers' ChameleonForConditionalGeneration state dict -> ours (``model.vqmodel.*`` ignored)."""
    return dict(iter_from_hf(hf_state.items(), tie_embeddings=tie_embeddings))


def reorder_vocab(name: str, t: Tensor, order: Tensor) -> Tensor:
    """Our decoder tensor ``name`` with its vocabulary axis reordered: entry ``i`` becomes old entry ``order[i]``
    (the rows of the embedding and of the output layer, stored (vocab, dim)); other tensors as they are."""
    if name in ("tok_emb.weight", "output.weight"):
        return t.index_select(0, order)
    return t


def placeholder_vq_state() -> dict[str, Tensor]:
    """Weights of the placeholder VQGAN encoder (``PLACEHOLDER_VQ_CONFIG``) under ``model.vqmodel.*``, so that a
    saved export loads in transformers without missing weights (the global RNG is left as it was)."""
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vq = ChameleonVQVAE(ChameleonVQVAEConfig(**PLACEHOLDER_VQ_CONFIG))
    return {VQ_PREFIX + k: v.detach().contiguous() for k, v in vq.state_dict().items()}


def to_hf_model(decoder: Decoder, vq_config: dict[str, Any] | None = None):
    """A transformers ChameleonForConditionalGeneration with ``decoder``'s shape and weights (eval mode)."""
    from transformers import ChameleonForConditionalGeneration

    hf = ChameleonForConditionalGeneration(to_hf_config(decoder.config, vq_config))
    weight = decoder.tok_emb.weight
    hf.to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(decoder.state_dict(), decoder.config), strict=False)
    missing = [k for k in missing if not k.startswith(VQ_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def from_hf_model(hf_model) -> Decoder:
    """Our Decoder with the shape and weights of a transformers ChameleonForConditionalGeneration."""
    cfg = from_hf_config(hf_model.config)
    decoder = Decoder(cfg)
    weight = hf_model.lm_head.weight
    decoder.to(device=weight.device, dtype=weight.dtype)
    decoder.load_state_dict(from_hf_state_dict(hf_model.state_dict(), tie_embeddings=cfg.tie_embeddings), strict=True)
    return decoder.eval()
