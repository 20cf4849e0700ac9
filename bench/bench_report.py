"""The bench's report: the interface keys of results.json and RESULTS.md rendered from the measurements."""

from __future__ import annotations

from earlyfusion.model.compile import ROWWISE_MAX_ROWS

# The speed targets, shown beside each figure.
TARGETS = {
    "train_speedup_small": (">=", 1.1),
    "train_ceiling_fraction_base": (">=", 0.75),
    "decode_speedup_b1_small": (">=", 3.0),
    "decode_bandwidth_fraction_base": (">=", 0.5),
    "cfg_cost_ratio": ("<=", 1.3),
}
INTERFACE_KEYS = tuple(TARGETS)
# Where the CPU has fast bf16 products: the bf16 rows' targets (results.json carries the first two as keys).
BF16_TARGETS = {
    "train_bf16_speedup_base": (">=", 2.0),
    "train_bf16_ceiling_fraction_base": (">=", 0.4),
    "train_bf16_speedup_vs_peer_base": (">=", 1.2),
}
COMPILE_TARGET = (">=", 1.0)  # --compile decoding ÷ eager decoding, every preset and batch size

def _table_head(title: str, columns: list[str]) -> list[str]:
    """A section heading and the header rows of its Markdown table."""
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _met(key: str, value) -> str:
    if value is None:
        return "not measured"
    op, target = {**TARGETS, **BF16_TARGETS}.get(key, COMPILE_TARGET)
    ok = value >= target if op == ">=" else value <= target
    return "yes" if ok else "**no**"


def interface(results: dict) -> dict:
    """The five interface numbers (None where the preset was not run).

    The ceiling fractions divide by the ceiling timed in the same alternating rounds as the figure
    (the same share of a shared CPU), falling back to the ceiling measured at the start of the run."""
    tr, dec, img, ceil = results.get("train", {}), results.get("decode", {}), results.get("image_generation"), results["ceilings"]
    base_tr, small_tr = tr.get("base"), tr.get("small")
    small_dec, base_dec = dec.get("small"), dec.get("base")
    return {
        "train_speedup_small": small_tr.get("best_speedup") if small_tr else None,
        "train_ceiling_fraction_base": (base_tr.get("best_ceiling_fraction_alongside",
                                                    base_tr["best_gflops"] / ceil["matmul_gflops"]) if base_tr else None),
        "decode_speedup_b1_small": small_dec.get("b1_best_speedup") if small_dec else None,
        "decode_bandwidth_fraction_base": (base_dec.get("b1_bandwidth_fraction_alongside",
                                                        base_dec["b1_best_gbps"] / ceil["copy_gbps"])
                                           if base_dec and "b1_best_gbps" in base_dec else None),
        "cfg_cost_ratio": img["cfg_cost_ratio"] if img else None,
        **bf16_interface(results),
    }


def bf16_interface(results: dict) -> dict:
    """``bf16_available`` and, where true and measured, the bf16 training figures of ``base``: ours bf16 ÷ ours fp32
    (best mode each), the fraction of the bf16 matmul ceiling timed alongside, and ours ÷ the peer under the
    same autocast."""
    out: dict = {"bf16_available": bool(results["machine"].get("fast_bf16"))}
    fp32, bf16 = results.get("train", {}).get("base"), (results.get("train_bf16") or {}).get("base")
    if out["bf16_available"] and fp32 and bf16:
        out["train_bf16_speedup_base"] = bf16["best_tokens_per_s"] / fp32["best_tokens_per_s"]
        out["train_bf16_ceiling_fraction_base"] = bf16.get("best_ceiling_fraction_alongside")
        out["train_bf16_speedup_vs_peer_base"] = bf16.get("best_speedup")
    return out


