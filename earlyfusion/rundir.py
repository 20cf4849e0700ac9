"""The trained-decoder run directory (LMRUN): its layout, and loading it for sampling and evaluation.

    LMRUN/
      vocab/                     copy of the merged vocabulary (tokenizer.json + layout.json)
      image_tokenizer/           copy of the VQ-VAE run it was trained with (config.json + model.safetensors)
      checkpoints/step-XXXXXXXX/ model.safetensors + config.json (+ state.* for --resume), MANIFEST.json; with a
                                 grid-token vocabulary config.json lists the code grids trained on (``trained_grids``)
      checkpoints/best/          the weights with the lowest held-out loss so far (never pruned)
      final.json                 {"checkpoint": "best"} when the run's model is checkpoints/best (`train --final best`)
      metrics.jsonl, samples/, loss_curves.png
      imported/                  runs made by `earlyfusion import`: the permutation between our ids and the
                                 source's (permutation.json) and the source's tokenizer and config files

A run is self-contained: ``load_run(LMRUN)`` needs nothing outside it. The run's model is its newest
good step checkpoint, or ``checkpoints/best`` when final.json names it. ``load_run`` also accepts one
``checkpoints/…`` directory (a step, or best) to load exactly that one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.checkpoint import (MANIFEST, CheckpointError, latest_good, load_json, load_weights, safetensors_specs,
                                    save_json, save_weights, stream_safetensors, verify_dir)
from earlyfusion.tokenizer.vocab import Vocabulary, check_vocab_matches  # check_vocab_matches: re-exported for the trainer
from earlyfusion.tokenizer.vqvae import VQVAE, load_vqvae

VOCAB_DIR = "vocab"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
IMPORTED_DIR = "imported"
PERMUTATION = "permutation.json"
BEST_DIR = "best"  # under CHECKPOINTS_DIR
FINAL = "final.json"
IMAGE_GRIDS = "image_grids"  # key of a checkpoint's config.json: the code grids [rows, columns] the run trained on

@dataclass
class Run:
    decoder: Decoder
    vocab: Vocabulary
    vq: VQVAE
    config: dict
    """Everything in the checkpoint's config.json (decoder shape, training options, step)."""
    path: Path
    """The checkpoint directory that was loaded."""


def write_decoder(directory: Path, decoder: Decoder, config: dict) -> None:
    """Write decoder weights + config (config must hold the decoder shape under "decoder")."""
    save_weights(directory / WEIGHTS, decoder.state_dict())
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
    if (path / WEIGHTS).is_file() and (path / MANIFEST).is_file() and path.parent.name == CHECKPOINTS_DIR:
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


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    root, ckpt = resolve_checkpoint(path)
    for sub in (VOCAB_DIR, IMAGE_TOKENIZER_DIR):
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root / sub}: missing; the run directory is incomplete (copy the whole run directory)")
    vocab = Vocabulary.load(root / VOCAB_DIR)
    vq = load_vqvae(root / IMAGE_TOKENIZER_DIR).to(device).eval()
    check_vocab_matches(vocab, root / IMAGE_TOKENIZER_DIR, str(root))
    config = load_json(ckpt / CONFIG)
    dcfg = DecoderConfig.from_dict(config["decoder"])
    if dcfg.vocab_size != vocab.vocab_size:
        raise CheckpointError(
            f"{ckpt / CONFIG}: decoder vocab_size {dcfg.vocab_size} != {vocab.vocab_size} in {root / VOCAB_DIR}; "
            "the run's vocabulary was replaced"
        )
    decoder = _build_in_file_dtype(dcfg, ckpt / WEIGHTS)
    load_weights(ckpt / WEIGHTS, decoder)
    decoder.to(device).eval()
    return Run(decoder=decoder, vocab=vocab, vq=vq, config=config, path=ckpt)


def trained_grids(run: Run) -> list[tuple[int, int]]:
    """The code grids (rows, columns) of the images the run was trained on, sorted; empty when the run records none
    (a fixed-grid vocabulary, whose every image is ``run.vocab.grid``, or a run written before grids were recorded).
    CheckpointError when the record is not a list of grids the run's vocabulary can hold."""
    raw = run.config.get(IMAGE_GRIDS)
    if raw is None:
        return []
    try:
        grids = sorted({run.vocab.check_grid(g) for g in raw})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{run.path / CONFIG}: {IMAGE_GRIDS} {raw!r} is not a list of code grids of its "
                              f"vocabulary ({e}); the file was altered, train the run again") from None
    return grids


def _build_in_file_dtype(dcfg: DecoderConfig, weights: Path) -> Decoder:
    """A decoder whose parameters have the dtype of the file's embedding (bf16 stays bf16: half the memory of
    fp32, and what an imported checkpoint was published in); fp32 when the file cannot be read here (load_weights
    then names the problem)."""
    dtype = torch.float32
    if weights.is_file():
        try:
            dtype = safetensors_specs(weights).get("tok_emb.weight", (torch.float32,))[0]
        except CheckpointError:
            pass
    if not dtype.is_floating_point:
        dtype = torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the file's dtype: never a full fp32 copy first
    try:
        decoder = Decoder(dcfg)
    finally:
        torch.set_default_dtype(previous)
    return decoder.to(dtype)  # the RoPE table too, as Module.to(dtype) would give it
