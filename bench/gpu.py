"""``make bench-gpu``: one prepared check of a GPU, in under 8 minutes on one H100.

Five parts, run in this order, each under its own time budget, each recorded on its own: a part that fails
leaves its error (and whatever it measured before failing) in the JSON and the script goes on to the next, and
the JSON and the Markdown section are rewritten after every part, so that a session cut short keeps what was done.
Timed rounds stop at a part's deadline (after the first); a part, shape or grid that would run past ``--budget-s``
is skipped and said to be, and a run out of device memory is repeated at half the batch.

1. ``train_mfu``: decoder training (forward + backward + fused AdamW step, the loss module training runs,
   ``training.lm_loss.TokenLosses``) under bf16 autocast, eager and compiled as ``train --compile`` compiles it
   (``model.compile.compiled``), attention by ``model.attention_plan`` (torch's SDPA, flash attention on a GPU),
   for the ``base`` preset and a ~1B-parameter shape (``SHAPE_1B``). Model FLOPs per token are PaLM's
   accounting, as ``make bench`` counts them (``bench_models.flops_per_token``)::

       flops/token = 6·N + 12·L·H·Q·T

   N = parameters less the input embedding (a lookup), L layers, H query heads, Q head width, T the sequence
   length (the full T×T score matrix, not its causal half). MFU = tokens/s × flops/token ÷ the device's peak dense
   bf16 FLOP/s (``PEAK_BF16_TFLOPS`` by ``torch.cuda.get_device_name()``, or ``--peak-tflops``); null on a CPU and
   on a GPU the table does not know.
2. ``tokenizer_train``: image tokenizer training images/s at 256 px (the ``photo256`` preset), steps as
   ``earlyfusion tokenizer train`` takes them (``training.vq_train``: its loss, AdamW settings, clipping, the
   codebook snapshot and the per-step code statistics; precision as ``--mixed-precision auto`` picks it).
3. ``encode``: images/s of ``earlyfusion encode``'s per-batch path (``EncodePipeline.encode_pixels``: stack the decoded
   pixels, copy them to the device, encode, copy the codes back) at its default batch, on preprocessed 256 px
   pixels (decoding image files, done by its worker processes, is not timed); where that path is not available,
   ``vq.encode`` on device batches, and the JSON says which.
4. ``image_generation``: images/s of 8 images of one caption drawn with classifier-free guidance at 256 and 1024
   codes per image (16×16 and 32×32 grids), the ``base`` decoder: ours (``sampling.generate.sample_tokens`` with
   ``earlyfusion sample --modality image``'s settings, steps as ``model.decode_plan`` runs them, eager and
   ``--compile``) against transformers' ``generate(guidance_scale=...)`` on the same weights (``bench_scale``'s
   comparison, run on the device), both under bf16 autocast on a GPU.
5. ``losses``: a 20-step fp32 ``earlyfusion train`` run of the ``tiny`` preset on the built-in shapes data, fixed
   seed, run on the CPU (the GPU hidden) and then on the GPU, from the same image tokenizer, vocabulary and image
   codes; every step's loss must agree within ``LOSS_REL_TOL``. Without a GPU only the CPU run is made and the
   comparison is marked skipped.

``--quick``: tiny shapes and a couple of steps per part (what the test runs on a CPU). ``--compile auto``: on for a
GPU, off for a CPU (compiling there takes longer than the rest of a quick run; ``make bench`` times it).
Writes ``gpu_results.json`` and ``gpu_section.md`` (a ``## <device>`` section for bench/RESULTS.md) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/gpu.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from earlyfusion.core.runtime import autocast, keep_freed_memory, mixed_precision  # noqa: E402
from earlyfusion.model.decoder import Decoder, DecoderConfig  # noqa: E402

from bench_machine import log, median, timed  # noqa: E402
from bench_models import build_pair, flop_params, flops_per_token, layout_for, peer_cfg_generate, text_prompts  # noqa: E402
from gpu_device import Context, device_info, free_device, peak_tflops, rounds, with_smaller_batches
from gpu_losses import part_losses  # noqa: E402
from gpu_report import device_sections, render, with_device_sections  # noqa: E402

# A ~1B-parameter decoder (1.08B): Chameleon's vocabulary size, 2048 wide, 16 blocks of 16 heads of 128.
SHAPE_1B = dict(vocab_size=65536, dim=2048, n_layers=16, n_heads=16, max_seq_len=2048)


PARTS = ("train_mfu", "tokenizer_train", "encode", "image_generation", "losses")
# part: (seconds it may take in a full run, seconds it needs at the least); what a part leaves unused goes to the
# next. Compiling is most of the first and the fourth (a minute or more per model, and it cannot be cut short).
BUDGETS = {"train_mfu": (150, 90), "tokenizer_train": (30, 15), "encode": (20, 10), "image_generation": (130, 60),
           "losses": (50, 35)}
JSON_NAME, SECTION_NAME = "gpu_results.json", "gpu_section.md"


# ---------------------------------------------------------------- 1. decoder training MFU


def train_shapes(quick: bool) -> dict[str, tuple[DecoderConfig, int, int]]:
    """name -> (decoder config, batch, sequence length): 8k-16k tokens a step in a full run."""
    if quick:
        return {"tiny": (DecoderConfig.from_preset("tiny", layout_for("tiny").vocab_size), 2, 32)}
    return {"base": (DecoderConfig.from_preset("base", layout_for("base").vocab_size), 16, 1024),
            "1b": (DecoderConfig(**SHAPE_1B), 4, 2048)}  # 8k tokens: eager steps of 16k would need ~65 GB


def mfu_of(cfg: DecoderConfig, seq_len: int, tokens_per_s: float, peak: float | None) -> dict:
    fpt = flops_per_token(cfg, seq_len)
    tflops = tokens_per_s * fpt / 1e12
    return {"tokens_per_s": tokens_per_s, "model_tflops": tflops, "mfu": tflops / peak if peak else None}


def train_one_shape(ctx: Context, cfg: DecoderConfig, batch: int, seq_len: int, iters: int, rec: dict) -> dict:
    """Eager, then compiled (with ``ctx.compile``), training steps of one decoder shape; fills ``rec`` as it goes
    (what was measured survives a failure of what follows)."""
    from earlyfusion.model.attention_plan import attention_plan
    from earlyfusion.model.compile import compiled
    from earlyfusion.training.lm_loss import TokenLosses

    device, precision = ctx.device, "bf16"
    torch.manual_seed(0)
    with torch.device(device):  # built where it trains: a 1B model's fp32 init on a CPU would take a while
        model = Decoder(cfg)
    model.train()
    plan = attention_plan(model, batch, seq_len, precision=precision, packed=False, compile=ctx.compile)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    # one optimizer for both modes: a second set of AdamW moments of a 1B model would be 8.6 GB more
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses_of = TokenLosses(model)

    def step_with(forward: Callable) -> Callable[[], None]:
        def step() -> None:
            with autocast(precision, device.type):
                loss = forward(x, y)[0].mean()  # mean next-token cross-entropy, fp32
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"batch": batch, "seq_len": seq_len, "attention": plan.describe()}
    times = rounds(ctx, {"eager": step_with(losses_of)}, warmup=2, iters=iters)["eager"]
    n = batch * seq_len
    out.update({f"eager_{k}": v for k, v in mfu_of(cfg, seq_len, n / median(times), ctx.peak).items()},
               eager_step_s=median(times), eager_iters=len(times))
    rec.update(out)
    if ctx.compile:
        step = ctx.synced(step_with(compiled(losses_of, dynamic=False)))
        log("    compiling the training step (torch.compile, once)")
        rec["compile_s"] = timed(step)
        times = rounds(ctx, {"compiled": step}, warmup=1, iters=iters)["compiled"]
        rec.update({f"compiled_{k}": v for k, v in mfu_of(cfg, seq_len, n / median(times), ctx.peak).items()},
                   compiled_step_s=median(times), compiled_iters=len(times))
    best = "compiled" if ctx.compile else "eager"
    rec.update(mode=best, tokens_per_s=rec[f"{best}_tokens_per_s"], model_tflops=rec[f"{best}_model_tflops"],
               mfu=rec[f"{best}_mfu"])
    if device.type == "cuda":
        rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return rec


def part_train_mfu(ctx: Context, rec: dict) -> None:
    rec.update(precision="bf16 autocast", compile=ctx.compile,
               flops="6N + 12·L·H·Q·T per token (N without the input embedding, T the sequence length)", shapes={})
    iters = 2 if ctx.quick else 8
    for name, (cfg, batch, seq_len) in train_shapes(ctx.quick).items():
        if ctx.left() <= 0:
            rec.setdefault("skipped", []).append(f"{name}: out of time")
            continue
        shape = {"params": cfg.num_params(), "flop_params": flop_params(cfg), "vocab_size": cfg.vocab_size,
                 "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                 "flops_per_token": flops_per_token(cfg, seq_len)}
        rec["shapes"][name] = shape
        log(f"  {name}: {cfg.num_params() / 1e6:.0f}M parameters, batch {batch} × {seq_len}")
        try:  # a failing shape leaves the other's figures: recorded here, the part failed below
            with_smaller_batches(lambda b: train_one_shape(ctx, cfg, b, seq_len, iters, shape), batch)
        except Exception as e:  # noqa: BLE001
            shape["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:500]
            log(f"    failed: {shape['error']}")
        free_device()
        if "error" in shape:
            continue
        if shape.get("mfu") is not None:
            log(f"    {shape['tokens_per_s']:,.0f} tokens/s, {shape['model_tflops']:.0f} TFLOP/s, MFU {shape['mfu']:.1%}")
        else:
            log(f"    {shape['tokens_per_s']:,.0f} tokens/s, {shape['model_tflops'] * 1e3:.2f} GFLOP/s")
    failed = {k: s["error"] for k, s in rec["shapes"].items() if "error" in s}
    if failed:
        raise RuntimeError("; ".join(f"{k}: {e}" for k, e in failed.items()))


# ---------------------------------------------------------------- 2. image tokenizer training


def part_tokenizer_train(ctx: Context, rec: dict) -> None:
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE
    from earlyfusion.training.vq_eval import to_pixels
    from earlyfusion.training.vq_train import VQTrainConfig, compute_loss

    preset = "tiny" if ctx.quick else "photo256"
    cfg = VQTrainConfig(data="(random pixels)", out=str(ctx.work / "tokenizer"), preset=preset)
    vq_cfg = cfg.model_config()
    precision, why = mixed_precision(cfg.mixed_precision, ctx.device.type)
    rec.update(preset=preset, image_size=vq_cfg.image_size, grid=list(vq_cfg.grid_size), precision=why,
               recipe_batch=cfg.batch_size)
    if not ctx.quick:
        assert VQ_PRESETS[preset].image_size == 256

    def run(batch: int) -> dict:
        torch.manual_seed(0)
        model = VQVAE(vq_cfg).to(ctx.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        images = torch.randint(0, 256, (batch, 3, vq_cfg.image_size, vq_cfg.image_size), dtype=torch.uint8)
        buffers = dict(model.quantizer.named_buffers())

        def step() -> None:  # the body of vq_train._train's loop, without its bookkeeping of files
            x = to_pixels(images).to(ctx.device)  # the trainer keeps its images as uint8 in host memory
            snapshot = {k: v.detach().clone() for k, v in buffers.items()}  # restored after a non-finite step
            with autocast(precision, ctx.device.type):
                loss, parts = compute_loss(model, x, cfg)
            float(loss.detach())  # the trainer reads every step's loss
            loss.backward()
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            codes = parts["codes"].flatten().cpu()  # the usage window and perplexity, on the host
            torch.bincount(codes, minlength=vq_cfg.codebook_size)
            del snapshot

        # the first step initialises the codebook by k-means: warm-up, not timed
        times = rounds(ctx, {"step": step}, warmup=2, iters=2 if ctx.quick else 8)["step"]
        return {"params": sum(p.numel() for p in model.parameters()), "step_s": median(times), "iters": len(times),
                "images_per_s": batch / median(times)}

    rec.update(with_smaller_batches(run, 2 if ctx.quick else 32))
    log(f"  {preset} at {vq_cfg.image_size} px: {rec['images_per_s']:,.1f} images/s (batch {rec['batch']})")


# ---------------------------------------------------------------- 3. encode


def encode_batch_fn(ctx: Context, vq_dir: Path, pixels: list, batch: int) -> tuple[Callable[[], None], str]:
    """A call encoding one batch of ``pixels`` (float32 (3, S, S) arrays, as its decode workers hand them over)
    the way ``earlyfusion encode`` does, and the name of the path; ``vq.encode`` where the command's is missing."""
    try:
        from earlyfusion.training.data.encode import EncodeConfig, EncodePipeline

        class Bar:  # the progress bar it updates
            def update(self, n: int) -> None:
                pass

        cfg = EncodeConfig(data=str(vq_dir), image_tokenizer=str(vq_dir), out=str(ctx.work / "codes"),
                           batch_size=batch, workers=0)
        pipe = EncodePipeline(cfg, ctx.work / "codes", {}, ctx.device, Bar(), contextlib.ExitStack())

        def encode() -> None:
            pipe.encode_pixels(pixels)

        encode()  # a path that changed shape fails here, before any timing
        return encode, "earlyfusion encode (EncodePipeline.encode_pixels)"
    except (ImportError, AttributeError, TypeError) as e:
        import numpy as np

        from earlyfusion.tokenizer.vq_checkpoint import load_vqvae

        vq = load_vqvae(vq_dir).to(ctx.device).eval()
        x = torch.from_numpy(np.stack(pixels)).to(ctx.device)
        return (lambda: vq.encode(x).cpu()), f"vq.encode on device batches (encode's path unavailable: {e})"


