"""``make bench``: our speed side by side with transformers' Chameleon, and this machine's own ceilings.

One run on one machine measures:

* ceilings: fp32 matmul GFLOP/s (large square ``torch.mm``, best of several) and memory copy GB/s
  (large ``copy_``, read + write bytes counted), at ``--threads``;
* training (forward + backward + AdamW step) tokens/s for each preset, ours vs the peer — transformers'
  ``ChameleonForConditionalGeneration`` built through ``model/chameleon_hf.py`` with the same shape and
  the same weights, in train mode, fed the same batch, with the same cross-entropy on its logits;
  model GFLOP/s = tokens/s × (6N + 12·L·H·Q·T) and its fraction of the matmul ceiling;
* decoding tokens/s at batch 1 and 8 with the KV cache: ours through the real sampling loop
  (``sampling.generate.sample_tokens``, greedy) and as a bare ``Decoder`` + ``KVCache`` loop, vs the
  peer's ``generate()`` (greedy, ``min_new_tokens = max_new_tokens``, ``use_cache=True``), also on one
  thread where our per-token steps run on one (``earlyfusion.runtime.step_threads``); effective
  GB/s = weight bytes × decode steps/s against the copy ceiling;
* image generation for the demo shape (``small`` decoder, ``default`` image tokenizer: 4×4 codes):
  seconds per image with and without batched classifier-free guidance, and images/s at 8 samples;
* the image tokenizer: encode and decode images/s.

Random weights throughout: speed does not depend on what the weights are, and image mode always emits
exactly h·w codes. Timed iterations follow warm-up iterations; ours and the peer alternate so that load
from other processes falls on both; the median is reported.

Writes ``bench/RESULTS.md`` (also printed) and ``bench/results.json`` (the five interface keys, plain
numbers, plus every absolute figure). ``--profile`` prints where the time of one of our decode steps
and one training step goes (torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/run.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from earlyfusion.model.compile import compiled  # noqa: E402
from earlyfusion.model.decoder import Decoder, DecoderConfig  # noqa: E402
from earlyfusion.model.decode_plan import decode_plan  # noqa: E402
from earlyfusion.runtime import intra_op_threads  # noqa: E402
from earlyfusion.tokenizer.vqvae import VQ_PRESETS, VQVAE  # noqa: E402

from bench_machine import (CopyCeiling, MatmulCeiling, alternate, busy_processes, copy_gbps,  # noqa: E402
                           cpu_busy_fraction, load_average, log, machine_info, matmul_gflops, matvec_gbps, median,
                           timed)
from bench_report import INTERFACE_KEYS, _fmt_load, interface, render  # noqa: E402,F401 - INTERFACE_KEYS: the keys callers read

# Vocabulary shapes like the real ones: [5 specials | text BPE | image codes].
N_SPECIAL = 5
VOCAB_FOR_PRESET = {"tiny": (100, 32), "small": (400, 64), "base": (1024, 8192)}  # (text ids, codebook): small = the demo's
DEFAULT_GRID = VQ_PRESETS["default"].grid_size  # the default image tokenizer's code grid


@dataclass(frozen=True)
class BenchLayout:
    """[bos, eos, pad, boi, eoi | text ids | image codes] — satisfies ``sampling.processors.IdLayout``."""

    n_text: int
    codebook_size: int
    grid: tuple[int, int] = DEFAULT_GRID
    bos: int = 0
    eos: int = 1
    pad: int = 2
    boi: int = 3
    eoi: int = 4

    @property
    def text_start(self) -> int:
        return N_SPECIAL

    @property
    def image_start(self) -> int:
        return N_SPECIAL + self.n_text

    @property
    def vocab_size(self) -> int:
        return self.image_start + self.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def no_stop(self) -> BenchLayout:
        """The same ids with end-of-sequence aliased to padding (never generated): text decoding runs
        its full length, like the peer's ``min_new_tokens``."""
        return BenchLayout(self.n_text, self.codebook_size, self.grid, eos=self.pad)


def layout_for(preset: str, grid: tuple[int, int] = DEFAULT_GRID) -> BenchLayout:
    n_text, codebook = VOCAB_FOR_PRESET.get(preset, VOCAB_FOR_PRESET["small"])
    return BenchLayout(n_text, codebook, grid)


def text_prompts(layout: BenchLayout, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) long: bos then random text ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(layout.text_start, layout.image_start, (batch, length), generator=g)
    ids[:, 0] = layout.bos
    return ids


# ---------------------------------------------------------------- timing helpers


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


# ---------------------------------------------------------------- training


