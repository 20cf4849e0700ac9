"""The trained-decoder run directory (LMRUN): its layout and its bookkeeping (``earlyfusion.training.data.runs``
loads one).

    LMRUN/
      vocab/                     copy of the merged vocabulary (tokenizer.json + layout.json)
      image_tokenizer/           copy of the VQ-VAE run it was trained with (config.json + model.safetensors)
      checkpoints/step-XXXXXXXX/ model.safetensors + config.json (+ state.* for --resume), MANIFEST.json; with a
                                 grid-token vocabulary config.json lists the code grids trained on (``trained_grids``)
      checkpoints/best/          the weights with the lowest held-out loss so far (never pruned)
                                 (a LoRA run, `train --trainable lora`, stores adapters.safetensors instead of the
                                 weights, and its config.json names the base checkpoint under "lora")
      final.json                 {"checkpoint": "best"} when the run's model is checkpoints/best (`train --final best`)
      metrics.jsonl, samples/, loss_curves.png
      imported/                  runs made by `earlyfusion import`: the permutation between our ids and the
                                 source's (permutation.json) and the source's tokenizer and config files

      .lock                      held (flock) by the one command writing into the run; names its process

A run is self-contained: ``load_run(LMRUN)`` (in ``earlyfusion.training.data.runs``) needs nothing outside it. The
run's model is its newest good step checkpoint, or ``checkpoints/best`` when final.json names it. ``load_run`` also
accepts one ``checkpoints/…`` directory (a step, or best) to load exactly that one.

An image tokenizer run (``tokenizer train --out``) has the same ``checkpoints/`` and ``.lock`` and its latest weights
at the top level.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from earlyfusion.core.checkpoint import (
    MANIFEST,
    CheckpointError,
    copy_dir,
    latest_good,
    load_json,
    manifest_files,
    save_json,
    save_weights,
    stream_safetensors,
    verify_dir,
)
from earlyfusion.core.errors import UserError

VOCAB_DIR = "vocab"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"  # a LoRA run's checkpoints: the adapters alone (config.json names the base)
LORA = "lora"  # key of a LoRA checkpoint's config.json: the adapters' shape and the base checkpoint they adapt
CONFIG = "config.json"
IMPORTED_DIR = "imported"
PERMUTATION = "permutation.json"
BEST_DIR = "best"  # under CHECKPOINTS_DIR
FINAL = "final.json"
LOCK = ".lock"
METRICS = "metrics.jsonl"
SAMPLES_DIR = "samples"
LOSS_CURVES = "loss_curves.png"
IMAGE_GRIDS = "image_grids"  # key of a checkpoint's config.json: the code grids [rows, columns] the run trained on
QUESTION_FIRST = "question_first"  # key of a checkpoint's config.json: whether the conversations trained on put
# a question's pictures after its text (absent: the run records no order, and a question is written text first)

def write_decoder(directory: Path, decoder: torch.nn.Module, config: dict) -> None:
    """Write decoder weights + config (config must hold the decoder shape under "decoder")."""
    save_weights(directory / WEIGHTS, decoder.state_dict())
    save_json(directory / CONFIG, config)


def write_adapters(directory: Path, adapters: dict[str, torch.Tensor], config: dict) -> None:
    """Write a LoRA run's checkpoint: its adapters alone + config (which names the base checkpoint under "lora")."""
    save_weights(directory / ADAPTERS, adapters)
    save_json(directory / CONFIG, config)


def write_decoder_stream(directory: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                         tensors: Iterable[tuple[str, torch.Tensor]], config: dict) -> None:
    """``write_decoder`` for weights that arrive one tensor at a time (a conversion): see ``stream_safetensors``."""
    stream_safetensors(directory / WEIGHTS, specs, tensors)
    save_json(directory / CONFIG, config)


