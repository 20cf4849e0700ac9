"""Meta's VQGAN files (``vqgan.yaml`` + ``vqgan.ckpt`` or ``vqgan.safetensors``) -> an image tokenizer directory
that ``load_vqvae`` reads (``earlyfusion import chameleon`` uses it)."""

from __future__ import annotations

import re
import zipfile
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from earlyfusion.core.checkpoint import atomic_dir, read_weights
from earlyfusion.core.errors import CheckpointError, UserError, build_config
from earlyfusion.tokenizer.vq_checkpoint import CONFIG, save_vqvae
from earlyfusion.tokenizer.vqgan import CKPT, SAFETENSORS, YAML, ChameleonVQGAN, VQGANConfig

# taming's Encoder/Decoder options that this implementation supports at their default value only
_DDCONFIG_DEFAULTS = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False,
                      "attn_type": "vanilla"}


def config_from_yaml(path: Path) -> VQGANConfig:
    """The VQGANConfig of a taming ``vqgan.yaml`` (model.params.{embed_dim, n_embed, ddconfig}); UserError if unusable."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass the folder holding Meta's {YAML} and {CKPT} (tokenizer/ in the "
                        "Chameleon download)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    params = raw.get("model", {}).get("params") if isinstance(raw, dict) and isinstance(raw.get("model"), dict) else None
    dd = params.get("ddconfig") if isinstance(params, dict) else None
    if not isinstance(dd, dict):
        raise UserError(f"{path}: no model.params.ddconfig section; is this a taming VQGAN config like Meta's {YAML}?")
    if params.get("remap") is not None:
        raise UserError(f"{path}: model.params.remap is set; a remapped codebook is not supported")
    names = {f.name for f in fields(VQGANConfig)}
    for key, value in dd.items():
        if key not in names and _DDCONFIG_DEFAULTS.get(key, object()) != value:
            raise UserError(f"{path}: ddconfig.{key} = {value!r} is not supported by this VQGAN implementation")
    values = {k: v for k, v in {**dd, "embed_dim": params.get("embed_dim"), "n_embed": params.get("n_embed")}.items()
              if k in names}
    absent = sorted(names - set(values) - {"dropout"} | {k for k, v in values.items() if v is None})
    if absent:
        raise UserError(f"{path}: model.params lacks {', '.join(absent)} (embed_dim and n_embed under params, the rest "
                        "under ddconfig)")
    return build_config(VQGANConfig, values, f"{path}: unusable VQGAN config")


# torch.save writes a zip archive whose pickle is ``<name>/data.pkl``; before PyTorch 1.6 it wrote a pickle that
# starts with this magic number (pickled as a long at protocol 2)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_PICKLE_START = re.compile(rb"\x80[\x02-\x05]")


def _checkpoint_kind(path: Path) -> str:
    """What the file is, from its first bytes and (for a zip) its listing: "zip" (torch.save's format), "legacy"
    (torch.save's older format), or a sentence saying why it is neither (a plain pickle, a broken zip, ...)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        return "empty: the file is truncated or corrupted (or was never written)"
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a zip archive that is cut short or damaged: the file is truncated or corrupted"
        if not any(n.endswith("/data.pkl") for n in names):
            return "a zip archive without the data.pkl that torch.save writes, so not a PyTorch checkpoint"
        return "zip"
    if head == _LEGACY_MAGIC:
        return "legacy"
    if _PICKLE_START.match(head):
        return "a plain Python pickle, not a PyTorch checkpoint (torch.save writes a zip archive)"
    # nothing here tells a file that never was a checkpoint from one whose first bytes were overwritten
    return ("not a PyTorch checkpoint: it starts neither like the zip archive torch.save writes nor like a pickle "
            "(if it was one, the file is truncated or corrupted)")


def _ends_with(path: Path, name: str) -> bool:
    """Whether the file ends in the middle of the global ``name``: pickle reads a name up to its newline and drops
    the last byte, so a file cut inside a name reads its stub (one byte short) as a name of its own, which is a
    truncation, not an object of some refused type."""
    want = name.encode("utf-8", "replace")
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - len(want) - 2))
        tail = f.read()
    stub = tail.rsplit(b"\n", 1)[-1]
    return bool(stub) and stub[:-1] == want


def _torch_load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never the pickle's code.

    The file's kind is told from its bytes first, so that a file that never was a PyTorch checkpoint is not
    called truncated, and one cut short is not blamed on its contents."""
    kind = _checkpoint_kind(path)
    if kind not in ("zip", "legacy"):
        raise CheckpointError(f"{path}: {kind}; pass Meta's {CKPT}, or its state dict as {SAFETENSORS}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # the unpickler's and the zip reader's errors have no common type
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found and not _ends_with(path, found.group(1).rsplit(".", 1)[-1]):
            raise UserError(f"{path}: holds a non-tensor object ({found.group(1)}), which is refused because loading it "
                            f"would run code from the file; save its state dict as {SAFETENSORS} beside it instead "
                            "(that is accepted too)") from None
        first = str(e).splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({first}); the file is truncated or "
                              "corrupted") from None


def read_meta_state(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The VQGAN's tensors from ``src/vqgan.safetensors`` (preferred) or ``src/vqgan.ckpt`` (its "state_dict"),
    without the training loss's keys (``loss.*``), and the file they came from."""
    path = src / SAFETENSORS if (src / SAFETENSORS).is_file() else src / CKPT
    if not path.is_file():
        raise UserError(f"{src}: neither {CKPT} nor {SAFETENSORS} found; pass the folder holding Meta's VQGAN "
                        "(tokenizer/ in the Chameleon download)")
    obj = read_weights(path) if path.suffix == ".safetensors" else _torch_load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path}: not a VQGAN checkpoint (expected a state dict of tensors, or one under 'state_dict')")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}, path


def convert_vqgan(src: Path, out: Path) -> None:
    """Meta's ``vqgan.yaml`` + ``vqgan.ckpt`` (or ``vqgan.safetensors``) in ``src`` -> an image tokenizer directory
    ``out`` that ``load_vqvae`` reads, written crash-safely; the weights keep their dtype."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UserError(f"{src}: directory not found; pass the folder holding Meta's {YAML} and {CKPT}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise UserError(f"{out} exists and is not an image tokenizer directory; choose a new directory (an existing "
                        "image tokenizer there would be replaced)")
    cfg = config_from_yaml(src / YAML)
    state, path = read_meta_state(src)
    with torch.device("meta"):
        model = ChameleonVQGAN(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = [f"{label} {len(keys)} (e.g. {keys[:3]})" for label, keys in (("missing", missing), ("unexpected", unexpected))
                  if keys]
        detail += [f"{len(wrong)} of another shape (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}, model "
                   f"{tuple(own[wrong[0]].shape)})"] if wrong else []
        raise CheckpointError(f"{path}: keys do not match the VQGAN described by {src / YAML}: {'; '.join(detail)}")
    model.load_state_dict(state, strict=True, assign=True)  # the file's tensors, dtype and all
    with atomic_dir(out) as tmp:
        save_vqvae(model, tmp)
