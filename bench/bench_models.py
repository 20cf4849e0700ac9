"""What the bench runs: vocabulary layouts shaped like the real ones, our decoder and the peer with the same
weights, the flop and byte accounting, and a parity check."""

from __future__ import annotations

import torch

from earlyfusion.core.runtime import autocast
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.tokenizer.vocab_layout import SPECIAL_TOKENS, VocabLayout
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS

# Vocabulary shapes like the real ones: [5 specials | text BPE | image codes].
VOCAB_FOR_PRESET = {"tiny": (100, 32), "small": (400, 64), "base": (1024, 8192)}  # (text ids, codebook): small = the demo's
DEFAULT_GRID = VQ_PRESETS["default"].grid_size  # the default image tokenizer's code grid


class BenchLayout(VocabLayout):
    """The real ``VocabLayout`` of a vocabulary of these sizes, ``[bos, eos, pad, boi, eoi | text ids | image
    codes]``, made without a tokenizer (the bench feeds random ids); the sampler reads it as it reads a
    ``Vocabulary``. Built from sizes: ``BenchLayout(n_text, codebook_size, grid)``."""

    def __init__(self, n_text: int, codebook_size: int, grid: tuple[int, int] = DEFAULT_GRID, *, stops: bool = True):
        specials = dict(SPECIAL_TOKENS)
        super().__init__(special_tokens=specials, special_ids={role: i for i, role in enumerate(specials)},
                         text_start=len(specials), text_vocab_size=n_text, image_start=len(specials) + n_text,
                         codebook_size=codebook_size, grid=grid, image_tokenizer_fingerprint="")
        object.__setattr__(self, "stops", stops)  # frozen like its base

    @property
    def eos(self) -> int:
        return super().eos if self.stops else self.pad

    def no_stop(self) -> BenchLayout:
        """The same ids with end-of-sequence aliased to padding (never generated): text decoding runs
        its full length, like the peer's ``min_new_tokens``."""
        return BenchLayout(self.text_vocab_size, self.codebook_size, self.grid, stops=False)


def layout_for(preset: str, grid: tuple[int, int] = DEFAULT_GRID) -> BenchLayout:
    n_text, codebook = VOCAB_FOR_PRESET.get(preset, VOCAB_FOR_PRESET["small"])
    return BenchLayout(n_text, codebook, grid)


def text_prompts(layout: BenchLayout, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) long: bos then random text ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(layout.text_start, layout.image_start, (batch, length), generator=g)
    ids[:, 0] = layout.bos
    return ids


def build_pair(preset: str, vocab_size: int, seed: int = 0, **overrides) -> tuple[Decoder, torch.nn.Module]:
    """Our decoder (random weights) and the peer with the same shape and the same weights."""
    from earlyfusion.model.chameleon_hf import to_hf_model

    torch.manual_seed(seed)
    ours = Decoder(DecoderConfig.from_preset(preset, vocab_size, **overrides))
    peer = to_hf_model(ours)
    return ours, peer


def flop_params(cfg: DecoderConfig) -> int:
    """N of the 6N rule: every parameter except the input embedding (a lookup, no flops)."""
    total = cfg.num_params(embeddings=True)
    return total if cfg.tie_embeddings else total - cfg.vocab_size * cfg.dim


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> int:
    """Training flops per token: 6N + 12·L·H·Q·T (PaLM's accounting, attention included)."""
    return 6 * flop_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def weight_bytes(model: torch.nn.Module, cfg: DecoderConfig) -> int:
    """Bytes a decode step must read: every weight but the input embedding (one row of it is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_emb.weight
    return total if cfg.tie_embeddings else total - emb.numel() * emb.element_size()


def check_parity(ours: Decoder, peer: torch.nn.Module, vocab_size: int) -> float:
    """Max |logit difference| on a short batch (the peer's image-logit masking is a no-op here)."""
    x = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return float((ours.eval()(x) - peer.eval()(input_ids=x).logits.float()).abs().max())


def faster_mode(out: dict, prefix: str = "") -> str:
    """"ours" or "ours_compiled": whichever of our modes measured more ``{prefix}{mode}_tokens_per_s``."""
    return max((k for k in ("ours", "ours_compiled") if f"{prefix}{k}_tokens_per_s" in out),
               key=lambda k: out[f"{prefix}{k}_tokens_per_s"])


def peer_cfg_generate(hf: torch.nn.Module, rows: torch.Tensor, neg: torch.Tensor, span: int, image, cfg_scale: float,
                      layout: VocabLayout, precision: str, device_type: str) -> None:
    """transformers' ``generate()`` drawing ``span`` image codes after each prompt row with classifier-free guidance
    (``neg``: the unconditional prompts), sampled with the image settings ``image``, as the peer of our sampler."""
    with torch.no_grad(), autocast(precision, device_type):
        got = hf.generate(input_ids=rows, attention_mask=torch.ones_like(rows), max_new_tokens=span,
                          min_new_tokens=span, do_sample=True, temperature=image.temperature,
                          top_k=image.top_k, top_p=image.top_p, guidance_scale=cfg_scale,
                          negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg),
                          use_cache=True, eos_token_id=layout.eos, pad_token_id=layout.pad)
    assert got.shape == (rows.shape[0], rows.shape[1] + span), got.shape
