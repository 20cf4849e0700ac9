"""The unified early-fusion decoder: a Llama-style transformer with Chameleon's QK-norm.

One decoder-only transformer over the merged (text + image code) vocabulary:
RMSNorm, SwiGLU, rotary position embeddings (rotate-half convention), no biases, causal
scaled-dot-product attention with grouped-query heads. Chameleon's additions for mixed-modality
stability are config options: QK-norm (a LayerNorm over head_dim with a weight and bias per head,
applied to q and k after the projection and before RoPE), dropout after attention and MLP, and the
reordered "swin" norm (``h = x + norm(attn(x)); out = h + norm(ffn(h))``).

The layout matches transformers' ``ChameleonForConditionalGeneration`` exactly (see
``model/chameleon_hf.py`` for the weight mapping and ``tests/test_parity.py``), so checkpoints are
exportable.

``Decoder.forward`` serves three callers:

* training on packed rows: ``doc_ids`` restricts attention to the token's own document and
  ``positions`` restart at 0 per document;
* sampling: a preallocated ``KVCache`` (no per-step allocation or concatenation), ``valid`` marks
  left padding so padded rows never attend to pad keys;
* evaluation: plain causal forward.

Architecture only, built from plain torch modules: every projection is a bias-free ``nn.Linear`` (weights in
torch's (out_features, in_features) layout), the token embedding an ``nn.Embedding``, and attention a small
``ScaledDotProduct`` submodule, so that PEFT, quantisation and other tools that look for those modules work on
it. Faster ways to run the same arithmetic (decode steps' products with (in, out) weight copies or row by row,
the blocked training attention kernel, the embedding whose backward is an index_add, compiled decode steps) are
put in from outside by swapping submodules: ``model/swap.py``, ``model/attention_plan.py``,
``model/decode_plan.py``, ``model/compile.py``. Losses live in ``training/``, decoding rules in ``sampling/``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from earlyfusion.core.errors import build_config
from earlyfusion.model.masks import DocumentChunks, Mask, causal_mask, document_chunks

# Chameleon's QK LayerNorm uses a fixed eps, independent of the RMSNorm eps.
QK_NORM_EPS = 1e-5
INIT_STD = 0.02

# How the projection weights of a checkpoint are stored (``DecoderConfig.weight_layout``): torch's nn.Linear layout.
# Checkpoints written before the field existed hold (in_features, out_features) weights, ``LEGACY_WEIGHT_LAYOUT``;
# ``model/upgrade.py`` converts them on load.
WEIGHT_LAYOUT = "out_in"
LEGACY_WEIGHT_LAYOUT = "in_out"


def llama_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """SwiGLU width with the parameter count of a 4·dim GELU MLP: 8·dim/3, rounded up to ``multiple_of``."""
    hidden = int(8 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


# ---------------------------------------------------------------- config


@dataclass
class DecoderConfig:
    vocab_size: int
    """Merged vocabulary size (special + text + image ids); taken from the Vocabulary, never set by hand."""
    dim: int
    """Model width."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = n_heads."""
    hidden_dim: int | None = None
    """SwiGLU hidden width; None = 8·dim/3 rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence (RoPE tables are precomputed up to it)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """Chameleon's QK-norm: LayerNorm over head_dim (per-head weight and bias) on q and k."""
    swin_norm: bool = False
    """Chameleon-34B's reordered norm: h = x + norm(attn(x)); out = h + norm(ffn(h))."""
    dropout: float = 0.0
    """Dropout after attention and after the MLP (training only)."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    image_positions: int = 0
    """Places within an image span that get a learned embedding, added to the token embedding: the token at
    ``<boi>`` is place 1, the next place 2, and so on up to ``<eoi>`` (excluded). 0 = none, as in Chameleon, whose
    codes know only their distance from other tokens (RoPE). With them, a code carries where in its picture it
    lies, which questions about places ("where is the circle?", "what is at the top left?") need. Set by ``train
    --image-positions`` to the places of the vocabulary's longest span (its length less the ``<eoi>``)."""
    image_ordinals: int = 1
    """How many pictures of a document have place embeddings of their own: the k-th picture's places use table k,
    and pictures past the last table share it. 1 = every picture alike. With 2 or more, a code also carries which
    picture it belongs to, which comparing two pictures needs ("which one holds the circle?", "what changed?")."""
    boi_id: int | None = None
    """The vocabulary's begin-image id: where ``image_positions`` start counting (set with them)."""
    eoi_id: int | None = None
    """The vocabulary's end-image id: where they stop."""
    weight_layout: str = WEIGHT_LAYOUT
    """How the projection weights are stored: always torch's (out_features, in_features). Written with every
    checkpoint so that older ones, whose config lacks it, are recognised (``model.upgrade.upgrade_state_dict``)."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len",
                     "image_ordinals"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"decoder {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"decoder dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"decoder n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"decoder head_dim {self.head_dim} (dim / n_heads) must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"decoder dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("decoder rope_theta and norm_eps must be positive")
        if not isinstance(self.image_positions, int) or self.image_positions < 0:
            raise ValueError(f"decoder image_positions must be a non-negative integer, got {self.image_positions!r}")
        if self.image_positions and not all(isinstance(i, int) and 0 <= i < self.vocab_size
                                            for i in (self.boi_id, self.eoi_id)):
            raise ValueError(f"decoder image_positions need boi_id and eoi_id in [0, {self.vocab_size}), got "
                             f"{self.boi_id!r} and {self.eoi_id!r}")
        if self.weight_layout != WEIGHT_LAYOUT:
            raise ValueError(f"decoder weight_layout must be {WEIGHT_LAYOUT!r}, got {self.weight_layout!r} (weights of "
                             "another layout are converted on load by model.upgrade.upgrade_state_dict)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, vocab_size: int | None = None, **overrides: Any) -> DecoderConfig:
        """A named size preset (``DECODER_PRESETS``) for a vocabulary, with optional field overrides."""
        if name not in DECODER_PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; choose one of {', '.join(DECODER_PRESETS)}")
        kwargs = dict(DECODER_PRESETS[name])
        if vocab_size is not None:
            kwargs["vocab_size"] = vocab_size
        if "vocab_size" not in kwargs:
            raise ValueError(f"decoder preset {name!r} needs a vocab_size (from the Vocabulary)")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown decoder config field(s): {', '.join(sorted(unknown))}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the "decoder" entry of a checkpoint's config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        """Inverse of ``to_dict``; an unknown/missing key or bad value raises a UserError naming it."""
        return build_config(cls, d, "decoder config")

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count, computed analytically (no allocation); ``embeddings=False`` leaves out
        the token embedding and output projection."""
        d, hd = self.dim, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        if self.qk_norm:
            attn += 2 * (self.n_heads + self.n_kv_heads) * hd
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
        total = self.n_layers * per_layer + d  # + final norm
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            total += self.image_positions * self.image_ordinals * d  # the image place embeddings
        return total


