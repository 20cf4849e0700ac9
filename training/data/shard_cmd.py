"""``earlyfusion data shard``: an imagefolder written as WebDataset tar shards (``OUT/00000.tar``, ...).

Each record becomes ``KEY.<ext>`` (the image file's own bytes; formats other than JPEG, PNG and WebP are re-encoded
as PNG) and, when it has a caption, ``KEY.txt``; keys number the records across shards. The records are read with
the imagefolder rules (``records.pair_records``: paths confined to the folder, bad metadata rows counted); images are
not decoded (``encode`` and training count damaged ones), except those re-encoded as PNG.

Each shard is written under a hidden temporary name, flushed to disk, then renamed: a shard that is visible is
complete, whatever moment the command was killed at. ``OUT/.lock`` keeps a second writer out.
"""

from __future__ import annotations

import io
import itertools
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log, progress
from earlyfusion.core.rundir import run_lock
from earlyfusion.tokenizer.preprocess import ImageError, load_image

from .files import atomic_file, remove_temporaries
from .records import SkipReport, pair_records, split_root
from .tar_shards import IMAGE_EXTS, TAR_SUFFIX

_KEEP = {"." + e: e for e in IMAGE_EXTS}


@dataclass
class ShardConfig:
    data: str
    """Imagefolder to write as shards (DIR/<split> when it has split folders): image files + metadata.jsonl/.csv."""
    out: str
    """Directory to write the shards into (00000.tar, 00001.tar, ...); it must hold no shards yet."""
    shard_size: int = 10_000
    """Image-caption records per shard."""
    split: str = "train"
    """Split folder to read when the imagefolder has split folders."""
    text_column: str = "text"
    """Caption field of the metadata."""
    strict: bool = False
    """Fail on the first bad record instead of skipping and counting it."""

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError("--shard-size must be at least 1")


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no wall-clock time: the same folder gives the same bytes
    tf.addfile(info, io.BytesIO(data))


def _image_member(path: Path, where: str, report: SkipReport) -> tuple[str, bytes] | None:
    """(extension, bytes) of one image file as it goes into a shard, or None with the reason counted."""
    ext = _KEEP.get(path.suffix.lower())
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        report.add("missing", where, "the image file does not exist")
        return None
    except OSError as e:
        report.add("unreadable", where, str(e))
        return None
    if not data:
        report.add("empty_file", where, "the image file has zero bytes")
        return None
    if ext is not None:
        return ext, data
    try:
        img = load_image(data)
    except ImageError as e:
        report.add(e.reason, where, str(e))
        return None
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "png", buf.getvalue()


def _members(records, report: SkipReport) -> Iterator[tuple[str, tuple[str, bytes], str | None]]:
    """(key, (extension, image bytes), caption) of every usable record, keys numbering them."""
    n = 0
    for where, path, text in progress(records, desc="shard", unit="img"):
        image = _image_member(path, where, report)
        if image is not None:
            report.ok()
            yield f"{n:09d}", image, text
            n += 1


def shard_cmd(cfg: ShardConfig) -> int:
    """``earlyfusion data shard``: write the imagefolder's records as tar shards."""
    t0 = time.perf_counter()
    data, out = Path(cfg.data).expanduser(), Path(cfg.out)
    if not data.is_dir():
        raise UserError(f"--data {cfg.data}: not a directory; give an imagefolder (image files + metadata.jsonl)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the shards")
    root = split_root(data, cfg.split)
    report = SkipReport(strict=cfg.strict)
    with run_lock(out, "data shard"):
        if any(out.glob(f"*{TAR_SUFFIX}")):
            raise UserError(f"--out {out} already holds .tar shards; choose a new directory")
        remove_temporaries(out)
        members = _members(pair_records(root, cfg.text_column, report), report)
        names: list[str] = []
        total = 0
        while (first := next(members, None)) is not None:
            names.append(f"{len(names):05d}{TAR_SUFFIX}")
            with atomic_file(out / names[-1]) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as t:
                for key, (ext, payload), text in itertools.chain([first], itertools.islice(members, cfg.shard_size - 1)):
                    _member(t, f"{key}.{ext}", payload)
                    if text is not None:
                        _member(t, f"{key}.txt", text.encode("utf-8"))
                    total += 1
    if not names:
        raise UserError(f"--data {cfg.data}: no usable records ({report.summary()})")
    pattern = out / (f"{{00000..{len(names) - 1:05d}}}{TAR_SUFFIX}" if len(names) > 1 else names[0])
    if report.total:
        log.warning("%s: %s", cfg.data, report.summary())
    print(f"wrote {total} records in {len(names)} shard(s) of up to {cfg.shard_size}: {pattern} "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0
