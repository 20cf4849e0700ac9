"""Checkpoint files: safetensors weights + JSON, written crash-safely, verified on load.

Every stage saves through these functions (one place for checkpoint IO):

* ``save_weights`` / ``load_weights``: safetensors only (no pickle), strict key and shape checks.
* ``save_json`` / ``load_json``: plain JSON with a clear error on a truncated or invalid file.
* ``atomic_dir``: build a checkpoint directory under a temporary name, fsync every file, write a
  ``MANIFEST.json`` of sha256 checksums, then rename into place. A kill at any moment leaves either
  the old directory or the complete new one.
* ``verify_dir``: check a directory against its manifest (missing file, size or checksum mismatch).
* ``step_dirs`` / ``latest_good`` / ``prune``: the ``checkpoints/step-XXXXXXXX`` rotation used for
  ``--resume``; ``latest_good`` skips corrupted checkpoints with a warning and falls back, ``prune``
  keeps the newest checkpoints that verify.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from earlyfusion.core.errors import CheckpointError

log = logging.getLogger("earlyfusion")

MANIFEST = "MANIFEST.json"
STEP_PREFIX = "step-"


# ---------------------------------------------------------------- single files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_json(path: str | Path, obj) -> None:
    """Write JSON to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer of more digits than Python converts
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or corrupted") from None
    except RecursionError:  # json recurses once per nesting level: '[' * 100000 exhausts the stack
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply); the file is truncated or corrupted") from None


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors with safetensors (contiguous CPU copies; shared storage is fine)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(plain, str(tmp), metadata=metadata)
    except SafetensorError as e:  # safetensors reports OS errors (a full disk: "os error 28") as its own type
        tmp.unlink(missing_ok=True)
        code = errno.ENOSPC if "os error 28" in str(e) or "StorageFull" in str(e) else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from e
    _fsync_file(tmp)
    os.replace(tmp, path)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupted file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or corrupted") from e


