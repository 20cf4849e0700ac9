"""``earlyfusion import chameleon`` and ``earlyfusion export``: Chameleon / Anole checkpoints in and out.

Import reads a checkpoint in transformers' format (``config.json``, ``tokenizer.json``, ``model.safetensors``
or shards listed in ``model.safetensors.index.json``) and Meta's VQGAN (``vqgan.yaml`` + ``vqgan.ckpt``), and
writes an ordinary run directory (see ``earlyfusion.core.rundir``) that ``sample``, ``eval`` and ``train
--init-from`` use as they use a trained run:

    RUN/vocab/                        their vocabulary in our id order (earlyfusion.tokenizer.chameleon_vocab)
    RUN/image_tokenizer/              their VQGAN (earlyfusion.tokenizer.vqgan)
    RUN/checkpoints/step-00000000/    the decoder: model.safetensors in the file's dtype, config.json, MANIFEST.json
    RUN/imported/                     permutation.json (our id -> theirs) and their tokenizer/config files

The weights are converted one shard and one tensor at a time and written straight to their place in the
output file, so memory holds about one shard, never the whole model twice. The rows of the embedding and
the columns of the output layer are reordered with the vocabulary permutation. transformers' masking of
image-code logits is a forward-time rule, not in the weights; our sampler decides itself when codes may come.

Export writes transformers' format back (the inverse permutation applied for an imported run; their
tokenizer.json and the VQGAN's encoder as ``model.vqmodel.*`` when the run has them), so that export ->
import gives the same logits. Both commands build their output under a temporary directory beside
``--out`` and rename it at the end: an error leaves no ``--out`` behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from earlyfusion.core.checkpoint import (
    MANIFEST,
    atomic_dir,
    load_json,
    safetensors_specs,
    save_json,
    step_dir,
    stream_safetensors,
    verify_dir,
)
from earlyfusion.core.errors import CheckpointError, UserError
from earlyfusion.core.logs import log
from earlyfusion.core.rundir import (
    CHECKPOINTS_DIR,
    CONFIG,
    IMAGE_TOKENIZER_DIR,
    IMPORTED_DIR,
    LORA,
    PERMUTATION,
    VOCAB_DIR,
    WEIGHTS,
    resolve_checkpoint,
    write_decoder_stream,
)
from earlyfusion.model.chameleon_hf import (
    PLACEHOLDER_VQ_CONFIG,
    VQ_PREFIX,
    from_hf_config,
    from_hf_state_dict,
    iter_from_hf,
    iter_to_hf,
    placeholder_vq_state,
    reorder_vocab,
    to_hf_config,
)
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.model.upgrade import upgrade_state_dict
from earlyfusion.tokenizer.chameleon_vocab import invert_permutation, read_chameleon_vocab
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vocab_layout import HF_CONFIG_FILE, TOKENIZER_FILE
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, vq_fingerprint
from earlyfusion.tokenizer.vqgan import FORMAT as VQGAN_FORMAT
from earlyfusion.tokenizer.vqgan_import import convert_vqgan
from earlyfusion.training.data.runs import decoder_run_config, load_run

INDEX = "model.safetensors.index.json"
# the source's small files kept in RUN/imported/ and written back by export (config.json is rewritten)
SOURCE_FILES = (TOKENIZER_FILE, "config.json", HF_CONFIG_FILE, "special_tokens_map.json", "generation_config.json",
                "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _check_new_out(out: str, flag: str = "--out") -> None:
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ValueError(f"{flag} {out}: exists and is not an empty directory; give a new directory")


# Chameleon's published sampling settings (its inference code's defaults), used by `sample` on an imported run for the
# options the user does not give. Its text repetition penalty (1.2) has no counterpart in our sampler, and its two
# guidance scales (text 3.0, image 1.2 over three rows) map onto our one conditional/unconditional scale as 3.0.
CHAMELEON_SAMPLING = {"temperature": 0.7, "top_k": 0, "top_p": 0.9, "image_temperature": 0.7, "image_top_k": 0,
                      "image_top_p": 0.9, "cfg": 3.0}


@dataclass
class ImportChameleonConfig:
    model: str
    """Directory of a Chameleon or Anole checkpoint in transformers' format: config.json, tokenizer.json and
    model.safetensors (or shards listed in model.safetensors.index.json)."""
    vqgan: str
    """Directory of Meta's image tokenizer: vqgan.yaml and vqgan.ckpt (tokenizer/ in the Chameleon download)."""
    out: str
    """Run directory to create (new or empty); sample, eval and train --init-from take it as a trained run."""

    def __post_init__(self):
        for flag, value in (("--model", self.model), ("--vqgan", self.vqgan), ("--out", self.out)):
            if not value:
                raise ValueError(f"{flag} must not be empty")
        _check_new_out(self.out)