def render(results: dict) -> str:
    m, ceil, ifc = results["machine"], results["ceilings"], results["interface"]
    L = ["# Benchmark results", "",
         f"Written by `make bench` (`bench/run.py {results['argv']}`) at commit `{m['commit']}`, {m['date']}.", "",
         "## Machine", "",
         f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores; torch {m['torch']} at {m['threads']} threads; "
         f"transformers {m['transformers']}; Python {m['python']}.",
         "- bf16: " + ("fast bf16 products (" + ", ".join(f.replace("_", "-").upper() for f in m.get("cpu_bf16_features", []))
                       + "): the bf16 rows below are measured" if m.get("fast_bf16") else
                       "no AMX / AVX512-BF16 (`--mixed-precision auto` trains and samples in fp32 here): no bf16 rows") + ".",
         f"- Load average before / after: {results['load_before']} / {results['load_after']}."]
    busy = sorted(set(results.get("busy_before", []) + results.get("busy_after", [])))
    others = [x for x in (results.get("others_cpu_before"), results.get("others_cpu_after")) if x is not None]
    if others:
        L.append(f"- CPU used by other processes just before / after the run: "
                 f"{' / '.join(f'{x:.0%}' for x in others)} of all cores.")
    if busy or any(x > 0.1 for x in others):
        L.append(f"- **Measured under load**: other processes shared the cores"
                 f"{' (' + ', '.join(f'`{b}`' for b in busy) + ')' if busy else ''}; a 2-thread OpenMP region "
                 "stalls whenever one of its threads is descheduled, so absolute figures are low and noisy. "
                 "Ours and the peer alternate, so the ratios are more trustworthy than the absolute figures.")
    L += [f"- Ceilings measured in this run: fp32 matmul **{_fmt(ceil['matmul_gflops'])} GFLOP/s** "
          + (f"(bf16 **{_fmt(ceil['matmul_bf16_gflops'])} GFLOP/s**, {_fmt(ceil['matmul_bf16_gflops'] / ceil['matmul_gflops'])}×) "
             if ceil.get("matmul_bf16_gflops") else "")
          + f"({ceil['matmul_n']}² `torch.mm`, best of {ceil['repeats']}); memory copy **{_fmt(ceil['copy_gbps'])} GB/s** "
          f"({ceil['copy_mb']} MB `copy_`, read + write, best of {ceil['repeats']})"
          + (f"; for context, a {ceil['copy_mb']} MB fp32 matrix-vector product through MKL (`torch.mv`, what an "
             f"eager batch-1 decode step is made of) reads at **{_fmt(ceil['matvec_gbps'])} GB/s** = "
             f"{_fmt(ceil['matvec_gbps'] / ceil['copy_gbps'])} of the copy figure (the compiled step's own reductions "
             "can read faster)"
             if ceil.get("matvec_gbps") else "") + ".", ""]

    L += ["## Against the issue's targets", "",
          "| Figure | Value | Target | Met |", "|---|---|---|---|"]
    names = {
        "train_speedup_small": "Training tokens/s, ours ÷ peer, `small`",
        "train_ceiling_fraction_base": "Training model GFLOP/s ÷ matmul ceiling, `base`",
        "decode_speedup_b1_small": "Decoding tokens/s at batch 1, ours ÷ peer `generate()`, `small`",
        "decode_bandwidth_fraction_base": "Decoding effective GB/s ÷ copy bandwidth, batch 1, `base`",
        "cfg_cost_ratio": "Image with CFG ÷ without, seconds per image (demo shape)",
    }
    names.update({
        "train_bf16_speedup_base": "Training tokens/s under bf16 autocast ÷ fp32, ours, `base`",
        "train_bf16_ceiling_fraction_base": "Training model GFLOP/s under bf16 ÷ bf16 matmul ceiling, `base`",
        "train_bf16_speedup_vs_peer_base": "Training tokens/s under bf16 autocast, ours ÷ peer (same autocast), `base`",
    })
    rows = [(k, ifc[k], TARGETS[k]) for k in INTERFACE_KEYS]
    rows += [(k, ifc.get(k), BF16_TARGETS[k]) for k in BF16_TARGETS if ifc.get("bf16_available")]
    for k, v, (op, t) in rows:
        L.append(f"| {names[k]} (`{k}`) | {_fmt(v)} | {op.replace('>=', '≥').replace('<=', '≤')} {t} | {_met(k, v)} |")
    for name, r in results.get("decode", {}).items():
        for B in results["settings"]["decode_batches"]:
            v = r.get(f"b{B}_compiled_vs_eager")
            if v is not None:
                L.append(f"| Decoding `--compile` ÷ eager, `{name}`, batch {B} (each the timed choice of step) | {_fmt(v)} | "
                         f"≥ {COMPILE_TARGET[1]} | {_met('compiled_vs_eager', v)} |")
    L.append("")

    for key, title in (("train", "Training (forward + backward + AdamW step), fp32"),
                       ("train_bf16", "Training under bf16 autocast (ours and the peer), fp32 weights and optimizer")):
        if not results.get(key):
            continue
        ceiling = ceil["matmul_bf16_gflops"] if key == "train_bf16" else ceil["matmul_gflops"]
        L += _table_head(title, [
            "Preset", "Params", "Batch × seq", "Vocab", "Ours tok/s", "Ours `--compile` tok/s", "Peer tok/s",
            "Ours ÷ peer (eager)", "Best ÷ peer", "Best GFLOP/s", "Peer GFLOP/s", "Matmul GFLOP/s alongside",
            "Best ÷ ceiling alongside", "Best ÷ best ceiling", "Logit parity"])
        for name, r in results[key].items():
            best = r.get("best_speedup")
            best_s = f"{_fmt(best)} ({r['best_mode']})" if best is not None else _fmt(None)
            L.append(f"| `{name}` | {r['params'] / 1e6:.1f} M | {r['batch']} × {r['seq_len']} | {r['vocab_size']} | "
                     f"{_fmt(r['ours_tokens_per_s'])} | {_fmt(r.get('ours_compiled_tokens_per_s'))} | "
                     f"{_fmt(r.get('peer_tokens_per_s'))} | {_fmt(r.get('speedup'))} | "
                     f"{best_s} | "
                     f"{_fmt(r['best_gflops'])} | {_fmt(r.get('peer_gflops'))} | {_fmt(r.get('matmul_gflops_alongside'))} | "
                     f"{_fmt(r.get('best_ceiling_fraction_alongside'))} | "
                     f"{_fmt(r['best_gflops'] / ceiling)} | {_fmt(r.get('parity_max_abs_logit_diff'), 2)} |")
        it = next(iter(results[key].values()))
        compile_s = ", ".join(f"{r['compile_s']:.0f} s for `{n}`" for n, r in results[key].items() if r.get("compile_s"))
        L += ["", f"Model flops per token = 6N + 12·L·H·Q·T (N: parameters without the input embedding). Median of "
              f"{it['iters']} timed steps after warm-up, ours and the peer alternating; the same weights, batch, "
              "fused AdamW and cross-entropy on both sides; `--compile` = our forward through torch.compile as "
              f"`earlyfusion train --compile` runs it (compiled once{': ' + compile_s if compile_s else ''}, not counted); "
              "best = the faster of our two modes, which the targets use; "
              "the peer is transformers' ChameleonForConditionalGeneration "
              "(train mode, default attention) built by `model/chameleon_hf.py`. Ceiling alongside: the "
              f"{ceil['matmul_n']}² matmul (in the table's precision) timed in the same alternating rounds (the same share of a shared CPU); "
              "best ceiling: the best matmul at the start of the run. Logit parity: max |difference| "
              "of the two models' logits on one batch (its image-logit masking is a no-op with an empty "
              "vocabulary_map). Our attention kernel, as `model.attention_plan` chose it for the shape and precision "
              "(training chooses the same way): "
              + "; ".join(f"`{n}` {r['attention']}" for n, r in results[key].items() if r.get("attention")) + ".",
              ""]

    if results.get("decode"):
        L += _table_head("Decoding (KV cache, greedy)", [
            "Preset", "Batch", "Prompt + new", "Ours sampler tok/s", "Ours sampler `--compile` tok/s",
            "Ours bare loop tok/s", "Peer generate() tok/s", "Ours ÷ peer (eager)", "Best ÷ peer",
            "Peer on 1 thread tok/s (best ÷ it)", "Best eff. GB/s", "Copy GB/s alongside", "÷ copy alongside",
            "÷ best copy"])
        for name, r in results["decode"].items():
            for B in results["settings"]["decode_batches"]:
                if f"b{B}_speedup" not in r:
                    continue
                L.append(f"| `{name}` | {B} | {r['prompt_len']} + {r['new_tokens']} | {_fmt(r[f'b{B}_ours_tokens_per_s'])} | "
                         f"{_fmt(r.get(f'b{B}_ours_compiled_tokens_per_s'))} | "
                         f"{_fmt(r[f'b{B}_ours_raw_tokens_per_s'])} | {_fmt(r[f'b{B}_peer_tokens_per_s'])} | "
                         f"{_fmt(r[f'b{B}_speedup'])} | {_fmt(r[f'b{B}_best_speedup'])} ({r[f'b{B}_best_mode']}) | "
                         + (f"{_fmt(r[f'b{B}_peer_1thread_tokens_per_s'])} ({_fmt(r[f'b{B}_best_speedup_vs_peer_1thread'])}) | "
                            if f"b{B}_peer_1thread_tokens_per_s" in r else "— | ")
                         + f"{_fmt(r[f'b{B}_best_gbps'])} | "
                         f"{_fmt(r.get(f'b{B}_copy_gbps_alongside'))} | {_fmt(r.get(f'b{B}_bandwidth_fraction_alongside'))} | "
                         f"{_fmt(r[f'b{B}_best_gbps'] / ceil['copy_gbps'])} |")
        it = next(iter(results["decode"].values()))
        L += ["", "tok/s counts every row (batch × new tokens ÷ seconds, prefill included). Ours sampler = "
              "`sampling.generate.sample_tokens` (the loop `earlyfusion sample` runs: decoding rules, stop checks), its "
              "per-token steps run the way `earlyfusion.model.decode_plan` timed fastest for the model and batch size "
              "(eager on every thread or on one); `--compile` = the same loop where the compiled steps (row-wise "
              f"reductions over the weights' rows for up to {ROWWISE_MAX_ROWS} rows, or library products) join "
              "the candidates (timing and compiling once per model and batch size, "
              + ", ".join(f"{r[f'b{B}_compile_s']:.0f} s for `{n}` batch {B}" for n, r in results["decode"].items()
                          for B in results["settings"]["decode_batches"] if f"b{B}_compile_s" in r)
              + ", not counted); best = the faster of the two, which the targets use. "
              "Bare loop = `Decoder` + `KVCache` with argmax only, on the bench's threads. "
              "Peer = `generate(do_sample=False, min_new_tokens=max_new_tokens, use_cache=True)` on the bench's threads, "
              "as a user runs it; where our eager steps run on one thread, the peer is also timed on one thread (it is faster "
              "so too) and our best is divided by that. Effective GB/s = bytes of every weight but the "
              f"input embedding ({it['weight_bytes'] / 1e6:.0f} MB for `{it['preset']}`) × decode steps/s; the copy "
              "alongside is timed in the same alternating rounds. Median of "
              + ", ".join(f"{r['iters']} runs for `{n}`" for n, r in results["decode"].items())
              + " after warm-up, alternating.", ""]

    if results.get("decode"):
        cols = [("ours", "eager (timed)"), ("ours_compiled", "`--compile` (timed)"), ("mode_eager", "eager, all threads"),
                ("mode_eager_1", "eager, 1 thread"), ("mode_eager_rows", "eager, row by row"),
                ("mode_compiled_rowwise", "compiled, row-wise"),
                ("mode_compiled_library", "compiled, library"), ("bf16_ours", "bf16 eager (timed)"),
                ("bf16_ours_compiled", "bf16 `--compile` (timed)")]
        shown = [(k, t) for k, t in cols if any(f"b{B}_{k}_tokens_per_s" in r for r in results["decode"].values()
                                                 for B in results["settings"]["decode_batches"])]
        L += _table_head("Decoding, every way our sampler can run its steps (tok/s)",
                         ["Preset", "Batch"] + [t for _, t in shown] + ["Timed choice: eager / `--compile`", "Fastest"])
        for name, r in results["decode"].items():
            for B in results["settings"]["decode_batches"]:
                if f"b{B}_speedup" not in r:
                    continue
                fastest = r.get(f"b{B}_fastest_mode")
                L.append(f"| `{name}` | {B} | " + " | ".join(_fmt(r.get(f"b{B}_{k}_tokens_per_s")) for k, _ in shown)
                         + f" | {r.get(f'b{B}_plan_eager', '—')} / {r.get(f'b{B}_plan_compiled', '—')} | "
                         + (dict(cols).get(fastest, fastest) if fastest else "—") + " |")
        L += ["", "Every column runs the same sampling loop in the same alternating rounds as the table above; the pinned "
              "modes (`EARLYFUSION_DECODE_STEP`) show what each candidate gives, the timed columns what a user gets. "
              "bf16 columns run under bf16 autocast (`--mixed-precision bf16`; `auto` picks it on this CPU when it has "
              "fast bf16 products).", ""]

    img = results.get("image_generation")
    if img:
        n = img["num_samples"]
        L += ["## Image generation (demo shape)", "",
              "| Seconds per image, CFG | Seconds per image, no CFG | CFG ÷ no CFG | Images/s, CFG, "
              f"{n} samples |", "|---|---|---|---|",
              f"| {_fmt(img['s_per_image_cfg'])} | {_fmt(img['s_per_image_nocfg'])} | {_fmt(img['cfg_cost_ratio'])} | "
              f"{_fmt(img[f'images_per_s_cfg_{n}'])} |", "",
              f"`{img['preset']}` decoder, `{img['vq_preset']}` image tokenizer ({img['codes_per_image']} codes + "
              f"begin/end), a {results['settings']['image_prompt_len']}-token caption, CFG scale {img['cfg_scale']} "
              "(batched: [cond; uncond] rows share one forward pass), image top-k half the codebook; "
              "sampling + VQ decode of one image (batch 1) and of "
              f"{n} images in one batch. Median of {img['iters']} runs.", ""]

    L += _render_scale(results)

    tok = results.get("image_tokenizer")
    if tok:
        L += ["## Image tokenizer", "", "| Encode images/s | Decode images/s |", "|---|---|",
              f"| {_fmt(tok['encode_images_per_s'])} | {_fmt(tok['decode_images_per_s'])} |", "",
              f"`{tok['vq_preset']}` preset, {tok['image_size']} px, batch {tok['batch']}, median of {tok['iters']}.", ""]
    if results.get("gpu_note"):
        L += ["## GPU", "", results["gpu_note"], ""]
    L += ["GPU check: `make bench-gpu` (`bench/gpu.py`, under 8 minutes on an H100) measures decoder training MFU "
          "under bf16 autocast with `torch.compile` (`base` and a 1.08B-parameter shape), image tokenizer training "
          "and `earlyfusion encode` images/s at 256 px, image generation with classifier-free guidance at 256 and "
          "1024 codes per image against transformers' `generate()` on the same weights, and whether a 20-step fp32 "
          "training run gives the same losses on the GPU as on the CPU. It adds a section named after the device "
          "below, which `make bench` keeps; none below: it has not run on a GPU yet.", ""]
    return "\n".join(L)


