"""Loading a trained decoder run (LMRUN, laid out as ``earlyfusion.core.rundir`` describes) for sampling,
evaluation and ``train --init-from``: the decoder, the run's vocabulary and its image tokenizer, checked against
each other. Decoder weights are read through ``load_decoder_weights``, which converts checkpoints written before
the projections took nn.Linear's layout (``earlyfusion.model.upgrade``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from earlyfusion.core.checkpoint import (
    CheckpointError,
    load_json,
    load_weights,
    read_weights,
    safetensors_specs,
    weights_fingerprint,
)
from earlyfusion.core.rundir import (
    ADAPTERS,
    CONFIG,
    IMAGE_GRIDS,
    IMAGE_TOKENIZER_DIR,
    LORA,
    QUESTION_FIRST,
    VOCAB_DIR,
    WEIGHTS,
    resolve_checkpoint,
)
from earlyfusion.model.decoder import WEIGHT_LAYOUT, Decoder, DecoderConfig
from earlyfusion.model.lora import LoraSpec, add_adapters, load_adapters, merge_adapters
from earlyfusion.model.upgrade import upgrade_state_dict, weight_layout
from earlyfusion.tokenizer.vocab import Vocabulary, check_vocab_matches
from earlyfusion.tokenizer.vq_checkpoint import ARCHITECTURES, load_vqvae
from earlyfusion.tokenizer.vqvae import VQVAE


@dataclass
class Run:
    decoder: Decoder
    vocab: Vocabulary
    vq: VQVAE
    config: dict
    """Everything in the checkpoint's config.json (decoder shape, training options, step)."""
    path: Path
    """The checkpoint directory that was loaded."""


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    root, ckpt = resolve_checkpoint(path)
    config = decoder_run_config(path, root, ckpt)
    vocab = Vocabulary.load(root / VOCAB_DIR)
    vq = load_vqvae(root / IMAGE_TOKENIZER_DIR).to(device).eval()
    check_vocab_matches(vocab, root / IMAGE_TOKENIZER_DIR, str(root))
    dcfg = DecoderConfig.from_dict(config["decoder"])
    if dcfg.vocab_size != vocab.vocab_size:
        raise CheckpointError(
            f"{ckpt / CONFIG}: decoder vocab_size {dcfg.vocab_size} != {vocab.vocab_size} in {root / VOCAB_DIR}; "
            "the run's vocabulary was replaced"
        )
    lora = config.get(LORA)
    weights = lora_base(ckpt, lora) / WEIGHTS if isinstance(lora, dict) else ckpt / WEIGHTS
    decoder = _build_in_file_dtype(dcfg, weights)
    load_decoder_weights(ckpt, decoder, config)
    decoder.to(device).eval()
    return Run(decoder=decoder, vocab=vocab, vq=vq, config=config, path=ckpt)


def decoder_run_config(path: str | Path, root: Path, ckpt: Path) -> dict:
    """The config.json of the checkpoint ``ckpt`` of the run ``root`` (``resolve_checkpoint`` of ``path``), once it
    is known to be a decoder's and the run to hold its vocabulary and image tokenizer. An image tokenizer run has
    checkpoints/ too and resolves like a decoder run: it is named as what it is, not met as a missing key."""
    config = load_json(ckpt / CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("decoder"), dict):
        if isinstance(config, dict) and (str(config.get("format")) in ARCHITECTURES or "codebook_size" in config):
            raise CheckpointError(f"{path}: an image tokenizer (from `earlyfusion tokenizer train`), not a decoder run; "
                                  "pass the --out directory of `earlyfusion train` or `earlyfusion import chameleon`")
        raise CheckpointError(f"{ckpt / CONFIG}: no decoder config; {path} is not a decoder run of `earlyfusion train` "
                              "or `earlyfusion import chameleon`")
    for sub in (VOCAB_DIR, IMAGE_TOKENIZER_DIR):
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root / sub}: missing; the run directory is incomplete (copy the whole run directory)")
    return config


def load_decoder_weights(ckpt: Path, decoder: torch.nn.Module, config: dict | None = None) -> None:
    """Load the weights of the checkpoint directory ``ckpt`` into ``decoder`` (strict names and shapes; the file's
    dtype converted to the decoder's). ``config``: the checkpoint's config.json, when already read.

    Weights in the current layout stream in one tensor at a time; a checkpoint written before its decoder config
    recorded ``weight_layout`` is read whole and converted with ``upgrade_state_dict`` (its projections were
    stored transposed), holding the file's tensors beside the decoder's while it loads."""
    config = load_json(ckpt / CONFIG) if config is None else config
    decoder_config = config.get("decoder") if isinstance(config, dict) else None
    if not isinstance(decoder_config, dict):
        raise CheckpointError(f"{ckpt / CONFIG}: no decoder config; the file is not a decoder checkpoint's")
    if isinstance(config.get(LORA), dict):
        load_lora_merged(ckpt, decoder, config[LORA])
        return
    if weight_layout(decoder_config) == WEIGHT_LAYOUT:
        load_weights(ckpt / WEIGHTS, decoder)
        return
    state = upgrade_state_dict(read_weights(ckpt / WEIGHTS), decoder_config)
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt / WEIGHTS}: weights do not match the model built from the config beside it "
                              f"({' '.join(str(e).split())[:300]}). Was config.json edited, or the file copied from "
                              "another run?") from None


def lora_base(ckpt: Path, lora: dict) -> Path:
    """The base checkpoint a LoRA checkpoint adapts (its config's "lora" entry names it), checked unchanged."""
    base = Path(str(lora.get("base", "")))
    if not (base / CONFIG).is_file():
        raise CheckpointError(f"{ckpt / CONFIG}: its LoRA adapters adapt {base}, which is not there any more; put the "
                              "base run back where it was trained from, or export the LoRA run while it is")
    if weights_fingerprint(base, WEIGHTS) != lora.get("base_weights"):
        raise CheckpointError(f"{base / WEIGHTS}: changed since the LoRA run {ckpt} was trained on it; its adapters "
                              "belong to the weights it had then")
    return base


def load_lora_merged(ckpt: Path, decoder: torch.nn.Module, lora: dict) -> None:
    """The base checkpoint's weights with a LoRA checkpoint's adapters folded in (``merge_adapters``): a plain
    decoder again, whatever the adapters were trained on."""
    load_decoder_weights(lora_base(ckpt, lora), decoder)
    try:
        spec = LoraSpec.from_dict(lora)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / CONFIG}: its \"lora\" entry is not a LoRA shape ({e})") from None
    dtype = next(decoder.parameters()).dtype
    add_adapters(decoder, spec)
    try:
        load_adapters(decoder, read_weights(ckpt / ADAPTERS))
    except ValueError as e:
        raise CheckpointError(f"{ckpt / ADAPTERS}: {e}; the file does not belong to the config beside it") from None
    merge_adapters(decoder).to(dtype)


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


def question_first(run: Run) -> bool:
    """Whether a question to the run puts its pictures after its text: the order of the conversations it was trained
    on (``QUESTION_FIRST``), else question first, as Chameleon's prompts and the built-in conversations write it."""
    raw = run.config.get(QUESTION_FIRST, True)
    if not isinstance(raw, bool):
        raise CheckpointError(f"{run.path / CONFIG}: {QUESTION_FIRST} {raw!r} is not true or false; the file was altered, "
                              "train the run again")
    return raw


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
