"""The trainer both training commands (image tokenizer and decoder) share.

``Trainer`` owns what does not depend on the model: the accelerator (one process, or many under
``accelerate launch``) and the precision, the run directory's lock and which checkpoint a run starts from
(refusing to mix two runs in one directory), the run's identity, the LR of each step, gradient clipping and the
non-finite guard, the optimizer step, checkpoints (the optimizer, RNG and loop counters beside what each trainer
adds; written crash-safely, old ones pruned), metrics.jsonl and the progress bar and log lines. The trainers keep
the model, the loss, the batches and what else a checkpoint holds.

With ``sharding="fsdp"`` (``training.sharding``) the model is sharded over the processes instead of wrapped in DDP,
and a checkpoint holds the weights and optimizer state as DCP shards written by every process into the same
temporary directory, which the main process renames once all have written; the gathered weights are written
beside them like any other checkpoint's.

Nothing here draws random numbers, so a resumed run reproduces an uninterrupted one exactly as long as each
trainer saves and restores its own state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from earlyfusion.core.checkpoint import atomic_dir, latest_good, load_state, prune, save_state, step_dir, step_dirs
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log, progress
from earlyfusion.core.rundir import METRICS, check_fresh, run_lock
from earlyfusion.core.runtime import autocast, mixed_precision
from earlyfusion.training.sharding import (
    SHARDED_DIR,
    Weights,
    all_finite,
    full_weights,
    global_norm,
    is_sharded,
    load_sharded,
    main_value,
    save_sharded,
    shard_decoder,
)

STATE = "state"
"""The name of a checkpoint's training-state files (``state.*``; see ``save_state``)."""


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
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, an over-long integer, or nesting deeper than the stack
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