def attended(r: dict) -> str:
    """How one of our forwards attended a packed-training row set (``bench_scale.packed_attention``)."""
    a = r.get("attention")
    if a is None:  # results written before the chunked attention
        return f"mask built {r['mask_builds_per_forward']}× ({r['n_layers']} layers)"
    if a["chunks"]:
        return f"by document: {a['chunks']} chunks"
    return f"mask built {a['mask_builds']}× ({r['n_layers']} layers)"


def _render_scale(results: dict) -> list[str]:
    """The image-scale sections: packed training at long contexts and batched image generation with CFG."""
    L: list[str] = []
    packed = results.get("train_packed")
    if packed:
        it = next(iter(packed.values()))
        L += _table_head(f"Training at image scale: packed documents, {it['precision']}", [
            "Preset", "Batch × context", "Documents per row", "Filled", "Ours tok/s", "Peer tok/s", "Ours ÷ peer",
            "Ours GFLOP/s (documents)", "Ours GFLOP/s (whole row)", "Matmul GFLOP/s alongside",
            "Ours ÷ ceiling (documents)", "Ours ÷ ceiling (whole row)", "Peer ÷ ceiling (documents)",
            "Attention per forward", "Logit parity"])
        for r in packed.values():
            L.append(f"| `{r['preset']}` | {r['batch']} × {r['seq_len']} | {_fmt(r['docs_per_row'])} | "
                     f"{r['fill']:.0%} | {_fmt(r['ours_tokens_per_s'])} | {_fmt(r.get('peer_tokens_per_s'))} | "
                     f"{_fmt(r.get('speedup'))} | {_fmt(r['ours_gflops'])} | {_fmt(r['ours_dense_gflops'])} | "
                     f"{_fmt(r.get('matmul_gflops_alongside'))} | {_fmt(r.get('ours_ceiling_fraction_alongside'))} | "
                     f"{_fmt(r.get('ours_dense_ceiling_fraction_alongside'))} | "
                     f"{_fmt(r.get('peer_ceiling_fraction_alongside'))} | {attended(r)} | "
                     f"{_fmt(r.get('parity_max_abs_logit_diff'), 2)} |")
        L += ["", f"Rows packed as training packs them: whole documents, first fit, positions restarting per document, "
              f"`doc_ids` given to `Decoder.forward`; two thirds of the documents a "
              f"captioned image of {it['codes_per_image']} codes ({it['grid'][0]}×{it['grid'][1]}), the rest text, "
              f"over a {it['vocab_size']}-id vocabulary. tok/s counts every row position (padding too). Model flops "
              "per token = 6N + 12·L·H·Q·T: the documents column takes T = Σd²/Σd over the row's documents (the "
              "attention the mask leaves), the whole-row column T = the context (what a dense masked attention "
              "computes). The peer (transformers' Chameleon, default attention) gets the same rows with the "
              "restarting `position_ids`, from which it builds its own packed-sequence mask; logit parity = max "
              "|difference| on one packed row. Attention per forward: ours attends long rows document by document in "
              "chunks (`model/masks.py`), where that skips enough masked work, and otherwise builds the dense "
              "block-diagonal mask once per forward for all its layers. "
              f"Forward + backward + fused AdamW step, median of {it['iters']} timed steps after warm-up, ours, "
              "the peer and the matmul ceiling alternating.", ""]
    img = results.get("image_scale")
    if img:
        n = img["num_samples"]
        L += _table_head(f"Image generation at image scale: {n} images, CFG {img['cfg_scale']}, {img['precision']}", [
            "Codes per image", "Ours images/s (steps)", "Peer `generate()` images/s", "Ours ÷ peer",
            "Peer on 1 thread images/s (ours ÷ it)", "Ours s / batch", "Peer s / batch"])
        for r in img["grids"].values():
            one = (f"{_fmt(r['peer_1thread_images_per_s'])} ({_fmt(r['speedup_vs_peer_1thread'])})"
                   if "peer_1thread_images_per_s" in r else "—")
            L.append(f"| {r['codes_per_image']} | {_fmt(r['ours_images_per_s'])} ({r['plan']}) | "
                     f"{_fmt(r['peer_images_per_s'])} | {_fmt(r['speedup'])} | {one} | {_fmt(r['ours_s'])} | "
                     f"{_fmt(r['peer_s'])} |")
        L += ["", f"`{img['preset']}` decoder, random weights, the same on both sides; {n} samples of one "
              f"{img['prompt_len']}-token caption drawn in one batch, code grids only (no VQ decode). Ours = "
              "`sampling.generate.sample_tokens` with the settings of `earlyfusion sample --modality image --cfg "
              f"{img['cfg_scale']} --num-samples {n}`: [cond; uncond] rows (uncond = `[bos]`) in one batch and one "
              "forward per step, logits mixed on image codes only, the decoding rules forcing begin-image, h·w codes "
              "and end-image. Peer = `generate(do_sample=True, guidance_scale=S, negative_prompt_ids=[bos] per row, "
              "min_new_tokens = max_new_tokens = h·w + 2)` with the same temperature and top-k and nothing else "
              "restricted: its classifier-free guidance (`UnbatchedClassifierFreeGuidanceLogitsProcessor`) runs the "
              "unconditional rows as a second, separate forward per step with its own cache, and mixes "
              "log-softmaxed scores on every token. Steps: how our per-token steps ran (`model.decode_plan`'s timed "
              "choice); where that is one thread, the peer is also timed on one thread. Median of "
              f"{img['iters']} runs after warm-up, alternating.", ""]
    return L


# ---------------------------------------------------------------- main


def _fmt_load(load) -> str:
    return "unknown" if load is None else ", ".join(f"{x:.2f}" for x in load)
