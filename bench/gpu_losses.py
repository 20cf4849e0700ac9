"""The GPU check's last part: the same short training run on the CPU and on the GPU, and whether their losses
agree (``bench/gpu.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # run as a script (``python bench/gpu.py``) or loaded from its file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


from bench_machine import log  # noqa: E402
from gpu_device import Context


# fp32 on both devices: the same weights and batches differ only in how kernels round, a few 1e-7 of a loss per
# step that 20 AdamW steps of the tiny model leave near 1e-6 (weights perturbed by 1e-6 moved no step's loss by
# more than 2e-6 relative on a CPU); bf16 or TF32 products slipping into a path show as 1e-4 and more.
LOSS_REL_TOL = 1e-4
LOSS_STEPS = 20


# ---------------------------------------------------------------- 5. the same training run on the CPU and the GPU


def run_cli(*argv) -> None:
    from earlyfusion.cli import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"earlyfusion {' '.join(map(str, argv[:2]))} exited {rc} (its error is in the log above)")


def train_run(work: Path, name: str, steps: int, *, cpu: bool, timeout: float) -> list[float]:
    """The losses of one ``earlyfusion train`` run in a process of its own (with ``cpu`` the GPU hidden from it)."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "earlyfusion.cli", "train", "--data", work / "data", "--image-tokenizer", work / "vq",
            "--vocab", work / "vocab", "--out", out, "--preset", "tiny", "--steps", steps, "--batch-size", 4,
            "--warmup-steps", 2, "--lr", 3e-3, "--eval-every", 0, "--checkpoint-every", steps, "--seed", 0,
            "--dropout", 0, "--mixed-precision", "no"]
    # the same attention kernel on both: a CPU would otherwise time two and keep the faster, and they round differently
    env = {**os.environ, "EARLYFUSION_ATTENTION": "library"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(30.0, timeout))
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"train on the {'CPU' if cpu else 'device'} exited {proc.returncode}: {tail}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"{out}/metrics.jsonl lists steps {[r['step'] for r in rows]}, not 1..{steps}")
    return [float(r["loss"]) for r in rows]


def compare_losses(cpu: list[float], dev: list[float], tol: float = LOSS_REL_TOL) -> dict:
    rel = [abs(a - b) / max(1.0, abs(a)) for a, b in zip(cpu, dev, strict=True)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    return {"comparison": "ok" if rel[worst] <= tol else "mismatch", "max_rel_diff": rel[worst],
            "worst_step": worst + 1, "step1_rel_diff": rel[0], "rel_diffs": rel}


def part_losses(ctx: Context, rec: dict) -> None:
    work = ctx.work / "losses"
    shutil.rmtree(work, ignore_errors=True)
    steps = 4 if ctx.quick else LOSS_STEPS
    images, vq_steps = (64, 10) if ctx.quick else (160, 30)
    rec.update(preset="tiny", steps=steps, batch=4, precision="fp32 (--mixed-precision no)", seed=0,
               tolerance_rel=LOSS_REL_TOL, tolerance="|loss_cpu - loss_device| <= tol · max(1, |loss_cpu|) at every step")
    log("  built-in shapes data, tiny image tokenizer and vocabulary ...")
    run_cli("data", "shapes", "--out", work / "data", "--num-images", images, "--image-size", 16, "--seed", 1,
            "--num-interleaved", 20, "--num-text", 20)
    run_cli("tokenizer", "train", "--data", work / "data", "--out", work / "vq", "--preset", "tiny",
            "--steps", vq_steps, "--mixed-precision", "no")
    run_cli("vocab", "build", "--image-tokenizer", work / "vq", "--data", work / "data", "--out", work / "vocab",
            "--text-vocab-size", 300)
    # the CPU run first: it encodes the images into the data's code cache, which the GPU run then reads, so both
    # train on the same codes whatever the devices' convolutions round to
    log(f"  {steps} steps on the CPU ...")
    rec["cpu_losses"] = train_run(work, "cpu", steps, cpu=True, timeout=ctx.left())
    if ctx.device.type != "cuda":
        rec.update(device_losses=None, comparison="skipped", reason="no GPU: only the CPU run was made")
        log("  no GPU: comparison skipped")
        return
    log(f"  {steps} steps on the GPU ...")
    rec["device_losses"] = train_run(work, "gpu", steps, cpu=False, timeout=ctx.left())
    rec.update(compare_losses(rec["cpu_losses"], rec["device_losses"]))
    log(f"  largest relative difference {rec['max_rel_diff']:.1e} (step {rec['worst_step']}): {rec['comparison']}")