class Trainer:
    """One training run's machinery: accelerator, lock, resume, LR, clipping, non-finite guard, checkpoints, logs.

    Use as a context manager: the run directory's lock is held from ``__enter__`` to ``__exit__`` (main process)."""

    def __init__(self, *, out: Path, checkpoints: Path, steps: int, checkpoint_every: int, keep_checkpoints: int,
                 log_every: int, max_nonfinite: int, grad_clip: float, batch_size: int, precision: str, resume: bool,
                 desc: str, sharding: str | None = None):
        self.mp, self.precision_why = mixed_precision(precision)
        self.accelerator = Accelerator(mixed_precision="no")  # autocast is ours: one choice, logged, per command
        acc = self.accelerator
        self.rank, self.world, self.main, self.device = acc.process_index, acc.num_processes, acc.is_main_process, acc.device
        # sharding None: this trainer does not shard (accelerate's prepare does what its config says); "none" or
        # "fsdp": the decoder's own choice, and accelerate's FSDP config (on GPUs) asks for "fsdp"
        if sharding == "none" and acc.distributed_type == DistributedType.FSDP:
            log.info("accelerate's config enables FSDP: the decoder is sharded as with --sharding fsdp")
            sharding = "fsdp"
        self.sharding = sharding
        self.sharded = sharding == "fsdp" and self.world > 1  # one process has nothing to shard over
        if batch_size % self.world:
            raise UserError(f"--batch-size {batch_size} must be divisible by the number of processes ({self.world})")
        self.out, self.checkpoints = Path(out), Path(checkpoints)
        self.steps, self.checkpoint_every, self.keep = steps, checkpoint_every, keep_checkpoints
        self.log_every, self.max_nonfinite, self.desc = log_every, max_nonfinite, desc
        self.grad_clip = grad_clip if grad_clip > 0 else float("inf")
        self.resume = resume
        self.start_step = self.skipped = self.bad_in_row = 0
        self.metrics_path: Path | None = None
        self.bar = None
        self._owed = False  # a periodic checkpoint fell on a skipped step: write it at the next good one
        self._stack = ExitStack()
        self.ckpt: Path | None = None

    def __enter__(self) -> Trainer:
        if self.main:
            self._stack.enter_context(run_lock(self.out, self.desc))
        self.ckpt = self.resume_point(self.resume)
        if self.ckpt is None and not self.resume and self.main:
            check_fresh(self.out, resume=False)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

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

    def load_state(self) -> dict:
        """The resumed checkpoint's training state (``self.ckpt`` must be set)."""
        return load_state(self.ckpt, STATE)

    def restore(self, state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> None:
        """What every trainer restores from a checkpoint's state: the optimizer, the RNG and the loop counters.
        A checkpoint of --sharding fsdp holds the weights and optimizer as shards, loaded into ``model`` and
        ``optimizer`` on any number of processes, sharded or not."""
        if (self.ckpt / SHARDED_DIR).is_dir() and model is not None:
            load_sharded(self.ckpt, model, optimizer)
        elif "optimizer" not in state:
            raise UserError(f"--resume: {self.ckpt} holds sharded state (--sharding fsdp) that this trainer cannot read")
        elif self.sharded:
            raise UserError(f"--resume: {self.ckpt} was written without --sharding fsdp; resume it without "
                            "--sharding fsdp (its optimizer state is not sharded)")
        else:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.start_step, self.skipped = int(state["step"]), int(state["skipped_nonfinite"])
        self.bad_in_row = int(state.get("bad_in_row", 0))
        log.info("resumed from %s (step %d)", self.ckpt, self.start_step)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model sharded over the processes under --sharding fsdp (before its optimizer is made: the optimizer
        must hold the shards); as it is otherwise."""
        return shard_decoder(model, self.device) if self.sharded else model

    def prepare(self, *objects):
        if self.sharded:  # already spread over the processes; DDP would all-reduce what FSDP reduce-scatters
            return objects
        return self.accelerator.prepare(*objects)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def iterate(self) -> Iterator[int]:
        """The remaining steps (0-based), with the progress bar; cuts metrics.jsonl back to the start step."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics_path = metrics_file(self.out, self.start_step)
        self.bar = progress(range(self.start_step, self.steps), total=self.steps, initial=self.start_step, desc=self.desc)
        return iter(self.bar)

    # ------------------------------------------------------------ each step
    def autocast(self):
        return autocast(self.mp, self.device.type)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, parameters) -> float:
        """Clip the gradient norm to --grad-clip (0: no clipping) and return the norm before clipping (over all the
        shards of a sharded model: torch's clipping reduces DTensor gradients over the processes)."""
        if self.sharded:
            return global_norm(torch.nn.utils.clip_grad_norm_(list(parameters), self.grad_clip))
        return float(self.accelerator.clip_grad_norm_(parameters, self.grad_clip))

    def same(self, value):
        """The main process's ``value`` on every process (a sharded model's processes must take the same branches)."""
        return main_value(value, self.main) if self.sharded else value

    def mean(self, value: float) -> float:
        """``value`` averaged over the processes."""
        if self.world == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor([value], device=self.device), reduction="mean"))

    @staticmethod
    def set_lr(optimizer, lr: float) -> float:
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def update(self, optimizer, step: int, loss: float, grad_norm: float) -> bool:
        """Take the optimizer step unless the loss or gradient norm is not finite; True when it was skipped."""
        skipped = self.skip_nonfinite(step, loss, grad_norm)
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return skipped

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
                f"{self.last_good_words()}. Lower --lr or check the data."
            )
        return True

    def last_good_words(self) -> str:
        good = latest_good(self.checkpoints)
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"

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

    def weights(self, model: torch.nn.Module) -> torch.nn.Module | Weights:
        """What ``rundir.write_decoder`` writes ``model``'s weights from: the model, or the weights of a sharded one
        gathered to the main process (every process must call it then)."""
        return full_weights(model) if is_sharded(model) else model

    def save(self, step: int, optimizer, write: Callable[[Path], None], state: dict,
             model: torch.nn.Module | None = None) -> Path | None:
        """Checkpoint ``step`` (main process): ``write(tmp_dir)`` writes the weights and config, the training state
        holds ``state`` with the optimizer, RNG and loop counters; written crash-safely, then old ones pruned.
        Under --sharding fsdp every process writes its shards of ``model`` and ``optimizer`` (``save_sharded``)
        into the main process's temporary directory before the main process renames it."""
        dest = None
        params = [q for g in optimizer.param_groups for q in g["params"]]
        if not all_finite(params):
            raise UserError(f"stopped: the weights are not finite after step {step}, so they were not saved; "
                            f"{self.last_good_words()}. Lower --lr or check the data, and resume from it")
        full = {"rng": torch.get_rng_state(), "step": step, "skipped_nonfinite": self.skipped,
                "bad_in_row": self.bad_in_row, **state}
        if self.sharding == "fsdp" and model is not None:
            dest = self.save_shards(step, optimizer, write, full, model)
        elif self.main:
            dest = step_dir(self.checkpoints, step)
            with atomic_dir(dest) as tmp:
                write(tmp)
                save_state(tmp, STATE, {"optimizer": optimizer.state_dict(), **full})
        if self.main:
            prune(self.checkpoints, self.keep)
        self.accelerator.wait_for_everyone()
        return dest

    def save_shards(self, step: int, optimizer, write: Callable[[Path], None], full: dict,
                     model: torch.nn.Module) -> Path | None:
        dest = step_dir(self.checkpoints, step) if self.main else None
        with ExitStack() as stack:
            tmp, error = None, None
            if self.main:
                try:
                    tmp = stack.enter_context(atomic_dir(dest))
                    write(tmp)
                    save_state(tmp, STATE, full)
                except Exception as e:  # noqa: BLE001 - raised below, once the others know not to wait for it
                    tmp, error = None, e
            tmp = self.same(tmp)  # every process writes into the main process's temporary directory
            if error is not None:
                raise error
            if tmp is None:
                raise UserError(f"stopped: the main process could not write the checkpoint of step {step} "
                                f"(its log says why); {self.last_good_words()}")
            save_sharded(tmp, model, optimizer)
            self.accelerator.wait_for_everyone()  # all shards are written before the main process renames it
        return dest

    # ------------------------------------------------------------ after the last step
    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.main and self.skipped:
            log.info("skipped %d non-finite step(s)", self.skipped)
        # every process arrives before any tears the process group down: one still writing while another destroys
        # the group can leave the launcher waiting forever
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.bad_in_row:
            raise UserError(f"the last {self.bad_in_row} step(s) of the run were not finite (skipped), so it did not "
                            f"finish as asked; {self.last_good_words()}. Lower --lr or check the data")
