"""The GPU check's Markdown section for bench/RESULTS.md, rendered from its results (``bench/gpu.py``)."""

from __future__ import annotations

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/gpu.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))




# ---------------------------------------------------------------- the report


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


MARK = "<!-- a device section of bench/gpu.py: make bench keeps it -->"


def device_sections(text: str) -> dict[str, str]:
    """The device sections (``## <device>`` headings followed by ``MARK``) of a RESULTS.md text, by heading."""
    out: dict[str, str] = {}
    for chunk in ("\n" + text).split("\n## ")[1:]:
        heading, _, body = chunk.partition("\n")
        if body.startswith(MARK):
            out[heading] = f"## {heading}\n{body.rstrip()}\n"
    return out


def with_device_sections(text: str, sections: dict[str, str]) -> str:
    """``text`` without any device section of its own, then ``sections`` (one per device: a newer one replaces an
    older one of the same heading)."""
    kept = [chunk for chunk in ("\n" + text).split("\n## ") if not chunk.partition("\n")[2].startswith(MARK)]
    base = kept[0].lstrip("\n") + "".join(f"\n## {chunk}" for chunk in kept[1:])
    return base.rstrip() + "\n" + "".join(f"\n{s}" for s in sections.values())


def render(results: dict) -> str:
    dev, parts = results["device"], results["parts"]
    peak = results["peak_tflops"]
    lines = [f"## {dev['name']}", MARK, "",
             f"`make bench-gpu` (`bench/gpu.py{' ' + results['argv'] if results['argv'] else ''}`) at commit "
             f"`{dev['commit']}`, {dev['date']}: torch {dev['torch']}"
             + (f", CUDA {dev['cuda']}, compute capability {dev['capability']}, {dev['memory_gb']:.0f} GiB"
                if dev["type"] == "cuda" else ", no GPU")
             + f"; peak dense bf16 {_num(peak)} TFLOP/s ({results['peak_source']}); {results['elapsed_s']:.0f} s in all"
             + (" (--quick: tiny shapes, not figures to quote)" if results["quick"] else "") + ".", ""]
    failed = [(k, p) for k, p in parts.items() if p.get("status") == "error"]
    if failed:
        lines += ["Failed parts: " + "; ".join(f"`{k}`: {p['error']}" for k, p in failed), ""]
    skipped = [f"`{k}` ({p['reason']})" for k, p in parts.items() if p.get("status") == "skipped"]
    if skipped:
        lines += ["Skipped parts: " + "; ".join(skipped) + ".", ""]

    p = parts.get("train_mfu", {})
    if p.get("shapes"):
        lines += ["**Decoder training**, bf16 autocast, forward + backward + fused AdamW"
                  + (", `torch.compile` as `train --compile`" if p.get("compile") else ", eager") + ":", "",
                  "| Shape | Parameters | Batch × sequence | Eager tokens/s | Compiled tokens/s | Model TFLOP/s | MFU | Peak memory GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in p["shapes"].items():
            if "tokens_per_s" not in s:
                continue
            lines.append(f"| `{name}` | {_num(s['params'] / 1e6)}M | {s['batch']} × {s['seq_len']} | "
                         f"{_num(s.get('eager_tokens_per_s'))} | {_num(s.get('compiled_tokens_per_s'))} | "
                         f"{_num(s['model_tflops'])} | {_pct(s['mfu'])} | {_num(s.get('peak_memory_gb'))} |")
        if p.get("skipped"):
            lines += ["", "Not measured: " + "; ".join(p["skipped"]) + "."]
        attention = next((s["attention"] for s in p["shapes"].values() if "attention" in s), "")
        lines += ["", f"Model FLOPs per token = 6N + 12·L·H·Q·T (N: parameters without the input embedding; T: the "
                      f"sequence length); MFU = model FLOP/s ÷ peak. Attention: {attention}.", ""]
    t, e = parts.get("tokenizer_train", {}), parts.get("encode", {})
    if "images_per_s" in t or "images_per_s" in e:
        lines += ["**Image tokenizer**:", ""]
        if "images_per_s" in t:
            lines.append(f"- training `{t['preset']}` at {t['image_size']} px: **{_num(t['images_per_s'])} images/s** "
                         f"(batch {t['batch']}, {t['precision']}; the steps of `tokenizer train`)")
        if "images_per_s" in e:
            lines.append(f"- encoding `{e['preset']}` at {e['image_size']} px: **{_num(e['images_per_s'])} images/s** "
                         f"(batch {e['batch']}; {e['path']}; pixels already decoded)")
        lines.append("")
    g = parts.get("image_generation", {})
    if g.get("grids"):
        lines += [f"**Image generation**, `{g['preset']}` decoder, {g['num_samples']} images of one caption, CFG "
                  f"{g['cfg_scale']}, {g['codebook_size']} image ids, {g['precision']}:", "",
                  "| Codes per image | Ours eager images/s | Ours `--compile` images/s | Peer `generate()` images/s | Best ours ÷ peer |",
                  "|---|---|---|---|---|"]
        for r in g["grids"].values():
            if "ours_images_per_s" not in r:
                continue
            best = max(r["ours_images_per_s"], r.get("ours_compiled_images_per_s") or 0.0)
            peer = r.get("peer_images_per_s")
            lines.append(f"| {r['codes_per_image']} | {_num(r['ours_images_per_s'])} | "
                         f"{_num(r.get('ours_compiled_images_per_s'))} | {_num(peer)} | "
                         f"{_num(best / peer if peer else None)} |")
        notes = [f"{k}: {v}" for k, v in ((name, r.get("peer_skipped")) for name, r in g["grids"].items()) if v]
        notes += g.get("skipped", [])
        lines += ["", "Not measured: " + "; ".join(notes) + "."] if notes else []
        lines.append("")
    s = parts.get("losses", {})
    if "cpu_losses" in s:
        verdict = {"ok": "agree", "mismatch": "**disagree**"}.get(s.get("comparison"), "")
        what = (f"{verdict}: largest relative difference {s['max_rel_diff']:.1e} (step {s['worst_step']}), "
                f"tolerance {s['tolerance_rel']:.0e}" if s.get("comparison") in ("ok", "mismatch")
                else f"comparison skipped ({s.get('reason', 'no GPU run')})")
        lines += [f"**CPU and device losses**, {s['steps']} fp32 steps of `tiny` on the built-in data: {what}.", ""]
    return "\n".join(lines).rstrip() + "\n"


