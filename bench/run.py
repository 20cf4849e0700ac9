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
  thread where our per-token steps run on one (``earlyfusion.core.runtime.step_threads``); effective
  GB/s = weight bytes × decode steps/s against the copy ceiling;
* image generation for the demo shape (``small`` decoder, ``default`` image tokenizer: 4×4 codes):
  seconds per image with and without batched classifier-free guidance, and images/s at 8 samples;
* the image tokenizer: encode and decode images/s;
* the decoder at image scale (``bench_scale.py``; ``--no-image-scale`` skips it): training tokens/s of ``small``
  at contexts 1024 and 4096 on packed rows (captioned 16×16-code images and text, several documents per row,
  ``doc_ids`` given: the block-diagonal causal mask), ours vs the peer (given the restarting ``position_ids``) and
  the matmul ceiling timed alongside; and images/s of 8 images drawn in one batch with CFG at 64 and 256 codes per
  image, ours vs the peer's ``generate()`` with its own classifier-free guidance on the same weights.

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
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/run.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from earlyfusion.model.decoder import Decoder, DecoderConfig  # noqa: E402
from earlyfusion.core.runtime import keep_freed_memory  # noqa: E402

from bench_decode import (bench_decode, bench_image_generation, bench_image_tokenizer,  # noqa: E402,F401 - the bench's API
                          ours_raw_fn, ours_sampler_fn)
from bench_machine import (CopyCeiling, MatmulCeiling, alternate, busy_processes, copy_gbps,  # noqa: E402,F401
                           cpu_busy_fraction, load_average, log, machine_info, matmul_gflops, matvec_gbps)
