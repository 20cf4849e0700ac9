"""The skeleton both training loops (image tokenizer and decoder) share.

``TrainLoop`` owns what does not depend on the model: which checkpoint a run starts from (refusing
to mix two runs in one directory), the run's identity, the LR of each step, the non-finite guard,
when to checkpoint and how old checkpoints are pruned, metrics.jsonl and the progress bar and log
lines. The trainers keep the model, the loss, the batches and what a checkpoint holds.

Nothing here draws random numbers or touches the model, so a resumed run reproduces an
uninterrupted one exactly as long as each trainer saves and restores its own state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from earlyfusion.checkpoint import atomic_dir, latest_good, prune, step_dir, step_dirs
from earlyfusion.errors import UserError
from earlyfusion.logs import log, progress

METRICS = "metrics.jsonl"


def warmup_cosine_lr(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine decay to min_lr_ratio·lr; a pure function of the step (exact resume)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cos)


def _metrics_step(line: bytes) -> int | None:
    """The step of one metrics.jsonl line, or None when the line is not a JSON object with an int "step"."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = obj.get("step") if isinstance(obj, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def metrics_file(out: Path, resume_step: int) -> Path:
    """``out/metrics.jsonl`` cut back to the resumed step, so it reads like one uninterrupted run.

    The cut file is written beside it and renamed into place (a kill leaves the old or the new file).
    Lines that are not JSON objects with an integer "step" (torn by a kill, edited) are dropped, with
    one warning.
    """
    path = Path(out) / METRICS
    if path.exists():
        keep, dropped = [], 0
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            step = _metrics_step(line)
            if step is None:
                dropped += 1
            elif step <= resume_step:
                keep.append(line)
        if dropped:
            log.warning("%s: dropped %d line(s) that are not JSON records with a step", path, dropped)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(k + b"\n" for k in keep))
            f.flush()
            os.fsync(f.fileno())  # the cut file is on disk before it replaces the old one
        os.replace(tmp, path)
    else:
        path.touch()
    return path


def source_key(spec: str) -> str:
    """A data source as recorded in a run's identity: an existing path made absolute (a ``:WEIGHT``
    suffix kept), anything else (a hub name) as given."""
    head, sep, tail = spec.rpartition(":")
    path, suffix = (head, sep + tail) if sep and head and _is_number(tail) else (spec, "")
    p = Path(path).expanduser()
    return (str(p.resolve()) if p.exists() else path) + suffix


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_identity(saved: dict | None, now: dict, ckpt: Path) -> None:
    """Refuse to resume a run with options that shape another model or another data stream, naming each
    difference. Only what the checkpoint recorded is compared (``saved`` None: nothing recorded)."""
    if not saved:
        return
    a, b = (_flat(json.loads(json.dumps(d))) for d in (saved, now))  # tuples read back as lists
    diffs = [f"{k} {a[k]!r} (now {b.get(k)!r})" for k in sorted(a) if a[k] != b.get(k)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"--resume: {ckpt} belongs to a run with other options: {shown}. "
                        "Resume with the options of that run, or train into another --out")