@dataclass
class ExportConfig:
    checkpoint: str
    """Run directory (its newest good checkpoint) or one checkpoints/step-* directory to export."""
    out: str
    """Directory to create (new or empty) in transformers' format: config.json, model.safetensors, tokenizer.json."""

    def __post_init__(self):
        for flag, value in (("--checkpoint", self.checkpoint), ("--out", self.out)):
            if not value:
                raise ValueError(f"{flag} must not be empty")
        _check_new_out(self.out)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` on success and removed on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked before); a non-empty one raises instead of being replaced
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- reading the source checkpoint


def _hf_config(src: Path):
    """transformers' ChameleonConfig of ``src/config.json`` (UserError when it is not a Chameleon config)."""
    path = src / "config.json"
    if not src.is_dir():
        raise UserError(f"--model {src}: directory not found")
    if not path.is_file():
        raise UserError(f"--model {src}: no config.json; pass a Chameleon checkpoint directory in transformers' format")
    raw = load_json(path)
    if not isinstance(raw, dict) or raw.get("model_type") != "chameleon":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(f"{path}: model_type is {kind!r}, not 'chameleon'; pass a Chameleon or Anole checkpoint")
    try:
        from transformers import ChameleonConfig
    except ImportError as e:
        raise UserError("importing a Chameleon checkpoint needs transformers >= 5 (pip install 'transformers>=5')") from e
    try:
        return ChameleonConfig.from_pretrained(str(src))
    except Exception as e:  # transformers' validation errors have many types
        raise UserError(f"{path}: not a usable Chameleon config ({' '.join(str(e).split())[:300]})") from e


def _weight_files(src: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the shards of the index, or the single model.safetensors."""
    if (src / INDEX).is_file():
        index = load_json(src / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{src / INDEX}: no weight_map; the index is corrupted")
        files = [src / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: listed in {INDEX} but missing; the download is incomplete")
        return files
    if (src / WEIGHTS).is_file():
        return [src / WEIGHTS]
    raise UserError(f"--model {src}: neither {WEIGHTS} nor {INDEX}; pass a Chameleon checkpoint in safetensors format")


def _meta(specs: Specs) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in specs.items()}


def _plan_import(files: list[Path], dcfg: DecoderConfig) -> Specs:
    """Our tensors' (dtype, shape), from the shards' headers (nothing loaded), checked against the config's shape."""
    theirs: Specs = {}
    for f in files:
        theirs.update(safetensors_specs(f))
    try:
        ours = from_hf_state_dict(_meta(theirs), tie_embeddings=dcfg.tie_embeddings)
    except KeyError as e:
        raise UserError(f"{files[0].parent}: not a Chameleon decoder: {e.args[0]}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Decoder(dcfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                  f"{wrong[0]} is {got[wrong[0]]}, the config says {expected[wrong[0]]}")
        raise UserError(f"{files[0].parent}: the weights do not match config.json ({detail})")
    return {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()}


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every shard, one shard open at a time."""
    for n, f in enumerate(files, 1):
        if len(files) > 1:
            log.info(f"converting {f.name} ({n}/{len(files)})")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot be read ({' '.join(str(e).split())}); the file is truncated or corrupted") from e


# ---------------------------------------------------------------- import


def import_chameleon(cfg: ImportChameleonConfig) -> Path:

    src, out = Path(cfg.model), Path(cfg.out)
    hf_config = _hf_config(src)
    try:
        dcfg = from_hf_config(hf_config)
    except ValueError as e:
        raise UserError(f"{src / 'config.json'}: {e}") from None
    files = _weight_files(src)
    vocab_map = read_chameleon_vocab(src)
    if vocab_map.vocab_size != dcfg.vocab_size:
        raise UserError(f"{src}: tokenizer.json has {vocab_map.vocab_size} tokens but config.json a vocab_size of "
                        f"{dcfg.vocab_size}; they must come from the same checkpoint")
    specs = _plan_import(files, dcfg)
    _check_new_out(cfg.out)  # again: it may have appeared since the options were read
    with _staging(out) as tmp:
        log.info(f"converting the VQGAN from {cfg.vqgan}")
        convert_vqgan(Path(cfg.vqgan), tmp / IMAGE_TOKENIZER_DIR)
        vq_cfg = read_vq_config(tmp / IMAGE_TOKENIZER_DIR)
        if vq_cfg.codebook_size != vocab_map.codebook_size:
            raise UserError(f"--vqgan {cfg.vqgan}: its codebook has {vq_cfg.codebook_size} codes but {src / TOKENIZER_FILE} "
                            f"{vocab_map.codebook_size} IMGIMG tokens; pass the VQGAN released with this checkpoint")
        vocab = vocab_map.vocabulary(vq_cfg.grid_size, vq_fingerprint(tmp / IMAGE_TOKENIZER_DIR))
        vocab.save(tmp / VOCAB_DIR)
        with atomic_dir(tmp / IMPORTED_DIR) as d:
            save_json(d / PERMUTATION, {"ours_to_theirs": vocab_map.ours_to_theirs})
            for name in SOURCE_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, d / name)
        order = torch.tensor(vocab_map.ours_to_theirs, dtype=torch.long)
        tensors = ((k, reorder_vocab(k, t, order))
                   for k, t in iter_from_hf(_read_tensors(files), tie_embeddings=dcfg.tie_embeddings))
        config = {"decoder": dcfg.to_dict(), "step": 0, "sampling_defaults": CHAMELEON_SAMPLING,
                  "imported_from": {"model": str(src.resolve()), "vqgan": str(Path(cfg.vqgan).resolve())}}
        log.info(f"converting the decoder ({len(files)} file(s)) from {src}")
        with atomic_dir(step_dir(tmp / CHECKPOINTS_DIR, 0)) as ckpt:
            write_decoder_stream(ckpt, specs, tensors, config)
    log.info(f"wrote {out}: {vocab} ; sample with `earlyfusion sample --checkpoint {out}`")
    return out


def import_cmd(cfg: ImportChameleonConfig) -> int:
    import_chameleon(cfg)
    return 0


# ---------------------------------------------------------------- export


def _vq_export(root: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(vq_config, model.vqmodel.* tensors): the run's own VQGAN encoder when it is Chameleon's, else a placeholder."""

    vq_dir = root / IMAGE_TOKENIZER_DIR
    raw = load_json(vq_dir / CONFIG) if (vq_dir / CONFIG).is_file() else {}
    if isinstance(raw, dict) and raw.get("format") != VQGAN_FORMAT:
        return dict(PLACEHOLDER_VQ_CONFIG), placeholder_vq_state()
    c = read_vq_config(vq_dir)  # refuses a config.json that is not an object, naming it
    vq_config = dict(embed_dim=c.embed_dim, num_embeddings=c.n_embed, double_latent=c.double_z, latent_channels=c.z_channels,
                     resolution=c.resolution, in_channels=c.in_channels, base_channels=c.ch, channel_multiplier=list(c.ch_mult),
                     num_res_blocks=c.num_res_blocks, attn_resolutions=list(c.attn_resolutions), dropout=c.dropout)
    state = load_vqvae(vq_dir).state_dict()
    return vq_config, {VQ_PREFIX + k: v.contiguous() for k, v in state.items() if not k.startswith("decoder.")}


def export(cfg: ExportConfig) -> Path:
    root, ckpt = resolve_checkpoint(cfg.checkpoint)
    out = Path(cfg.out)
    run_config = decoder_run_config(cfg.checkpoint, root, ckpt)
    saved = run_config["decoder"]  # as written: may lack weight_layout
    dcfg = DecoderConfig.from_dict(saved)
    vocab = Vocabulary.load(root / VOCAB_DIR)
    if dcfg.vocab_size != vocab.vocab_size:
        raise CheckpointError(f"{ckpt / CONFIG}: decoder vocab_size {dcfg.vocab_size} != {vocab.vocab_size} in "
                              f"{root / VOCAB_DIR}; the run's vocabulary was replaced")
    imported = root / IMPORTED_DIR
    if (imported / PERMUTATION).is_file():
        if (imported / MANIFEST).is_file():
            verify_dir(imported)
        permutation = load_json(imported / PERMUTATION)
        ours_to_theirs = permutation.get("ours_to_theirs") if isinstance(permutation, dict) else None
        if (not isinstance(ours_to_theirs, list) or not all(type(i) is int for i in ours_to_theirs)
                or sorted(ours_to_theirs) != list(range(dcfg.vocab_size))):
            raise CheckpointError(f"{imported / PERMUTATION}: not a permutation of the {dcfg.vocab_size} ids; the run is corrupted")
        order = torch.tensor(invert_permutation(ours_to_theirs), dtype=torch.long)
        tok_dir = imported
        try:
            their_vocab = Tokenizer.from_file(str(imported / TOKENIZER_FILE)).get_vocab(with_added_tokens=True)
        except Exception as e:  # tokenizers raises plain Exception subclasses for a missing or unreadable file
            raise CheckpointError(f"{imported / TOKENIZER_FILE}: cannot be loaded by tokenizers "
                                  f"({' '.join(str(e).split())[:200]}); the run is corrupted, import it again") from None
    else:
        ours_to_theirs, order, tok_dir = list(range(dcfg.vocab_size)), None, root / VOCAB_DIR
        their_vocab = vocab.tokenizer.get_vocab(with_added_tokens=True)  # verified by Vocabulary.load
    ids = {role: ours_to_theirs[i] for role, i in vocab.special_ids.items()}
    vq_config, vq_state = _vq_export(root)
    try:
        hf_config = to_hf_config(dcfg, vq_config, vocabulary_map=their_vocab, bos_token_id=ids["bos"],
                                 eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    except ValueError as e:
        raise UserError(f"{ckpt}: cannot be exported: {e}") from None
    if isinstance(run_config.get(LORA), dict):  # a LoRA run: its base with the adapters merged in, in memory
        merged = load_run(ckpt).decoder.state_dict()
        ours_specs = {k: (v.dtype, tuple(v.shape)) for k, v in merged.items()}
        weights = lambda: iter(merged.items())  # noqa: E731
    else:
        ours_specs = safetensors_specs(ckpt / WEIGHTS)
        weights = lambda: _read_tensors([ckpt / WEIGHTS])  # noqa: E731
    hf_config.architectures = ["ChameleonForConditionalGeneration"]
    hf_config.dtype = str(ours_specs["tok_emb.weight"][0]).removeprefix("torch.")
    current = upgrade_state_dict(_meta(ours_specs), saved)  # the shapes in nn.Linear's layout
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in iter_to_hf(current.items(), dcfg)}
    specs.update({k: (v.dtype, tuple(v.shape)) for k, v in vq_state.items()})

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in weights():
            t = upgrade_state_dict({name: t}, saved)[name]  # nn.Linear's layout, whatever the run was written in
            if order is not None:
                t = reorder_vocab(name, t, order)
            for hf_name, part in iter_to_hf([(name, t)], dcfg):
                yield hf_name, part.contiguous()
        yield from vq_state.items()

    _check_new_out(cfg.out)
    with _staging(out) as tmp:
        stream_safetensors(tmp / WEIGHTS, specs, tensors(), metadata={"format": "pt"})
        hf_config.save_pretrained(str(tmp))
        for name in SOURCE_FILES if tok_dir == imported else (TOKENIZER_FILE, HF_CONFIG_FILE):
            if name != "config.json" and (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
        if tok_dir != imported and "eot" in ids:  # a run trained on conversations: generate() stops at a turn's end
            save_json(tmp / "generation_config.json", {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], ids["eot"]],
                                                       "pad_token_id": ids["pad"]})
    log.info(f"wrote {out} (transformers' ChameleonForConditionalGeneration, {dcfg.vocab_size} ids in "
             f"{'the source checkpoint' if order is not None else 'this run'}'s order)")
    return out


def export_cmd(cfg: ExportConfig) -> int:
    export(cfg)
    return 0