from bench_models import layout_for, text_prompts  # noqa: E402
from bench_scale import bench_image_scale, bench_packed_train  # noqa: E402
from bench_train import bench_train  # noqa: E402
from bench_report import INTERFACE_KEYS, _fmt_load, attended, interface, render  # noqa: E402,F401 - INTERFACE_KEYS: the keys callers read
from gpu_report import device_sections, with_device_sections  # noqa: E402

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
    keep_freed_memory()  # as every command does (earlyfusion.core.runtime.use_all_cores), for ours and the peer alike
    quick = args.quick
    presets = [p for p in args.presets.split(",") if p]
    results: dict = {"argv": argv_text, "machine": machine_info(args.threads),
                     "load_before": _fmt_load(load_average()), "busy_before": busy_processes(),
                     "others_cpu_before": cpu_busy_fraction()}
    batches = (1, 8)
    results["settings"] = {"decode_batches": list(batches), "image_prompt_len": 12}

    bf16 = results["machine"]["fast_bf16"] and not args.no_bf16
    log("ceilings ...")
    n, mb, rep = (1024, 64, 3) if quick else (2048, 256, 5)
    results["ceilings"] = {"matmul_gflops": matmul_gflops(n, rep), "matmul_n": n,
                           "copy_gbps": copy_gbps(mb, rep), "copy_mb": mb, "repeats": rep,
                           "matvec_gbps": matvec_gbps(mb, rep)}
    if bf16:
        results["ceilings"]["matmul_bf16_gflops"] = matmul_gflops(n, rep, torch.bfloat16)
    log(f"  matmul {results['ceilings']['matmul_gflops']:.1f} GFLOP/s"
        + (f" (bf16 {results['ceilings']['matmul_bf16_gflops']:.1f})" if bf16 else "")
        + f", copy {results['ceilings']['copy_gbps']:.1f} GB/s, "
        f"matrix-vector {results['ceilings']['matvec_gbps']:.1f} GB/s read")
    matmul_alongside, copy_alongside = MatmulCeiling(n), CopyCeiling(mb, times=4)
    bf16_alongside = MatmulCeiling(n, torch.bfloat16) if bf16 else None

    train_settings = {  # preset: (batch, seq_len, warmup, iters)
        "tiny": (4, 64, 1, 3), "small": (8, 256, 2, 5), "base": (4, 256, 1, 5)}
    # preset: (prompt_len, new_tokens, warmup, iters). A small-model round is short and a shared machine's speed
    # swings from round to round: more rounds give a steadier median; raise iters if the figures disagree run to run.
    decode_settings = {"tiny": (16, 32, 1, 3), "small": (16, 128, 1, 11), "base": (16, 48, 1, 9)}
    results["train"], results["decode"] = {}, {}
    if bf16:
        results["train_bf16"] = {}
    for p in presets:
        b, t, w, it = train_settings.get(p, (4, 256, 1, 3))
        if quick:
            w, it = 1, 2
        for precision in ("no", "bf16") if bf16 else ("no",):
            name = "bf16 autocast" if precision == "bf16" else "fp32"
            log(f"training {p} in {name}: batch {b} × seq {t}, {w} warm-up + {it} timed steps each side ...")
            r = bench_train(p, batch=b, seq_len=t, warmup=w, iters=it, compile=not args.no_compile, precision=precision,
                            ceiling=bf16_alongside if precision == "bf16" else matmul_alongside)
            results["train_bf16" if precision == "bf16" else "train"][p] = r
            compiled_tps = r.get("ours_compiled_tokens_per_s")
            log(f"  ours {r['ours_tokens_per_s']:.0f} tok/s" + (f", --compile {compiled_tps:.0f}" if compiled_tps else "")
                + f", peer {r['peer_tokens_per_s']:.0f} tok/s (best {r['best_speedup']:.2f}×), best {r['best_gflops']:.1f} "
                f"GFLOP/s, {name} matmul alongside {r['matmul_gflops_alongside']:.1f} GFLOP/s")
    for p in presets:
        pl, nt, w, it = decode_settings.get(p, (16, 48, 1, 3))
        if quick:
            nt, it = max(16, nt // 4), 2
        log(f"decoding {p} ...")
        r = bench_decode(p, batches=batches, prompt_len=pl, new_tokens=nt, warmup=w, iters=it, ceiling=copy_alongside,
                         compile=not args.no_compile, bf16=bf16)
        results["decode"][p] = r
        for B in batches:
            compiled = r.get(f"b{B}_ours_compiled_tokens_per_s")
            log(f"  b{B}: ours {r[f'b{B}_ours_tokens_per_s']:.0f} tok/s"
                + (f", --compile {compiled:.0f}" if compiled else "")
                + f" (bare {r[f'b{B}_ours_raw_tokens_per_s']:.0f}), peer {r[f'b{B}_peer_tokens_per_s']:.0f} tok/s "
                f"(best {r[f'b{B}_best_speedup']:.2f}×); fastest of ours: {r[f'b{B}_fastest_mode']}")
    if not args.skip_images:
        log("image generation (small decoder, default image tokenizer) ...")
        results["image_generation"] = bench_image_generation(
            "small", "default", prompt_len=12, num_samples=8, warmup=1, iters=3 if quick else 9)
        log(f"  {results['image_generation']['s_per_image_cfg']:.2f} s/image with CFG, "
            f"{results['image_generation']['s_per_image_nocfg']:.2f} s without")
        log("image tokenizer ...")
        results["image_tokenizer"] = bench_image_tokenizer("default", batch=64, warmup=1, iters=2 if quick else 3)
    if not args.no_image_scale:
        image_scale(results, quick, matmul_alongside)
    results["load_after"] = _fmt_load(load_average())
    results["busy_after"] = busy_processes()
    results["others_cpu_after"] = cpu_busy_fraction()
    results["interface"] = interface(results)
    return results


def image_scale(results: dict, quick: bool, ceiling: MatmulCeiling) -> None:
    """The decoder at image scale: packed training at long contexts, batched image generation with CFG."""
    # `small` only: one `base` training step at context 4096 takes far longer than a bench round should here.
    packed_settings = {1024: (2, 1, 3), 4096: (1, 1, 3)}  # context: (batch, warmup, iters)
    results["train_packed"] = {}
    for seq_len, (b, w, it) in packed_settings.items():
        log(f"packed training small at context {seq_len} ...")
        r = bench_packed_train("small", seq_len=seq_len, batch=b, warmup=w, iters=1 if quick else it, ceiling=ceiling)
        results["train_packed"][f"small_{seq_len}"] = r
        log(f"  ours {r['ours_tokens_per_s']:.0f} tok/s, peer {r['peer_tokens_per_s']:.0f} tok/s ({r['speedup']:.2f}×), "
            f"{r['ours_gflops']:.1f} GFLOP/s counting documents = {r['ours_ceiling_fraction_alongside']:.2f} of the "
            f"matmul alongside; attention {attended(r)}")
    log("image generation at 64 and 256 codes per image, 8 images with CFG ...")
    results["image_scale"] = bench_image_scale("small", grids=((8, 8), (16, 16)), num_samples=8, warmup=1,
                                               iters=1 if quick else 3)
    for name, r in results["image_scale"]["grids"].items():
        log(f"  {name}: ours {r['ours_images_per_s']:.2f} images/s, peer {r['peer_images_per_s']:.2f} "
            f"({r['speedup']:.2f}×)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure earlyfusion against transformers' Chameleon and this machine's ceilings.")
    p.add_argument("--presets", default="small,base", help="comma-separated decoder presets (tiny, small, base)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="fewer iterations and shorter decodes (a rough figure in ~2 min)")
    p.add_argument("--skip-images", action="store_true", help="skip image generation and the image tokenizer")
    p.add_argument("--no-image-scale", action="store_true",
                   help="skip the image-scale sections: packed training at contexts 1024 and 4096, and 8 images with "
                        "CFG at 64 and 256 codes per image (a few minutes)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not measure training and the sampler with --compile (torch.compile; needs a C++ compiler, ~20 s per preset and mode)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip the bf16 rows even where this CPU has fast bf16 products (AMX / AVX512-BF16)")
    p.add_argument("--out", default=str(ROOT / "bench"), help="directory for RESULTS.md and results.json")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, print a torch.profiler breakdown of our decode and training step")
    p.add_argument("--profile-preset", default="small", help="decoder preset for --profile")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.profile:
        torch.set_num_threads(args.threads)
        keep_freed_memory()
        print(profile_decoder(args.profile_preset))
        return 0
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    results = run(args, argv_text)
    text = render(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    old = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").is_file() else ""
    (out / "RESULTS.md").write_text(with_device_sections(text, device_sections(old)))  # GPU figures stay
    payload = {**results["interface"], "machine": results["machine"], "ceilings": results["ceilings"],
               "train": results["train"], "train_bf16": results.get("train_bf16"), "decode": results["decode"],
               "image_generation": results.get("image_generation"), "image_tokenizer": results.get("image_tokenizer"),
               "train_packed": results.get("train_packed"), "image_scale": results.get("image_scale"),
               "load_before": results["load_before"], "load_after": results["load_after"],
               "others_cpu_before": results.get("others_cpu_before"), "others_cpu_after": results.get("others_cpu_after"),
               "busy_processes": sorted(set(results["busy_before"] + results["busy_after"]))}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