# ---------------------------------------------------------------- presets

DECODER_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: fast, every code path
    "tiny": dict(dim=64, n_layers=2, n_heads=4, max_seq_len=128),
    # the CPU demo: short shapes documents (16 image codes + a caption)
    "small": dict(dim=256, n_layers=4, n_heads=4, max_seq_len=256),
    # ~100M parameters with a ~9k vocabulary
    "base": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    # the published Chameleon-7B shape (~7.0B parameters)
    "chameleon-7b": dict(vocab_size=65536, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
}


# ---------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32, then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused call
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def projection(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free ``nn.Linear``, left uninitialised: ``Decoder.reset_parameters`` draws every weight once (nn.Linear's
    own initialisation would draw a 7B model's weights a second time)."""
    return skip_init(nn.Linear, in_features, out_features, bias=False, device=torch.get_default_device())


class HeadNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm statistics over head_dim, then a weight and bias per head.

    One module normalises the query heads and the key heads together (rows ``[:n_heads]`` of
    weight/bias belong to q, the rest to k): the same arithmetic as separate q/k norms, half the calls.
    """

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, n_heads, head_dim)
        return torch.addcmul(self.bias, F.layer_norm(x, (x.shape[-1],), eps=QK_NORM_EPS), self.weight)


def rope_table(head_dim: int, max_len: int, theta: float) -> Tensor:
    """(max_len, 2, head_dim) fp32: [:, 0] = cos, [:, 1] = signed sin, rotate-half convention.

    The sin row holds ``cat(-sin, sin)`` so that ``rotate_half(x) * sin == swap_halves(x) * row``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (max_len, head_dim/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return torch.stack([cos, sin], dim=1).float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """x (B, T, heads, head_dim); rope = (cos, signed sin), each (B or 1, T, 1, head_dim)."""
    cos, sin = rope
    first, second = x.chunk(2, dim=-1)
    # the halves swapped by concatenation rather than ``roll``: torch.compile turns roll's backward into a scalar
    # gather loop, and a concatenation's into vector copies
    return torch.addcmul(x * cos, torch.cat([second, first], dim=-1), sin)


def image_places(tokens: Tensor, boi: int, eoi: int, *, before: Tensor | None = None,
                 starts: Tensor | None = None) -> Tensor:
    """(B, T) long: each token's place within its image span, 1 at ``<boi>`` and counting up to the token before
    ``<eoi>``; 0 outside spans. ``before`` (B,): the place of the token just before these (a KV cache's next tokens;
    0 = outside a span). ``starts`` (B, T) bool: tokens that begin a document, which end any span left open (a
    packed row's cut document)."""
    B, T = tokens.shape
    t = torch.arange(T, device=tokens.device).expand(B, T)
    never_begun, never_ended = -(1 << 40), -(1 << 40) + 1  # before every index, an unopened span before an end
    last_boi = torch.where(tokens == boi, t, never_begun).cummax(dim=1).values
    if before is not None:  # the open span's <boi> lay ``before`` tokens back from the first of these
        last_boi = torch.maximum(last_boi, torch.where(before > 0, -before, never_begun)[:, None])
    ends = tokens == eoi
    if starts is not None:
        ends = ends | starts
    last_end = torch.where(ends, t, never_ended).cummax(dim=1).values
    # ">=": a document that starts with <boi> opens its span there
    return torch.where(last_boi >= last_end, t - last_boi + 1, 0)


def image_ordinals(tokens: Tensor, boi: int, *, before: Tensor | None = None,
                   starts: Tensor | None = None) -> Tensor:
    """(B, T) long: how many ``<boi>`` of its document lie at or before each token, so that the tokens of a
    document's k-th picture get k (text before its first picture 0). ``before`` (B,): the count of the tokens just
    before these (a KV cache's). ``starts`` (B, T) bool: tokens that begin a document, where the count restarts."""
    opened = (tokens == boi).long()
    count = opened.cumsum(dim=1)
    if starts is not None:  # less what the row's earlier documents opened
        count = count - torch.where(starts, count - opened, 0).cummax(dim=1).values
    if before is not None:
        count = count + before[:, None]
    return count


class KVCache:
    """Keys and values for incremental decoding, allocated once.

    ``k``/``v``: (n_layers, B, n_kv_heads, max_len, head_dim). A forward pass with the cache writes its
    T new keys/values in place at ``[length:length+T]`` and attends to ``[:length+T]``; ``length``
    then grows by T. ``valid`` (B, max_len) bool marks the positions that may be attended to
    (False for left padding and for finished rows that keep feeding padding).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.layers: list[tuple[Tensor, Tensor]] = [(self.k[i], self.v[i]) for i in range(n_layers)]  # views
        self.length = 0
        self.all_valid = True  # no False written to ``valid`` yet: lets forward skip the explicit mask
        self.place = torch.zeros(batch_size, dtype=torch.long, device=device)  # the last token's image place
        self.pictures = torch.zeros(batch_size, dtype=torch.long, device=device)  # pictures begun so far

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Empty the cache for reuse (no reallocation)."""
        self.length = 0
        self.valid.fill_(True)
        self.all_valid = True
        self.place.zero_()
        self.pictures.zero_()

    def attention_mask(self, T: int, valid: Tensor | None) -> tuple[Tensor | None, bool]:
        """(mask, is_causal) for T new queries at positions ``[length:length+T]``, recording their ``valid``
        (B, T) for later steps (None = all valid). The mask (B, 1, T, length+T) bool is None where plain
        (causal) attention over the cache is exact."""
        start = self.length
        end = start + T
        if valid is not None:
            self.valid[:, start:end] = valid
            if self.all_valid and not bool(valid.all()):
                self.all_valid = False
        elif not self.all_valid:
            self.valid[:, start:end] = True
        if self.all_valid:
            if T == 1:
                return None, False  # one query attends to every cached key
            if start == 0:
                return None, True
            return causal_mask(self.batch, T, start, self.valid.device), False
        if T == 1:  # one query (the newest position): every valid key, and itself
            allowed = self.valid[:, None, None, :end].clone()  # (B, 1, 1, end)
            allowed[..., -1] = True  # position end - 1 (a constant index: no recompiling per step)
            return allowed, False
        return causal_mask(self.batch, T, start, self.valid.device, keys=self.valid[:, None, :end]), False


def library_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """q (B, H, T, hd) attending to k/v (B, KV, S, hd) with torch's ``scaled_dot_product_attention``; grouped-query
    heads when H > KV."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


class ScaledDotProduct(nn.Module):
    """``library_attention`` as a module, so that another kernel of the same arithmetic can take its place
    (``model/attention_plan.py`` swaps in the blocked kernel where that trains faster)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, is_causal: bool) -> Tensor:
        if isinstance(mask, DocumentChunks):
            return mask.attend(q, k, v, library_attention)
        return library_attention(q, k, v, mask, is_causal)


class Attention(nn.Module):
    """Grouped-query attention with fused q/k/v projection, optional QK-norm, RoPE, causal SDPA."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = projection(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.proj = projection(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.qk_norm = HeadNorm(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim) if cfg.qk_norm else None
        self.attend = ScaledDotProduct()  # forward passes without a KV cache (training, evaluation)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Mask, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * KV, hd)  # (B, T, heads, hd): q heads, k heads, v heads
        qk, v = qkv[:, :, :H + KV], qkv[:, :, H + KV:]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rope(qk, rope)  # q and k heads together
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if kv is None:  # causal self-attention (``Decoder._mask``): whichever kernel ``attend`` holds
            y = self.attend(q, k, v, mask, is_causal)
        else:  # decoding with a cache: always the library kernel
            cache_k, cache_v = kv  # (B, KV, max_len, hd)
            end = start + T
            cache_k[:, :, start:end] = k
            cache_v[:, :, start:end] = v
            y = library_attention(q, cache_k[:, :, :end], cache_v[:, :, :end], mask, is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, dim)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up = projection(dim, 2 * hidden_dim)
        self.down = projection(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block (Llama), or Chameleon's swin-norm block (norm after attention/MLP, inside the residual)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.swin_norm = cfg.swin_norm
        self.dropout = cfg.dropout
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else x

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Mask, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        if self.swin_norm:
            h = x + self._drop(self.attn_norm(self.attn(x, rope, mask, is_causal, kv, start)))
            return h + self._drop(self.mlp_norm(self.mlp(h)))
        h = x + self._drop(self.attn(self.attn_norm(x), rope, mask, is_causal, kv, start))
        return h + self._drop(self.mlp(self.mlp_norm(h)))


# ---------------------------------------------------------------- model


class Decoder(nn.Module):
    """Token ids -> next-token logits (fp32) over the merged vocabulary."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        # row (k - 1) * image_positions + p - 1: place p (``image_places``) of picture k (``image_ordinals``)
        self.image_pos = (nn.Embedding(config.image_positions * config.image_ordinals, config.dim)
                          if config.image_positions else None)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else projection(config.dim, config.vocab_size)
        table = rope_table(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope", table, persistent=False)  # (max_seq_len, 2, head_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2·n_layers); norms 1/0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, HeadNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for block in self.layers:
            nn.init.normal_(block.attn.proj.weight, 0.0, out_std)
            nn.init.normal_(block.mlp.down.weight, 0.0, out_std)

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and up to ``max_len`` tokens (default max_seq_len);
        dtype and device follow the model's weights unless given."""
        c, w = self.config, self.tok_emb.weight
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len or c.max_seq_len, c.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    @staticmethod
    def _mask(B: int, T: int, doc_ids: Tensor | None, valid: Tensor | None,
              device: torch.device) -> tuple[Mask, bool]:
        """(attention mask (B, 1, T, T) bool, packed rows' ``DocumentChunks`` or None, is_causal) for a forward pass
        without a cache."""
        # shortcuts to plain causal attention; they read tensor values, which torch.compile cannot trace
        # without a graph break, so compiled training always builds the mask (the same attention)
        eager = not torch.compiler.is_compiling()
        if eager and valid is not None and bool(valid.all()):
            valid = None
        if eager and doc_ids is not None and bool((doc_ids == doc_ids[:, :1]).all()):
            doc_ids = None  # one document per row: plain causal
        if doc_ids is None and valid is None:
            return None, True
        if eager and valid is None and (chunks := document_chunks(doc_ids)) is not None:
            return chunks, False
        keys = valid[:, None, :] if valid is not None else None  # (B, 1, T)
        return causal_mask(B, T, 0, device, doc_ids=doc_ids, keys=keys), False

    def _image_place_embedding(self, tokens: Tensor, positions: Tensor | None, cache: KVCache | None) -> Tensor:
        """(B, T, dim): the embedding of each token's place in its image span and of which picture of its document
        that is (zero outside spans, and past the table's places); a cache carries the last place and the pictures
        begun to the next call."""
        c = self.config
        starts = None if positions is None or cache is not None else positions == 0  # packed rows restart at 0
        places = image_places(tokens, c.boi_id, c.eoi_id, before=None if cache is None else cache.place, starts=starts)
        ordinals = image_ordinals(tokens, c.boi_id, before=None if cache is None else cache.pictures, starts=starts)
        row = (ordinals.clamp(1, c.image_ordinals) - 1) * c.image_positions + places - 1
        if cache is not None:
            cache.place.copy_(places[:, -1])
            cache.pictures.copy_(ordinals[:, -1])
        inside = (places > 0) & (places <= c.image_positions)
        emb = self.image_pos(torch.where(inside, row, 0))
        return torch.where(inside[..., None], emb, 0)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, doc_ids: Tensor | None = None,
                valid: Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens (B, T) long -> logits (B, T, vocab_size) fp32.

        positions (B, T): RoPE positions (default: arange, offset by the cache length).
        doc_ids (B, T): packed training rows; a token attends only to earlier tokens of its document.
        valid (B, T) bool: False tokens are never attended to as keys (left padding); with a cache
        this is remembered for later steps.
        cache: KVCache from ``new_cache``; the new keys/values are written in place.
        return_hidden: also return the last block's output (B, T, dim), before the final norm
        (its norm is Chameleon's divergence predictor).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        start = 0
        if cache is not None:
            start = cache.length
            if doc_ids is not None:
                raise ValueError("doc_ids (packed training rows) cannot be combined with a KV cache")
            if cache.batch != B:
                raise ValueError(f"cache has {cache.batch} rows but tokens has {B}")
            if start + T > cache.max_len:
                raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {cache.max_len}")
        if positions is None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            table = self.rope[None, start:start + T]  # (1, T, 2, head_dim)
        else:
            table = self.rope[positions]  # (B, T, 2, head_dim)
        rope = (table[:, :, 0:1], table[:, :, 1:2])  # cos, signed sin: (B or 1, T, 1, head_dim)
        if cache is None:
            mask, is_causal = self._mask(B, T, doc_ids, valid, tokens.device)
        else:
            mask, is_causal = cache.attention_mask(T, valid)

        x = self.tok_emb(tokens)  # (B, T, dim)
        if self.image_pos is not None:
            x = x + self._image_place_embedding(tokens, positions, cache)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, is_causal, None if cache is None else cache.layers[i], start)
        if cache is not None:
            cache.length = start + T
        hidden = x
        h = self.norm(x)
        logits = (F.linear(h, self.tok_emb.weight) if self.output is None else self.output(h)).float()  # (B, T, V)
        return (logits, hidden) if return_hidden else logits