class TrainLoop:
    """Resume, LR, non-finite guard, checkpoints, metrics and log lines of one training run."""

    def __init__(self, *, out: Path, checkpoints: Path, steps: int, checkpoint_every: int, keep_checkpoints: int,
                 log_every: int, max_nonfinite: int, main: bool, desc: str):
        self.out, self.checkpoints = Path(out), Path(checkpoints)
        self.steps, self.checkpoint_every, self.keep = steps, checkpoint_every, keep_checkpoints
        self.log_every, self.max_nonfinite, self.main, self.desc = log_every, max_nonfinite, main, desc
        self.start_step = self.skipped = self.bad_in_row = 0
        self.metrics_path: Path | None = None
        self.bar = None
        self._owed = False  # a periodic checkpoint fell on a skipped step: write it at the next good one

    # ------------------------------------------------------------ before the first step
    def resume_point(self, resume: bool) -> Path | None:
        """The checkpoint to continue from (None: start from scratch). Reads only.

        Without ``resume`` a directory that already holds checkpoints is refused (two runs would mix).
        With it, corrupted checkpoints are skipped; when every one is corrupted the run is refused
        rather than silently started again.
        """
        found = step_dirs(self.checkpoints)
        if not resume:
            if found:
                raise UserError(f"{self.out} already holds a run ({found[0].name}); "
                                "pass --resume to continue it or choose another --out")
            return None
        if not found:
            log.info("--resume: no checkpoint in %s yet; starting from scratch", self.checkpoints)
            return None
        good = latest_good(self.checkpoints)
        if good is None:
            raise UserError(f"--resume: every checkpoint in {self.checkpoints} is corrupted "
                            f"({', '.join(d.name for d in found)}); move them away to start again, or choose another --out")
        return good

    def counters(self, step: int) -> dict:
        """What a checkpoint stores for the loop itself."""
        return {"step": step, "skipped_nonfinite": self.skipped, "bad_in_row": self.bad_in_row}

    def restore(self, state: dict) -> None:
        self.start_step, self.skipped = int(state["step"]), int(state["skipped_nonfinite"])
        self.bad_in_row = int(state.get("bad_in_row", 0))

    def iterate(self) -> Iterator[int]:
        """The remaining steps (0-based), with the progress bar; cuts metrics.jsonl back to the start step."""
        if self.main:
            self.metrics_path = metrics_file(self.out, self.start_step)
        self.bar = progress(range(self.start_step, self.steps), total=self.steps, initial=self.start_step, desc=self.desc)
        return iter(self.bar)

    # ------------------------------------------------------------ each step
    @staticmethod
    def set_lr(optimizer, lr: float) -> float:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def skip_nonfinite(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when the step must be skipped (no update): its loss or gradient norm is not finite.

        More than ``max_nonfinite`` such steps in a row stop the run with a UserError; the last good
        checkpoint stays as it is.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_in_row = 0
            return False
        self.skipped += 1
        self.bad_in_row += 1
        log.warning("step %d: non-finite loss/gradient (loss %s, grad norm %s); step skipped (%d in a row)",
                    step + 1, loss, grad_norm, self.bad_in_row)
        if self.bad_in_row > self.max_nonfinite:
            raise UserError(
                f"stopped: {self.bad_in_row} non-finite steps in a row (limit --max-nonfinite {self.max_nonfinite}); "
                f"the last good checkpoint is {latest_good(self.checkpoints)}. Lower --lr or check the data."
            )
        return True

    def record(self, record: dict, postfix: dict, line: str, *, force: bool = False) -> None:
        """Append a metrics record (main process), update the bar, and print ``line`` every ``log_every``
        steps, at the last step, or when ``force``."""
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(refresh=False, **postfix)
        done = record["step"]
        if force or done % self.log_every == 0 or done == self.steps:
            self.say(line)

    def say(self, line: str) -> None:
        (self.bar.write if self.bar is not None and not self.bar.disable else log.info)(line)

    def checkpoint_due(self, done: int, skipped: bool) -> bool:
        """Every ``checkpoint_every`` steps and always at the last step (a skipped last step saves the last
        good weights); a periodic checkpoint that falls on a skipped step is written at the next good one."""
        if done >= self.steps:
            return True
        periodic = done % self.checkpoint_every == 0
        if skipped:
            self._owed = self._owed or periodic
            return False
        due, self._owed = periodic or self._owed, False
        return due

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step`` crash-safely with ``write(tmp_dir)``, then prune old ones (main process)."""
        dest = step_dir(self.checkpoints, step)
        with atomic_dir(dest) as tmp:
            write(tmp)
        prune(self.checkpoints, self.keep)
        return dest

    # ------------------------------------------------------------ after the last step
    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.main and self.skipped:
            log.info("skipped %d non-finite step(s)", self.skipped)