def part_encode(ctx: Context, rec: dict) -> None:
    from earlyfusion.tokenizer.vq_checkpoint import save_vqvae
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE

    try:
        from earlyfusion.training.data.encode import EncodeConfig

        default_batch = EncodeConfig.batch_size
    except (ImportError, AttributeError):  # no encode command: its batch of 256 all the same
        default_batch = 256
    preset = "tiny" if ctx.quick else "photo256"
    vq_cfg = VQ_PRESETS[preset]
    vq_dir = ctx.work / "encode-tokenizer"
    torch.manual_seed(0)
    save_vqvae(VQVAE(vq_cfg), vq_dir)  # random weights: the speed does not depend on them
    rec.update(preset=preset, image_size=vq_cfg.image_size, grid=list(vq_cfg.grid_size),
               command_default_batch=default_batch)

    def run(batch: int) -> dict:
        g = torch.Generator().manual_seed(0)
        pixels = [(torch.rand(3, vq_cfg.image_size, vq_cfg.image_size, generator=g) * 2 - 1).numpy()
                  for _ in range(batch)]
        fn, path = encode_batch_fn(ctx, vq_dir, pixels, batch)
        times = rounds(ctx, {"encode": fn}, warmup=1, iters=2 if ctx.quick else 5)["encode"]
        return {"path": path, "batch_s": median(times), "iters": len(times), "images_per_s": batch / median(times)}

    rec.update(with_smaller_batches(run, 4 if ctx.quick else default_batch))
    log(f"  {preset} at {vq_cfg.image_size} px: {rec['images_per_s']:,.1f} images/s (batch {rec['batch']}, {rec['path']})")