def _faster_mode(out: dict, prefix: str = "") -> str:
    """"ours" or "ours_compiled": whichever of our modes measured more ``{prefix}{mode}_tokens_per_s``."""
    return max((k for k in ("ours", "ours_compiled") if f"{prefix}{k}_tokens_per_s" in out),
               key=lambda k: out[f"{prefix}{k}_tokens_per_s"])


def bench_train(preset: str, *, batch: int, seq_len: int, warmup: int, iters: int, vocab_size: int | None = None,
                peer: bool = True, ceiling: MatmulCeiling | None = None, compile: bool = True) -> dict:
    """tokens/s of forward + backward + AdamW step, ours (eager and, with ``compile``, as ``train --compile``
    runs it) vs the peer (same weights, batch, loss, fused AdamW). "best" is the faster of our two modes.

    ``ceiling``: a matmul timed in the same alternating rounds, so that the fraction of the ceiling
    compares figures taken under the same load from other processes."""
    vocab_size = vocab_size or layout_for(preset).vocab_size
    if peer:
        ours, hf = build_pair(preset, vocab_size, max_seq_len=max(seq_len, 16))
        parity = check_parity(ours, hf, vocab_size)
    else:
        torch.manual_seed(0)
        ours, hf, parity = Decoder(DecoderConfig.from_preset(preset, vocab_size, max_seq_len=max(seq_len, 16))), None, None
    cfg = ours.config
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step_fn(model: torch.nn.Module, logits_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as training
        model.train()

        def step() -> None:
            logits = logits_of()  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {"ours": step_fn(ours, lambda: ours(x))}
    compile_s = None
    if compile:
        forward = compiled(ours, dynamic=False)
        fns["ours_compiled"] = step_fn(ours, lambda: forward(x))
        log(f"  train {preset}: compiling the training step (torch.compile, once)")
        compile_s = timed(fns["ours_compiled"])
    if hf is not None:
        fns["peer"] = step_fn(hf, lambda: hf(input_ids=x).logits)
    if ceiling is not None:
        fns["ceiling"] = ceiling
    times = alternate(fns, warmup, iters)
    ceiling_times = times.pop("ceiling", None)
    n_tokens = batch * seq_len
    fpt = flops_per_token(cfg, seq_len)
    out = {"preset": preset, "batch": batch, "seq_len": seq_len, "vocab_size": vocab_size, "iters": iters,
           "params": cfg.num_params(), "flop_params": flop_params(cfg), "flops_per_token": fpt,
           "parity_max_abs_logit_diff": parity, "compile_s": compile_s}
    for k, ts in times.items():
        tps = n_tokens / median(ts)
        out[f"{k}_tokens_per_s"] = tps
        out[f"{k}_gflops"] = tps * fpt / 1e9
        out[f"{k}_step_s"] = median(ts)
    best = _faster_mode(out)
    out["best_mode"] = "compiled" if best == "ours_compiled" else "eager"
    out["best_tokens_per_s"], out["best_gflops"] = out[f"{best}_tokens_per_s"], out[f"{best}_gflops"]
    if hf is not None:
        out["speedup"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
        out["best_speedup"] = out["best_tokens_per_s"] / out["peer_tokens_per_s"]
    if ceiling_times is not None:
        out["matmul_gflops_alongside"] = ceiling.rate(median(ceiling_times))
        out["ours_ceiling_fraction_alongside"] = out["ours_gflops"] / out["matmul_gflops_alongside"]
        out["best_ceiling_fraction_alongside"] = out["best_gflops"] / out["matmul_gflops_alongside"]
    return out


# ---------------------------------------------------------------- decoding


def ours_sampler_fn(model: Decoder, layout: BenchLayout, prompts: torch.Tensor, new_tokens: int,
                    compile: bool = False) -> Callable[[], int]:
    """Our real sampling loop, greedy text, as users run it (decoding rules, stop checks and all);
    ``compile``: as ``earlyfusion sample --compile`` (torch.compile'd per-token step)."""
    from earlyfusion.sampling.generate import sample_tokens
    from earlyfusion.sampling.processors import SamplerParams

    greedy = SamplerParams(temperature=0.0)
    rows = prompts.tolist()
    no_stop = layout.no_stop()

    def run() -> int:
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
                 iters: int, ceiling: CopyCeiling | None = None, compile: bool = True) -> dict:
    """Decode tokens/s (all rows counted) at each batch size: our sampler (eager and, with ``compile``, as
    ``--compile`` runs it), our bare loop, the peer. "best" is the faster of our two sampler modes.

    ``ceiling``: a memory copy timed in the same alternating rounds (the bandwidth available under the
    same load from other processes)."""
    layout = layout_for(preset)
    ours, hf = build_pair(preset, layout.vocab_size, max_seq_len=max(prompt_len + new_tokens, 16))
    ours.eval()
    hf.eval()
    cfg = ours.config
    out = {"preset": preset, "prompt_len": prompt_len, "new_tokens": new_tokens, "vocab_size": layout.vocab_size,
           "weight_bytes": weight_bytes(ours, cfg), "iters": iters}
    for B in batches:
        prompts = text_prompts(layout, B, prompt_len, seed=B)
        fns = {"ours": ours_sampler_fn(ours, layout, prompts, new_tokens),
               "ours_raw": ours_raw_fn(ours, prompts, new_tokens),
               "peer": peer_generate_fn(hf, layout, prompts, new_tokens)}
        if compile:
            fns["ours_compiled"] = ours_sampler_fn(ours, layout, prompts, new_tokens, compile=True)
            if "compile_s" not in out:
                log(f"  decode {preset}: compiling the decode step (torch.compile, once)")
                out["compile_s"] = timed(fns["ours_compiled"])
        if decode_plan(ours, B, compile=False).threads == 1:  # our steps run on one thread here: time the peer on one thread as well
            fns["peer_1thread"] = on_threads(1, fns["peer"])
        if ceiling is not None:
            fns["ceiling"] = ceiling
        log(f"  decode {preset} batch {B}: {new_tokens} new tokens after a {prompt_len}-token prompt")
        times = alternate(fns, warmup, iters)
        ceiling_times = times.pop("ceiling", None)
        if ceiling_times is not None:
            out[f"b{B}_copy_gbps_alongside"] = ceiling.rate(median(ceiling_times))
        for k, ts in times.items():
            steps_per_s = new_tokens / median(ts)
            out[f"b{B}_{k}_tokens_per_s"] = B * steps_per_s
            out[f"b{B}_{k}_gbps"] = out["weight_bytes"] * steps_per_s / 1e9
        out[f"b{B}_speedup"] = out[f"b{B}_ours_tokens_per_s"] / out[f"b{B}_peer_tokens_per_s"]
        best = _faster_mode(out, f"b{B}_")
        out[f"b{B}_best_mode"] = "compiled" if best == "ours_compiled" else "eager"
        out[f"b{B}_best_speedup"] = out[f"b{B}_{best}_tokens_per_s"] / out[f"b{B}_peer_tokens_per_s"]
        out[f"b{B}_best_gbps"] = out[f"b{B}_{best}_gbps"]
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


# ---------------------------------------------------------------- profile


def profile_decoder(preset: str = "small", batch: int = 1, new_tokens: int = 64, rows: int = 25) -> str:
    """torch.profiler tables: our sampling loop (decode) and one training step."""
    from torch.profiler import ProfilerActivity, profile

    layout = layout_for(preset)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_preset(preset, layout.vocab_size)).eval()
    prompts = text_prompts(layout, batch, 16)
    run = ours_sampler_fn(model, layout, prompts, new_tokens)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    parts = [f"### decode: {preset}, batch {batch}, {new_tokens} tokens (sampler)\n",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)]
    raw = ours_raw_fn(model, prompts, new_tokens)
    raw()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        raw()
    parts += [f"\n### decode: {preset}, batch {batch}, {new_tokens} tokens (bare decoder loop)\n",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, layout.vocab_size, (8, 256))

    def step() -> None:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    parts += [f"\n### training step: {preset}, batch 8 × 256\n",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(parts)


# ---------------------------------------------------------------- report


def run(args: argparse.Namespace, argv_text: str) -> dict:
    torch.set_num_threads(args.threads)
    quick = args.quick
    presets = [p for p in args.presets.split(",") if p]
    results: dict = {"argv": argv_text, "machine": machine_info(args.threads),
                     "load_before": _fmt_load(load_average()), "busy_before": busy_processes(),
                     "others_cpu_before": cpu_busy_fraction()}
    batches = (1, 8)
    results["settings"] = {"decode_batches": list(batches), "image_prompt_len": 12}

    log("ceilings ...")
    n, mb, rep = (1024, 64, 3) if quick else (2048, 256, 5)
    results["ceilings"] = {"matmul_gflops": matmul_gflops(n, rep), "matmul_n": n,
                           "copy_gbps": copy_gbps(mb, rep), "copy_mb": mb, "repeats": rep,
                           "matvec_gbps": matvec_gbps(mb, rep)}
    log(f"  matmul {results['ceilings']['matmul_gflops']:.1f} GFLOP/s, copy {results['ceilings']['copy_gbps']:.1f} GB/s, "
        f"matrix-vector {results['ceilings']['matvec_gbps']:.1f} GB/s read")
    matmul_alongside, copy_alongside = MatmulCeiling(n), CopyCeiling(mb, times=4)

    train_settings = {  # preset: (batch, seq_len, warmup, iters)
        "tiny": (4, 64, 1, 3), "small": (8, 256, 2, 5), "base": (4, 256, 1, 3)}
    # preset: (prompt_len, new_tokens, warmup, iters). A small-model round is short and a shared machine's speed
    # swings from round to round: more rounds give a steadier median; raise iters if the figures disagree run to run.
    decode_settings = {"tiny": (16, 32, 1, 3), "small": (16, 128, 1, 11), "base": (16, 48, 1, 5)}
    results["train"], results["decode"] = {}, {}
    for p in presets:
        b, t, w, it = train_settings.get(p, (4, 256, 1, 3))
        if quick:
            w, it = 1, 2
        log(f"training {p}: batch {b} × seq {t}, {w} warm-up + {it} timed steps each side ...")
        r = bench_train(p, batch=b, seq_len=t, warmup=w, iters=it, ceiling=matmul_alongside, compile=not args.no_compile)
        results["train"][p] = r
        compiled_tps = r.get("ours_compiled_tokens_per_s")
        log(f"  ours {r['ours_tokens_per_s']:.0f} tok/s" + (f", --compile {compiled_tps:.0f}" if compiled_tps else "")
            + f", peer {r['peer_tokens_per_s']:.0f} tok/s (best {r['best_speedup']:.2f}×), best {r['best_gflops']:.1f} "
            f"GFLOP/s, matmul alongside {r['matmul_gflops_alongside']:.1f} GFLOP/s")
    for p in presets:
        pl, nt, w, it = decode_settings.get(p, (16, 48, 1, 3))
        if quick:
            nt, it = max(16, nt // 4), 2
        log(f"decoding {p} ...")
        r = bench_decode(p, batches=batches, prompt_len=pl, new_tokens=nt, warmup=w, iters=it, ceiling=copy_alongside,
                         compile=not args.no_compile)
        results["decode"][p] = r
        for B in batches:
            compiled = r.get(f"b{B}_ours_compiled_tokens_per_s")
            log(f"  b{B}: ours {r[f'b{B}_ours_tokens_per_s']:.0f} tok/s"
                + (f", --compile {compiled:.0f}" if compiled else "")
                + f" (bare {r[f'b{B}_ours_raw_tokens_per_s']:.0f}), peer {r[f'b{B}_peer_tokens_per_s']:.0f} tok/s "
                f"(best {r[f'b{B}_best_speedup']:.2f}×)")
    if not args.skip_images:
        log("image generation (small decoder, default image tokenizer) ...")
        results["image_generation"] = bench_image_generation(
            "small", "default", prompt_len=12, num_samples=8, warmup=1, iters=3 if quick else 9)
        log(f"  {results['image_generation']['s_per_image_cfg']:.2f} s/image with CFG, "
            f"{results['image_generation']['s_per_image_nocfg']:.2f} s without")
        log("image tokenizer ...")
        results["image_tokenizer"] = bench_image_tokenizer("default", batch=64, warmup=1, iters=2 if quick else 3)
    results["load_after"] = _fmt_load(load_average())
    results["busy_after"] = busy_processes()
    results["others_cpu_after"] = cpu_busy_fraction()
    results["interface"] = interface(results)
    if not torch.cuda.is_available():
        results["gpu_note"] = ("No GPU on the machine of this run: the bf16 / GPU figures the issue asks for "
                               "are not recorded here yet.")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure earlyfusion against transformers' Chameleon and this machine's ceilings.")
    p.add_argument("--presets", default="small,base", help="comma-separated decoder presets (tiny, small, base)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer iterations and shorter decodes (a rough figure in ~2 min)")
    p.add_argument("--skip-images", action="store_true", help="skip image generation and the image tokenizer")
    p.add_argument("--no-compile", action="store_true",
                   help="do not measure training and the sampler with --compile (torch.compile; needs a C++ compiler, ~20 s per preset and mode)")
    p.add_argument("--out", default=str(ROOT / "bench"), help="directory for RESULTS.md and results.json")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, print a torch.profiler breakdown of our decode and training step")
    p.add_argument("--profile-preset", default="small", help="decoder preset for --profile")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.profile:
        torch.set_num_threads(args.threads)
        print(profile_decoder(args.profile_preset))
        return 0
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    results = run(args, argv_text)
    text = render(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(text + "\n")
    payload = {**results["interface"], "machine": results["machine"], "ceilings": results["ceilings"],
               "train": results["train"], "decode": results["decode"],
               "image_generation": results.get("image_generation"), "image_tokenizer": results.get("image_tokenizer"),
               "load_before": results["load_before"], "load_after": results["load_after"],
               "others_cpu_before": results.get("others_cpu_before"), "others_cpu_after": results.get("others_cpu_after"),
               "busy_processes": sorted(set(results["busy_before"] + results["busy_after"]))}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
