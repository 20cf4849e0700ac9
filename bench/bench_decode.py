"""Decoding speed: our sampler in every way it can run its per-token steps, the bare model, and the peer's
``generate()``; image generation with classifier-free guidance; the image tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch

from earlyfusion.model.decode_plan import PIN_ENV, decode_plan
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.core.runtime import autocast, intra_op_threads
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.tokenizer.vqvae import VQVAE

from bench_machine import CopyCeiling, alternate, log, median, timed
from bench_models import VOCAB_FOR_PRESET, BenchLayout, build_pair, faster_mode, layout_for, text_prompts, weight_bytes

# Pinned step modes timed beside the two a user gets (eager / --compile, each the timed choice): result key -> mode
PINNED_MODES = {"mode_eager": "eager", "mode_eager_1": "eager-1", "mode_eager_rows": "eager-rows",
                "mode_compiled_rowwise": "compiled-rowwise", "mode_compiled_library": "compiled-library"}


@contextmanager
def pinned(mode: str | None):
    """Sampling inside the block runs its per-token steps in ``mode`` (``model.decode_plan.MODES``; None = the
    timed choice, as users get it)."""
    before = os.environ.get(PIN_ENV)
    if mode is not None:
        os.environ[PIN_ENV] = mode
    else:
        os.environ.pop(PIN_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PIN_ENV, None)
        else:
            os.environ[PIN_ENV] = before


def ours_sampler_fn(model: Decoder, layout: BenchLayout, prompts: torch.Tensor, new_tokens: int,
                    compile: bool = False, mode: str | None = None, precision: str = "no") -> Callable[[], int]:
    """Our real sampling loop, greedy text, as users run it (decoding rules, stop checks and all);
    ``compile``: as ``earlyfusion sample --compile``; ``mode``: a pinned step mode instead of the timed choice;
    ``precision``: "bf16" runs it under bf16 autocast, as ``--mixed-precision bf16`` does."""
    from earlyfusion.sampling.generate import sample_tokens
    from earlyfusion.sampling.processors import SamplerParams

    greedy = SamplerParams(temperature=0.0)
    rows = prompts.tolist()
    no_stop = layout.no_stop()

    def run() -> int:
        with pinned(mode), autocast(precision, "cpu"):
            out, _ = sample_tokens(model, no_stop, rows, modality="text", max_new_tokens=new_tokens,
                                   text=greedy, image=greedy, compile=compile)
        assert all(len(o) == new_tokens for o in out), [len(o) for o in out]
        return new_tokens

    return run


def ours_raw_fn(model: Decoder, prompts: torch.Tensor, new_tokens: int) -> Callable[[], int]:
    """The bare model: prefill + ``new_tokens - 1`` cached steps with argmax, no sampling rules."""

    @torch.no_grad()
    def run() -> int:
        cache = model.new_cache(prompts.shape[0], max_len=prompts.shape[1] + new_tokens)
        logits = model(prompts, cache=cache)
        for _ in range(new_tokens - 1):
            tok = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            logits = model(tok, cache=cache)
        return new_tokens

    return run


def peer_generate_fn(peer: torch.nn.Module, layout: BenchLayout, prompts: torch.Tensor,
                     new_tokens: int) -> Callable[[], int]:
    """The peer's ``generate()``: greedy, KV cache, exactly ``new_tokens`` new tokens."""
    mask = torch.ones_like(prompts)

    @torch.no_grad()
    def run() -> int:
        out = peer.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                            eos_token_id=layout.eos, pad_token_id=layout.pad)
        assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
        return new_tokens

    return run


