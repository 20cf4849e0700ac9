"""Pieces both training loops (image tokenizer and decoder) share: the LR schedule and metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS = "metrics.jsonl"


def warmup_cosine_lr(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine decay to min_lr_ratio·lr; a pure function of the step (exact resume)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cos)


def metrics_file(out: Path, resume_step: int) -> Path:
    """``out/metrics.jsonl`` cut back to the resumed step, so it reads like one uninterrupted run."""
    path = Path(out) / METRICS
    if path.exists():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
        path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    elif resume_step:
        path.touch()
    return path
