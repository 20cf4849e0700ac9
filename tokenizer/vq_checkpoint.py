"""The image tokenizer's checkpoint directory: ``config.json`` (the config's fields at top level, with "format" naming
the architecture and "grid" the code grid) + ``model.safetensors`` + ``MANIFEST.json`` (their sizes and sha256).

Every reader verifies the two files against the manifest before trusting them (a failure names the run's newest good
step checkpoint, which can be passed instead), and ``load_vqvae`` checks keys and shapes strictly. The "format" picks
the architecture: ``earlyfusion.vqvae`` (``earlyfusion.tokenizer.vqvae``) or ``earlyfusion.chameleon_vqgan``
(Chameleon's VQGAN, ``earlyfusion.tokenizer.vqgan``); ``read_vq_config``, ``load_vqvae`` and ``vq_fingerprint`` read
either.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from earlyfusion.core.checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_good,
    load_json,
    load_weights,
    manifest_files,
    save_json,
    save_weights,
    sha256_file,
    verify_file,
    write_manifest,
)
from earlyfusion.core.rundir import CHECKPOINTS_DIR, CONFIG, WEIGHTS
from earlyfusion.tokenizer.vq_config import VQConfig
from earlyfusion.tokenizer.vqgan import FORMAT as VQGAN_FORMAT
from earlyfusion.tokenizer.vqgan import ChameleonVQGAN, VQGANConfig
from earlyfusion.tokenizer.vqvae import FORMAT, VQVAE

ARCHITECTURES: dict[str, tuple[type, type]] = {FORMAT: (VQConfig, VQVAE), VQGAN_FORMAT: (VQGANConfig, ChameleonVQGAN)}
"""The config's "format" -> (config class, model class) of each image tokenizer architecture."""


def save_vqvae(model: VQVAE, directory: str | Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors``, ``config.json`` and their ``MANIFEST.json`` (each atomically) into ``directory``.

    ``extra`` (e.g. the training step) is stored under the key "training" and ignored on load.
    """
    directory = Path(directory)
    save_weights(directory / WEIGHTS, model.state_dict())
    h, w = model.cfg.grid_size
    config = {**model.cfg.to_dict(), "format": getattr(model, "FORMAT", FORMAT), "grid": [h, w]}
    if extra:
        config["training"] = extra
    save_json(directory / CONFIG, config)
    write_manifest(directory, [WEIGHTS, CONFIG])


def _resolve(directory: str | Path) -> Path:
    """The verified directory to read an image tokenizer from: ``directory`` itself (a run's top level or one of its
    step checkpoints), or the newest good step checkpoint under it when it has no files of its own."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: image tokenizer directory not found; pass the --out directory of `earlyfusion tokenizer train`")
    if (directory / CONFIG).is_file():
        try:
            _verify_against_manifest(directory)
        except CheckpointError as e:
            ckpt = latest_good(directory / CHECKPOINTS_DIR)
            hint = f"; its newest good step checkpoint is {ckpt}: pass that directory instead" if ckpt else ""
            raise CheckpointError(f"{e}{hint}") from None
        return directory
    ckpt = latest_good(directory / CHECKPOINTS_DIR)
    if ckpt is not None:
        return ckpt
    raise CheckpointError(f"{directory / CONFIG}: file not found; is {directory} an image tokenizer run directory?")


def _verify_against_manifest(directory: Path) -> None:
    """If the directory carries a MANIFEST.json (step checkpoints, copies), check the two files we load."""
    if not (directory / MANIFEST).is_file():
        return
    files = manifest_files(directory)
    for name in (CONFIG, WEIGHTS):
        if name not in files:
            continue
        try:
            verify_file(directory, name, files[name])
        except CheckpointError as e:
            raise CheckpointError(f"{e}: changed since it was saved; {CONFIG} and {WEIGHTS} must stay as "
                                  "`tokenizer train` wrote them") from None


def read_vq_config(directory: str | Path) -> VQConfig | VQGANConfig:
    """The config stored in ``directory/config.json`` (its class chosen by "format"); CheckpointError naming the file if invalid."""
    path = _resolve(directory) / CONFIG
    raw = load_json(path)
    fmt = raw.get("format", FORMAT) if isinstance(raw, dict) else None
    if fmt is None or (fmt == FORMAT and "codebook_size" not in raw):
        raise CheckpointError(f"{path}: not an image tokenizer config (no 'codebook_size'); is this an `earlyfusion tokenizer train` run?")
    kinds = ARCHITECTURES
    if fmt not in kinds:
        raise CheckpointError(f"{path}: format {fmt!r} is not one of {sorted(kinds)}")
    d = {k: v for k, v in raw.items() if k not in ("format", "grid", "training")}
    try:
        cfg = kinds[fmt][0].from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid image tokenizer config: {e}") from e
    if "grid" in raw and list(raw["grid"]) != list(cfg.grid_size):
        raise CheckpointError(f"{path}: 'grid' {raw['grid']} disagrees with image_size/downsample ({list(cfg.grid_size)})")
    return cfg


def load_vqvae(directory: str | Path) -> VQVAE | ChameleonVQGAN:
    """Build the model from ``config.json`` and load ``model.safetensors`` with strict key/shape checks.

    Accepts a run directory (top-level files) or a ``checkpoints/step-*`` directory.
    """
    directory = _resolve(directory)
    cfg = read_vq_config(directory)
    model = {config_cls: model_cls for config_cls, model_cls in ARCHITECTURES.values()}[type(cfg)](cfg)
    try:
        load_weights(directory / WEIGHTS, model)
    except CheckpointError as e:
        if (directory / WEIGHTS).is_file() and "do not match" in str(e):
            raise CheckpointError(f"{directory / CONFIG} does not describe the weights beside it: {e}") from e
        raise
    return model.eval()


def vq_fingerprint(directory: str | Path) -> str:
    """sha256 over the config (canonical JSON, training notes excluded) and the weights file."""
    directory = _resolve(directory)
    raw = load_json(directory / CONFIG)
    raw = {k: v for k, v in raw.items() if k != "training"}
    h = hashlib.sha256()
    h.update(json.dumps(raw, sort_keys=True).encode())
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file not found")
    h.update(sha256_file(weights).encode())
    return h.hexdigest()