def on_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``torch.set_num_threads(n)`` (the previous setting restored afterwards)."""

    def run() -> object:
        with intra_op_threads(n):
            return fn()

    return run


def bench_decode(preset: str, *, batches: tuple[int, ...], prompt_len: int, new_tokens: int, warmup: int,
                 iters: int, ceiling: CopyCeiling | None = None, compile: bool = True, bf16: bool = False) -> dict:
    """Decode tokens/s (all rows counted) at each batch size: our sampler as users run it (``ours``: eager steps;
    ``ours_compiled``: ``--compile``; each runs the step mode ``model.decode_plan`` timed fastest), each step mode
    pinned (``mode_*``), with ``bf16`` the two user modes under bf16 autocast (``bf16_ours*``), our bare loop, and
    the peer. "best" is the faster of our two fp32 user modes; "fastest" the fastest of every mode of ours.

    ``ceiling``: a memory copy timed in the same alternating rounds (the bandwidth available under the
    same load from other processes)."""
    layout = layout_for(preset)
    ours, hf = build_pair(preset, layout.vocab_size, max_seq_len=max(prompt_len + new_tokens, 16))
    ours.eval()
    hf.eval()
    cfg = ours.config
    threads = torch.get_num_threads()
    out = {"preset": preset, "prompt_len": prompt_len, "new_tokens": new_tokens, "vocab_size": layout.vocab_size,
           "weight_bytes": weight_bytes(ours, cfg), "iters": iters}
    for B in batches:
        prompts = text_prompts(layout, B, prompt_len, seed=B)
        fns = {"ours": ours_sampler_fn(ours, layout, prompts, new_tokens)}
        if compile:
            fns["ours_compiled"] = ours_sampler_fn(ours, layout, prompts, new_tokens, compile=True)
            log(f"  decode {preset} batch {B}: timing the step modes for --compile (compiles two, once)")
            out[f"b{B}_compile_s"] = timed(fns["ours_compiled"])
        for key, mode in PINNED_MODES.items():
            if ((mode in ("eager-1", "eager-rows") and threads == 1) or (mode == "eager-rows" and B == 1)
                    or (mode.startswith("compiled") and not compile)):
                continue
            fns[key] = ours_sampler_fn(ours, layout, prompts, new_tokens, compile=mode.startswith("compiled"), mode=mode)
        if bf16:
            fns["bf16_ours"] = ours_sampler_fn(ours, layout, prompts, new_tokens, precision="bf16")
            if compile:
                fns["bf16_ours_compiled"] = ours_sampler_fn(ours, layout, prompts, new_tokens, compile=True,
                                                            precision="bf16")
                log(f"  decode {preset} batch {B}: timing the step modes for --compile under bf16 (compiles two, once)")
                timed(fns["bf16_ours_compiled"])
        fns["ours_raw"] = ours_raw_fn(ours, prompts, new_tokens)
        fns["peer"] = peer_generate_fn(hf, layout, prompts, new_tokens)
        plan = decode_plan(ours, B, compile=False)
        if plan.threads == 1:  # our eager steps run on one thread here: time the peer on one thread as well
            fns["peer_1thread"] = on_threads(1, fns["peer"])
        if ceiling is not None:
            fns["ceiling"] = ceiling
        log(f"  decode {preset} batch {B}: {new_tokens} new tokens after a {prompt_len}-token prompt, {len(fns)} ways")
        times = alternate(fns, warmup, iters)
        ceiling_times = times.pop("ceiling", None)
        if ceiling_times is not None:
            out[f"b{B}_copy_gbps_alongside"] = ceiling.rate(median(ceiling_times))
        for k, ts in times.items():
            steps_per_s = new_tokens / median(ts)
            out[f"b{B}_{k}_tokens_per_s"] = B * steps_per_s
            out[f"b{B}_{k}_gbps"] = out["weight_bytes"] * steps_per_s / 1e9
        out[f"b{B}_plan_eager"] = plan.mode
        if compile:
            out[f"b{B}_plan_compiled"] = decode_plan(ours, B, compile=True).mode
            out[f"b{B}_compiled_vs_eager"] = out[f"b{B}_ours_compiled_tokens_per_s"] / out[f"b{B}_ours_tokens_per_s"]
        out[f"b{B}_speedup"] = out[f"b{B}_ours_tokens_per_s"] / out[f"b{B}_peer_tokens_per_s"]
        best = faster_mode(out, f"b{B}_")
        out[f"b{B}_best_mode"] = "compiled" if best == "ours_compiled" else "eager"
        out[f"b{B}_best_speedup"] = out[f"b{B}_{best}_tokens_per_s"] / out[f"b{B}_peer_tokens_per_s"]
        out[f"b{B}_best_gbps"] = out[f"b{B}_{best}_gbps"]
        ours_keys = [k for k in times if k not in ("peer", "peer_1thread", "ours_raw")]
        out[f"b{B}_fastest_mode"] = max(ours_keys, key=lambda k: out[f"b{B}_{k}_tokens_per_s"])
        if "peer_1thread" in times:
            out[f"b{B}_best_speedup_vs_peer_1thread"] = (out[f"b{B}_{best}_tokens_per_s"]
                                                         / out[f"b{B}_peer_1thread_tokens_per_s"])
        if ceiling_times is not None:
            out[f"b{B}_bandwidth_fraction_alongside"] = out[f"b{B}_best_gbps"] / out[f"b{B}_copy_gbps_alongside"]
    return out


# ---------------------------------------------------------------- image generation and the image tokenizer


def bench_image_generation(preset: str = "small", vq_preset: str = "default", *, prompt_len: int = 12,
                           cfg_scale: float | None = None, num_samples: int = 8, warmup: int = 1, iters: int = 3) -> dict:
    """Seconds per image (sampling + VQ decode) with and without batched CFG (default: the sampler's scale);
    images/s at ``num_samples``."""
    from earlyfusion.sampling.generate import DEFAULT_CFG, sample_tokens
    from earlyfusion.sampling.processors import SamplerParams

    cfg_scale = DEFAULT_CFG if cfg_scale is None else cfg_scale
    vq_cfg = VQ_PRESETS[vq_preset]
    layout = BenchLayout(VOCAB_FOR_PRESET.get(preset, VOCAB_FOR_PRESET["small"])[0], vq_cfg.codebook_size,
                         vq_cfg.grid_size)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_preset(preset, layout.vocab_size)).eval()
    vq = VQVAE(vq_cfg).eval()
    span = layout.tokens_per_image + 2
    text = SamplerParams(temperature=0.7, top_k=20)
    image = SamplerParams(temperature=1.0, top_k=max(1, layout.codebook_size // 2))

    def fn(n: int, guidance: float) -> Callable[[], None]:
        rows = text_prompts(layout, n, prompt_len, seed=n).tolist()
        uncond = [[layout.bos] for _ in rows] if guidance != 1.0 else None
        g = torch.Generator().manual_seed(0)

        @torch.no_grad()
        def run() -> None:
            out, reasons = sample_tokens(model, layout, rows, modality="image", max_new_tokens=span, text=text,
                                         image=image, generator=g, guidance=guidance, uncond=uncond)
            codes = torch.tensor([o[1:-1] for o in out]) - layout.image_start  # (n, h*w)
            assert codes.shape == (n, layout.tokens_per_image) and all(r == "image" for r in reasons)
            vq.decode(codes.reshape(n, *layout.grid))

        return run

    times = alternate({"cfg_1": fn(1, cfg_scale), "nocfg_1": fn(1, 1.0), f"cfg_{num_samples}": fn(num_samples, cfg_scale)},
                      warmup, iters)
    s_cfg, s_nocfg = median(times["cfg_1"]), median(times["nocfg_1"])
    return {"preset": preset, "vq_preset": vq_preset, "codes_per_image": layout.tokens_per_image,
            "cfg_scale": cfg_scale, "num_samples": num_samples, "iters": iters,
            "s_per_image_cfg": s_cfg, "s_per_image_nocfg": s_nocfg, "cfg_cost_ratio": s_cfg / s_nocfg,
            f"images_per_s_cfg_{num_samples}": num_samples / median(times[f"cfg_{num_samples}"])}


def bench_image_tokenizer(vq_preset: str = "default", *, batch: int = 64, warmup: int = 1, iters: int = 3) -> dict:
    """Encode and decode images/s of the image tokenizer (random weights, random pixels)."""
    cfg = VQ_PRESETS[vq_preset]
    torch.manual_seed(0)
    vq = VQVAE(cfg).eval()
    pixels = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    codes = torch.randint(0, cfg.codebook_size, (batch, *cfg.grid_size))
    times = alternate({"encode": lambda: vq.encode(pixels), "decode": lambda: vq.decode(codes)}, warmup, iters)
    return {"vq_preset": vq_preset, "image_size": cfg.image_size, "batch": batch, "iters": iters,
            "encode_images_per_s": batch / median(times["encode"]),
            "decode_images_per_s": batch / median(times["decode"])}
