"""The trained-decoder run directory (LMRUN): its layout, and loading it for sampling and evaluation.

    LMRUN/
      vocab/                     copy of the merged vocabulary (tokenizer.json + layout.json)
      image_tokenizer/           copy of the VQ-VAE run it was trained with (config.json + model.safetensors)
      checkpoints/step-XXXXXXXX/ model.safetensors + config.json (+ state.* for --resume), MANIFEST.json
      metrics.jsonl, samples/, loss_curves.png
      imported/                  runs made by `earlyfusion import`: the permutation between our ids and the
                                 source's (permutation.json) and the source's tokenizer and config files

A run is self-contained: ``load_run(LMRUN)`` needs nothing outside it. ``load_run`` also accepts one
``checkpoints/step-…`` directory to load that exact step.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.checkpoint import (MANIFEST, CheckpointError, latest_good, load_json, load_weights, save_json, save_weights,
                                    verify_dir)
from earlyfusion.tokenizer.vocab import Vocabulary, check_vocab_matches  # check_vocab_matches: re-exported for the trainer
from earlyfusion.tokenizer.vqvae import VQVAE, load_vqvae

VOCAB_DIR = "vocab"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
IMPORTED_DIR = "imported"
PERMUTATION = "permutation.json"

# torch dtype <-> the dtype names in a safetensors header
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


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


def safetensors_specs(path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, read from its header (no data loaded);
    CheckpointError naming the file when it is truncated or not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (_TORCH_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({' '.join(str(e).split())}); "
                              "the file is truncated or corrupted") from e


def stream_safetensors(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (``specs``: name -> (dtype, shape)) arrive one at a time, in any
    order: the header is laid out first, each tensor is written at its place as it comes and can then be freed,
    so a conversion never holds more than the tensors in flight. Temp file + fsync + rename, as ``save_weights``."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    path = Path(path)
    header, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    written: set[str] = set()
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(start + offset)
            for name, t in tensors:
                if name not in specs or name in written:
                    raise ValueError(f"{path}: tensor {name!r} is {'written twice' if name in written else 'not planned'}")
                dtype, shape = specs[name]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
                f.seek(start + header[name]["data_offsets"][0])
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
                written.add(name)
            if written != set(specs):
                missing = sorted(set(specs) - written)
                raise ValueError(f"{path}: {len(missing)} planned tensor(s) never came (e.g. {missing[:3]})")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run root, checkpoint dir) for an LMRUN directory or one of its step directories."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory; pass the --out directory of `earlyfusion train`")
    if (path / WEIGHTS).is_file() and (path / MANIFEST).is_file() and path.parent.name == CHECKPOINTS_DIR:
        verify_dir(path)
        return path.parent.parent, path
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