def set_final(root: Path, checkpoint: str | None) -> None:
    """Make ``root/checkpoints/<checkpoint>`` (``BEST_DIR``) the run's model, or (None) its newest step checkpoint."""
    marker = Path(root) / FINAL
    if checkpoint is None:
        marker.unlink(missing_ok=True)
    else:
        save_json(marker, {"checkpoint": checkpoint})


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run root, checkpoint dir) for an LMRUN directory (its final model) or one of its checkpoints/ directories."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory; pass the --out directory of `earlyfusion train`")
    if (((path / WEIGHTS).is_file() or (path / ADAPTERS).is_file()) and (path / MANIFEST).is_file()
            and path.parent.name == CHECKPOINTS_DIR):
        verify_dir(path)
        return path.parent.parent, path
    if (path / FINAL).is_file():
        final = load_json(path / FINAL)
        name = final.get("checkpoint") if isinstance(final, dict) else None
        if name != BEST_DIR:
            raise CheckpointError(f"{path / FINAL}: names {name!r}, not {BEST_DIR!r}; delete the file to load the newest "
                                  "step checkpoint")
        ckpt = path / CHECKPOINTS_DIR / name
        try:
            verify_dir(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"the final model of {path} is {ckpt} ({FINAL}), but {e}; load a step with "
                                  f"{path / CHECKPOINTS_DIR}/step-..., or delete {path / FINAL} for the newest one") from None
        return path, ckpt
    ckpt = latest_good(path / CHECKPOINTS_DIR)
    if ckpt is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint under {path / CHECKPOINTS_DIR}; "
            "is training still at its first steps, or is this not a run directory of `earlyfusion train`?"
        )
    return path, ckpt


@contextmanager
def run_lock(out: str | Path, what: str) -> Iterator[None]:
    """Hold ``out/.lock`` for the whole command: a second writer into the same run directory is refused with one line
    naming the holder. The lock is the kernel's (flock), so a holder that died — killed, crashed — leaves nothing
    to clean up: the next command takes the lock over. A directory made here for the lock that holds nothing else
    when the command ends (it failed before writing anything) is removed again."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{out} is in use by {holder}; wait for it to finish, or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({what}: {' '.join(sys.argv[1:])[:300]})\n".encode(), 0)
        yield
    finally:
        try:
            if made and [p.name for p in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()  # while still held: no other command can have taken it
                out.rmdir()
        except OSError:
            pass  # removed or changed under us: nothing of ours to tidy
        os.close(fd)  # closing releases the flock


def check_fresh(out: str | Path, resume: bool) -> None:
    """Refuse to start a new run in a directory that holds anything of another run (whatever of it survives:
    checkpoints, a best model, copies of its vocabulary, metrics) unless ``--resume`` continues it."""
    out = Path(out)
    if resume or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError(f"{out} already holds a run ({shown}); pass --resume to continue it, or choose another --out")


def check_same_files(src: Path, dest: Path, what: str, fix: str,
                     files: tuple[str, ...] = ("layout.json", "config.json")) -> None:
    """UserError unless the vocabulary / image tokenizer directory ``src`` describes the same one as ``dest``."""
    for fname in files:
        if (src / fname).is_file() and load_json(src / fname) != load_json(dest / fname):
            raise UserError(f"{dest / fname} differs from {src / fname}: {what}; {fix}")


def verify_manifest(directory: Path, required: tuple[str, ...], fix: str) -> None:
    """Check ``directory`` against its MANIFEST.json, which must exist and list each file of ``required``:
    CheckpointError naming the first file that is missing, changed or unlisted (or the manifest itself), with
    ``fix`` (what to do about it) appended. A directory without a manifest is refused: its files could have been
    changed in any way and nothing would tell."""
    manifest = Path(directory) / MANIFEST
    try:
        if not manifest.is_file():
            raise CheckpointError(f"{manifest}: not found, so the files of {directory} cannot be checked")
        files = manifest_files(directory)
        for name in required:
            if name not in files:
                raise CheckpointError(f"{directory / name}: not listed in {manifest}, so it cannot be checked")
        verify_dir(directory)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {fix}") from None


# what each copy in a run must hold (the files its readers trust), and what it is called in messages
_COPIES = {VOCAB_DIR: ("vocabulary", ("tokenizer.json", "layout.json")),
           IMAGE_TOKENIZER_DIR: ("image tokenizer", (CONFIG, WEIGHTS))}


def prepare_run_dir(out: Path, copies: dict[str, Path]) -> None:
    """Copy each source directory into ``out/<name>`` (``copies``: name -> source; the vocabulary and the image
    tokenizer), or, where the copy exists (``--resume``), check it against its manifest (the run's sampling and
    evaluation read the copy, not the source) and that it describes the same one."""
    out.mkdir(parents=True, exist_ok=True)
    for name, src in copies.items():
        dest = out / name
        if dest.is_dir():
            kind, required = _COPIES.get(name, (name, ()))
            verify_manifest(dest, required, f"the run's copy of its {kind} is damaged; resume a good copy of the "
                                            "run, or start a new --out")
            check_same_files(src, dest, f"{out} was trained with another {kind}", "use a new --out")
        else:
            copy_dir(src, dest)