# ---------------------------------------------------------------- 4. image generation with CFG


def part_image_generation(ctx: Context, rec: dict) -> None:
    """Ours (eager, and compiled with ``ctx.compile``) against the peer's ``generate()`` with its own guidance, on
    one pair of models (the same weights) sized for the larger grid. ``bench_scale.bench_image_scale`` makes this
    comparison on a CPU (its generator, autocast and tensors are the host's); here the same calls run on the device,
    with a generator of the device as ``sampling.generate.generate`` makes one."""
    from bench_scale import scale_layout

    from earlyfusion.model.decode_plan import decode_plan
    from earlyfusion.sampling.generate import DEFAULT_CFG, SamplingConfig, sample_tokens
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS

    device = ctx.device
    if ctx.quick:
        preset, grids, codebook, n, prompt_len, iters = "tiny", ((2, 2), (3, 3)), 32, 2, 3, (1, 1)
    else:  # photo256's codebook at both grids: 16384 image ids, the larger of the 256 px and 512 px tokenizers'.
        # One timed round at 1024 codes: the peer's takes about half a minute there (GPU timings vary little).
        preset, grids, codebook, n, prompt_len, iters = "base", ((16, 16), (32, 32)), \
            VQ_PRESETS["photo256"].codebook_size, 8, 12, (2, 1)
    precision, why = mixed_precision("auto", device.type)
    settings = SamplingConfig(modality="image", cfg=DEFAULT_CFG, num_samples=n)
    layouts = [scale_layout(preset, grid, codebook) for grid in grids]
    longest = max(lay.tokens_per_image for lay in layouts) + 2
    with torch.device(device):
        ours, hf = build_pair(preset, layouts[0].vocab_size, max_seq_len=prompt_len + longest)
    ours.eval()
    hf.eval()
    rec.update(preset=preset, params=ours.config.num_params(), num_samples=n, prompt_len=prompt_len,
               cfg_scale=DEFAULT_CFG, codebook_size=codebook, vocab_size=layouts[0].vocab_size, precision=why,
               compile=ctx.compile, grids={})
    modes = ["ours", "ours_compiled"] if ctx.compile else ["ours"]
    prev: tuple[int, dict[str, float]] | None = None  # the last grid's new tokens and seconds per call of each way
    for k, (grid, layout) in enumerate(zip(grids, layouts)):
        name = f"{grid[0]}x{grid[1]}"
        if ctx.left() <= 0:
            rec.setdefault("skipped", []).append(f"{name}: out of time")
            continue
        span = layout.tokens_per_image + 2  # begin-image, h·w codes, end-image
        text, image = settings.text_params(), settings.image_params(layout.codebook_size)
        rows = text_prompts(layout, 1, prompt_len).repeat(n, 1)  # one caption, n samples
        row_ids, uncond = rows.tolist(), [[layout.bos] for _ in range(n)]
        rows, neg = rows.to(device), torch.full((n, 1), layout.bos, dtype=torch.long, device=device)

        def ours_fn(compile: bool) -> Callable[[], None]:
            def run() -> None:
                g = torch.Generator(device=device).manual_seed(0)
                with autocast(precision, device.type):
                    got, reasons = sample_tokens(ours, layout, row_ids, modality="image", max_new_tokens=span,
                                                 text=text, image=image, generator=g, guidance=DEFAULT_CFG,
                                                 uncond=uncond, compile=compile)
                assert all(len(o) == span for o in got) and all(r == "image" for r in reasons), reasons

            return run

        def peer_fn() -> None:
            peer_cfg_generate(hf, rows, neg, span, image, DEFAULT_CFG, layout, precision, device.type)

        fns = {m: ours_fn(m == "ours_compiled") for m in modes}
        fns["peer"] = peer_fn
        r: dict = {"codes_per_image": layout.tokens_per_image, "new_tokens": span}
        if prev is not None:  # what this grid will take, from the last one's times per new token
            est = {m: t * span / prev[0] for m, t in prev[1].items()}
            need = sum(est.values()) + est.get("ours_compiled", 0.0)  # one untimed compiled call, one round
            if need > ctx.left() + 30:  # 30 s past the part's deadline is within the 8 minutes' slack
                if need - est["peer"] > ctx.left() + 30:
                    rec.setdefault("skipped", []).append(f"{name}: needs ~{need:.0f} s, {ctx.left():.0f} s left")
                    continue
                del fns["peer"]
                r["peer_skipped"] = f"out of time: the peer needs ~{est['peer']:.0f} s here, {ctx.left():.0f} s left"
        with autocast(precision, device.type):  # plans are chosen per autocast state: the sampler's
            plans = {m: decode_plan(ours, 2 * n, compile=m == "ours_compiled").describe() for m in modes}
        r["plans"] = plans
        rec["grids"][name] = r
        if "ours_compiled" in fns:
            # the first grid compiles the step; a longer cache may still cost the next grid a recompile: untimed
            log(f"  {name}: our compiled decode step, once untimed" + (" (compiling: torch.compile)" if k == 0 else ""))
            r["compile_s" if k == 0 else "first_compiled_run_s"] = timed(ctx.synced(fns["ours_compiled"]))
        log(f"  {name}: {n} images of {layout.tokens_per_image} codes, CFG {DEFAULT_CFG}, {len(fns)} ways")
        # the models are shared by the grids: the first grid's rounds warm the second's
        times = rounds(ctx, fns, warmup=1 if k == 0 else 0, iters=iters[k])
        for m, ts in times.items():
            r[f"{m}_s"] = median(ts)
            r[f"{m}_images_per_s"] = n / median(ts)
            r[f"{m}_ms_per_step"] = 1e3 * median(ts) / span
        r["iters"] = len(times["ours"])
        prev = (span, {m: r[f"{m}_s"] for m in times})
        best = max(modes, key=lambda m: r[f"{m}_images_per_s"])
        if "peer" in times:
            r["speedup"] = r["ours_images_per_s"] / r["peer_images_per_s"]
            if "ours_compiled" in times:
                r["compiled_speedup"] = r["ours_compiled_images_per_s"] / r["peer_images_per_s"]
            log(f"    ours {r[f'{best}_images_per_s']:.2f} images/s ({best}), peer {r['peer_images_per_s']:.2f}")
        else:
            log(f"    ours {r[f'{best}_images_per_s']:.2f} images/s ({best}); peer skipped: {r['peer_skipped']}")