# torch dtype <-> the dtype names in a safetensors header
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _read_header(fh, size: int) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts) of an open safetensors file."""
    n = int.from_bytes(fh.read(8), "little")
    if not 2 <= n <= size - 8:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
    header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def load_weights(path: str | Path, module: torch.nn.Module) -> None:
    """Load a safetensors file into ``module`` with strict key and shape checks.

    Each tensor is read from the file into a buffer of its own size and copied into the module's, so loading
    holds the weights once plus one tensor: never a second full copy, and no memory map that would count the
    whole file as resident (a bf16 7B model loads in the memory it takes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    own = module.state_dict()
    try:
        with open(path, "rb") as fh:
            header, base = _read_header(fh, path.stat().st_size)
            shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            missing = sorted(set(own) - set(shapes))
            unexpected = sorted(set(shapes) - set(own))
            wrong = sorted(k for k in set(own) & set(shapes) if tuple(own[k].shape) != shapes[k])
            if missing or unexpected or wrong:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
                if unexpected:
                    parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
                if wrong:
                    k = wrong[0]
                    parts.append(f"shape mismatch for {len(wrong)} (e.g. {k}: file {shapes[k]} vs model {tuple(own[k].shape)})")
                raise CheckpointError(
                    f"{path}: weights do not match the model built from the config beside it: " + "; ".join(parts)
                    + ". Was config.json edited, or the file copied from another run?"
                )
            with torch.no_grad():
                for k, target in own.items():
                    info = header[k]
                    dtype = _TORCH_DTYPES[info["dtype"]]
                    start, end = info["data_offsets"]
                    if end - start != torch.Size(shapes[k]).numel() * dtype.itemsize:
                        raise ValueError(f"tensor {k}: {end - start} bytes for shape {list(shapes[k])} {info['dtype']}")
                    raw = torch.empty(end - start, dtype=torch.uint8)
                    fh.seek(base + start)
                    if fh.readinto(raw.numpy()) != end - start:
                        raise ValueError(f"tensor {k} ends past the end of the file")
                    target.copy_(raw.view(dtype).reshape(shapes[k]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: a header nested too deeply
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or corrupted") from e


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


# ---------------------------------------------------------------- directories


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, names: list[str] | None = None) -> None:
    """Checksum every file under ``directory`` (recursively), or only the files ``names``, into MANIFEST.json."""
    files = {}
    paths = sorted(directory.rglob("*")) if names is None else [directory / n for n in names]
    for p in paths:
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    save_json(directory / MANIFEST, {"files": files})


def manifest_files(directory: str | Path) -> dict[str, dict]:
    """The files ``directory/MANIFEST.json`` lists: name -> {"size": int, "sha256": str}; CheckpointError when the
    manifest is missing, not JSON, or not of that shape."""
    manifest = Path(directory) / MANIFEST
    raw = load_json(manifest)
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"{manifest}: not a list of file sizes and checksums; the file is corrupted")
    return files


def verify_file(directory: Path, name: str, info: dict) -> None:
    """CheckpointError unless ``directory/name`` has the size and checksum its manifest entry ``info`` records."""
    p = directory / name
    if not p.is_file():
        raise CheckpointError(f"{p}: listed in {MANIFEST} but missing; the checkpoint is incomplete")
    if p.stat().st_size != info["size"]:
        raise CheckpointError(f"{p}: size {p.stat().st_size} != {info['size']} recorded; the file is truncated or corrupted")
    if sha256_file(p) != info["sha256"]:
        raise CheckpointError(f"{p}: checksum does not match {MANIFEST}; the file is corrupted")


def verify_dir(directory: str | Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupted file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    for rel, info in manifest_files(directory).items():
        verify_file(directory, rel, info)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success, manifest + fsync it and rename it to ``dest``.

    If ``dest`` exists it is replaced only after the new directory is complete. On an exception the
    temporary directory is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        write_manifest(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        _fsync_dir(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir(src: str | Path, dest: str | Path) -> None:
    """Copy a directory crash-safely (used to embed the vocabulary / image tokenizer in a run)."""
    src = Path(src)
    with atomic_dir(dest) as tmp:
        for p in src.rglob("*"):
            if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name:
                target = tmp / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)


# ---------------------------------------------------------------- step checkpoints for --resume


def step_dir(checkpoints: str | Path, step: int) -> Path:
    return Path(checkpoints) / f"{STEP_PREFIX}{step:08d}"


def step_dirs(checkpoints: str | Path) -> list[Path]:
    """Completed step checkpoints, newest first (temporary/partial directories are ignored)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def latest_good(checkpoints: str | Path) -> Path | None:
    """The newest step checkpoint that verifies; corrupted ones are reported and skipped."""
    for d in step_dirs(checkpoints):
        try:
            verify_dir(d)
            return d
        except CheckpointError as e:
            log.warning("skipping corrupted checkpoint: %s", e)
    return None


def prune(checkpoints: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints that verify; delete the others and stale temporaries.

    Only verified checkpoints count towards ``keep``, so a corrupted one is never kept in place of a
    good one and the newest good one is never deleted. When none verifies nothing is deleted (the
    user decides what to do with them).
    """
    checkpoints = Path(checkpoints)
    kept, doomed = 0, []
    for d in step_dirs(checkpoints):
        if kept >= max(keep, 1):
            doomed.append(d)
            continue
        try:
            verify_dir(d)
            kept += 1
        except CheckpointError as e:
            log.warning("removing corrupted checkpoint: %s", e)
            doomed.append(d)
    if kept:
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)
    if checkpoints.is_dir():
        for p in checkpoints.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- optimizer / RNG state without pickle


def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (dicts/lists/tuples of tensors and scalars) into tensors + JSON skeleton.

    Tensors go to a flat dict under dotted keys; the skeleton keeps everything else and marks each
    tensor's place as {"__tensor__": key}. ``unflatten_state`` inverts it. Dict keys that are ints
    (optimizer state indices) are kept as {"__int_keys__": ...}.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            tensors[key] = o
            return {"__tensor__": key}
        if isinstance(o, dict):
            int_keys = all(isinstance(k, int) for k in o) and len(o) > 0
            out = {str(k): walk(v, f"{key}.{k}" if key else str(k)) for k, v in o.items()}
            return {"__int_keys__": out} if int_keys else out
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot store {type(o).__name__} at {key!r} without pickle")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton, tensors: dict[str, torch.Tensor]):
    def walk(o):
        if isinstance(o, dict):
            if set(o) == {"__tensor__"}:
                return tensors[o["__tensor__"]]
            if set(o) == {"__int_keys__"}:
                return {int(k): walk(v) for k, v in o["__int_keys__"].items()}
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(skeleton)


def save_state(directory: str | Path, name: str, state) -> None:
    """Save a nested state (optimizer, scheduler, RNG, counters) as NAME.safetensors + NAME.json."""
    directory = Path(directory)
    tensors, skeleton = flatten_state(state)
    save_weights(directory / f"{name}.safetensors", tensors)
    save_json(directory / f"{name}.json", skeleton)


def load_state(directory: str | Path, name: str):
    directory = Path(directory)
    skeleton = load_json(directory / f"{name}.json")
    tensors = read_weights(directory / f"{name}.safetensors")
    try:
        return unflatten_state(skeleton, tensors)
    except KeyError as e:
        raise CheckpointError(f"{directory / (name + '.safetensors')}: tensor {e} named in {name}.json is missing") from e


def weights_fingerprint(ckpt: Path, weights_name: str) -> str:
    """sha256 of a checkpoint's weights file, as its manifest records it (the directory was verified on load)."""
    recorded = load_json(ckpt / MANIFEST).get("files", {}).get(weights_name, {}).get("sha256")
    return recorded or sha256_file(ckpt / weights_name)