# ---------------------------------------------------------------- main


RUNNERS = {"train_mfu": part_train_mfu, "tokenizer_train": part_tokenizer_train, "encode": part_encode,
           "image_generation": part_image_generation, "losses": part_losses}


def write(out: Path, results: dict) -> None:
    """The JSON and the Markdown section, each replaced whole (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((JSON_NAME, json.dumps(results, indent=2) + "\n"), (SECTION_NAME, render(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One GPU check: training MFU, tokenizer and encode images/s, image "
                                            "generation against transformers, CPU/GPU loss agreement.")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-gpu"), help=f"directory for {JSON_NAME} and {SECTION_NAME}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a couple of steps per part (a code check, not figures)")
    p.add_argument("--results", default=None,
                   help="also put the section into this RESULTS.md (bench/RESULTS.md for `make bench-gpu`), replacing "
                        "an earlier section of the same device; never with --quick")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step and our decode step: auto = on a GPU only")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s for MFU")
    p.add_argument("--budget-s", type=float, default=float(sum(share for share, _ in BUDGETS.values())),
                   help="seconds for all parts (default %(default)s: with start-up and a compile running past its "
                        "part's share, which cannot be cut short, the whole stays under 8 minutes on an H100)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error("--peak-tflops must be positive")
    if args.device == "auto":
        if not torch.cuda.is_available() and not args.quick:
            # full-size shapes on a CPU would take hours: say why instead of starting them
            build = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible"
            p.error(f"{build} ({torch.__version__}): run with --quick for a check of the code on the CPU, or give "
                    "--device cpu to run the full sizes here anyway")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no GPU is visible")
    keep_freed_memory()
    out = Path(args.out)
    t0 = time.monotonic()
    end = t0 + args.budget_s
    peak, source = peak_tflops(device, args.peak_tflops)
    ctx = Context(device=device, quick=args.quick,
                  compile=args.compile == "on" or (args.compile == "auto" and device.type == "cuda"),
                  peak=peak, work=Path(tempfile.mkdtemp(prefix="bench-gpu-")))
    results = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "quick": args.quick,
               "device": device_info(device), "peak_tflops": peak, "peak_source": source, "compile": ctx.compile,
               "budget_s": args.budget_s, "elapsed_s": 0.0, "parts": {}}
    log(f"device: {results['device']['name']}; peak bf16 {peak} TFLOP/s ({source}); compile {ctx.compile}")
    try:
        for i, name in enumerate(parts):
            share, _ = BUDGETS[name]
            later = sum(BUDGETS[k][1] for k in parts[i + 1:])  # what the parts after it need at the least
            later_shares = sum(BUDGETS[k][0] for k in parts[i + 1:])
            now = time.monotonic()
            rec: dict = {"status": "running"}
            results["parts"][name] = rec
            if not args.quick and end - now - later < BUDGETS[name][1]:
                rec.update(status="skipped", reason=f"out of time ({end - now:.0f} s left of --budget-s)")
                log(f"{name}: skipped, out of time")
                continue
            # its share, plus what the parts before it left unused; less where they overran, down to what leaves the
            # parts after it their least
            ctx.deadline = now + share if args.quick else min(end - later, max(now + share, end - later_shares))
            ctx.work.mkdir(parents=True, exist_ok=True)
            log(f"{name} ...")
            try:
                RUNNERS[name](ctx, rec)
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others' figures
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                rec.update(status="error", error=f"{type(e).__name__}: {first}"[:500],
                           traceback=traceback.format_exc().strip().splitlines()[-12:])
                log(f"  {name} failed: {rec['error']}")
            rec["seconds"] = time.monotonic() - now
            free_device()
            results["elapsed_s"] = time.monotonic() - t0
            write(out, results)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t0
    write(out, results)
    log(f"wrote {out / JSON_NAME} and {out / SECTION_NAME} in {results['elapsed_s']:.0f} s")
    if args.results and not args.quick:
        path = Path(args.results)
        old = path.read_text() if path.is_file() else ""
        section = render(results)
        path.write_text(with_device_sections(old, {**device_sections(old), **device_sections(section)}))
        log(f"put the {results['device']['name']} section into {path}")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
