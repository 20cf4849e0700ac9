"""Data sources: what ``--data`` accepts, resolved into the parts of the training mixture.

Each source is optionally ``SPEC:WEIGHT``:
  * a data directory such as the built-in one (``earlyfusion data shapes``): all of its parts, with
    default weights pairs 0.8 / interleaved 0.1 / text 0.1 (renormalised over the parts present, times
    the source's weight): ``DIR/train`` (or DIR itself) image-caption pairs in the imagefolder layout,
    ``DIR/interleaved.jsonl``, ``DIR/text.jsonl``. ``DIR/test`` is held out (``heldout_pairs``);
  * an interleaved ``.jsonl``, a text ``.jsonl`` or a ``.txt`` (formats in ``records``);
  * a hub data set name (image + text columns -> pairs, text column only -> text documents);
  * WebDataset tar shards (``shards/{00000..00099}.tar``, one .tar, or a directory of .tar files; ``tar_shards``):
    image-caption pairs read as a stream (``PartSpec.stream`` "tar");
  * a directory of code shards (``earlyfusion encode``; recognised by its manifest, ``code_shards``): image-caption
    pairs already encoded, which training streams (``PartSpec.stream`` "codes").
The mixture weight is the probability that the next document comes from that part.

``iter_image_text`` reads (image, caption) pairs for the image tokenizer: an imagefolder directory, tar shards, or
a hub data set name (or a local data set directory of parquet/arrow files) via ``datasets``, with
``image_column`` / ``text_column``; hub images are read with ``Image(decode=False)`` and decoded by
our own ``load_image`` so that a bad image is counted, not fatal. ``iter_texts`` gives every text of
the training parts, for the BPE, up to ``records.MAX_TEXT_CHARS`` characters each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.tokenizer.preprocess import ImageError, is_image_file, load_image

from .code_shards import CodeSet, is_code_dir
from .conversations import conversation_records, is_conversation_file
from .records import (
    MAX_TEXT_CHARS,
    METADATA_NAMES,
    SkipReport,
    has_images_or_metadata,
    interleaved_records,
    jsonl_kind,
    pair_records,
    split_root,
    text_records,
)
from .tar_shards import is_tar_source, tar_paths, tar_records

DEFAULT_PART_WEIGHTS = {"pairs": 0.8, "interleaved": 0.1, "text": 0.1, "conversations": 0.8}
INTERLEAVED_FILE = "interleaved.jsonl"
CONVERSATIONS_FILE = "conversations.json"  # the held-out ones beside it: conversations_test.json
TEXT_FILES = ("text.jsonl", "text.txt")
_DATA_FILE_EXTS = (".parquet", ".arrow")

Kind = Literal["pairs", "interleaved", "text", "conversations"]


@dataclass
class PartSpec:
    kind: Kind
    location: str
    """An imagefolder root, a .jsonl/.txt file or a hub name."""
    weight: float
    source: str
    """The --data entry it came from (one image cache per entry)."""
    hub: bool = False
    stream: Literal["tar", "codes"] | None = None
    """Pairs read as a stream: tar shards ("tar"), or code shards ("codes"); None for data read whole."""


def has_conversations(sources: Sequence[str], split: str = "train") -> bool:
    """Whether any of the ``--data`` entries holds conversations."""
    return any(p.kind == "conversations" for p in resolve_sources(sources, split))


def parse_source(spec: str) -> tuple[str, float | None]:
    """'DIR' -> (DIR, None); 'DIR:0.5' -> (DIR, 0.5). An existing path is never split."""
    if Path(spec).expanduser().exists() or ":" not in spec:
        return spec, None
    name, _, w = spec.rpartition(":")
    try:
        weight = float(w)
    except ValueError:
        return spec, None
    if not weight > 0 or not np.isfinite(weight):
        raise UserError(f"--data {spec}: the weight after ':' must be a positive number")
    return name, weight


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s or s.endswith((".jsonl", ".txt", ".json"))


def resolve_sources(sources: Sequence[str], split: str = "train") -> list[PartSpec]:
    """The mixture parts of the ``--data`` entries, with their weights."""
    parts: list[PartSpec] = []
    for spec in sources:
        name, weight = parse_source(spec)
        w = 1.0 if weight is None else weight
        path = Path(name).expanduser()
        if path.is_dir() and is_code_dir(path):
            parts.append(PartSpec(CodeSet.open(path).kind, str(path), w, spec, stream="codes"))
        elif is_tar_source(name):
            tar_paths(name)  # every shard must be there
            parts.append(PartSpec("pairs", name, w, spec, stream="tar"))
        elif path.is_dir():
            found: list[tuple[Kind, str]] = []
            root = split_root(path, split)  # a split that is not there is an error, never an empty part
            if has_images_or_metadata(root):
                found.append(("pairs", str(root)))
            if (path / INTERLEAVED_FILE).is_file():
                found.append(("interleaved", str(path / INTERLEAVED_FILE)))
            text_file = next((path / t for t in TEXT_FILES if (path / t).is_file()), None)
            if text_file is not None:
                found.append(("text", str(text_file)))
            if (path / CONVERSATIONS_FILE).is_file():
                found.append(("conversations", str(path / CONVERSATIONS_FILE)))
            if not found:
                raise UserError(f"--data {name}: no training data found (expected a '{split}' imagefolder or images + "
                                f"metadata.jsonl, {INTERLEAVED_FILE} or {TEXT_FILES[0]})")
            total = sum(DEFAULT_PART_WEIGHTS[k] for k, _ in found)
            parts += [PartSpec(k, loc, w * DEFAULT_PART_WEIGHTS[k] / total, spec) for k, loc in found]
        elif path.is_file():
            if path.suffix == ".txt":
                parts.append(PartSpec("text", str(path), w, spec))
            elif is_conversation_file(path):
                parts.append(PartSpec("conversations", str(path), w, spec))
            elif path.suffix == ".jsonl":
                parts.append(PartSpec(jsonl_kind(path), str(path), w, spec))
            else:
                raise UserError(f"--data {name}: unsupported file type (give a directory, a .jsonl or a .txt file, or "
                                "a .json of conversations)")
        elif _looks_like_path(name):
            raise UserError(f"--data {name}: no such file or directory")
        else:
            parts.append(PartSpec("pairs", name, w, spec, hub=True))
    return parts


def load_hub(data: str, split: str):
    """``split`` of a hub data set (or of a local directory of data files) as a ``datasets.Dataset``."""

    try:
        ds = datasets.load_dataset(data, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load data set {data!r} split {split!r}: {e}") from None
    except Exception as e:  # network, auth, a broken repository: one line for the user
        raise UserError(f"cannot load data set {data!r} split {split!r} ({type(e).__name__}: {e}); no local "
                        "directory has that name: check the name, your network/HF token, or give a local "
                        "imagefolder directory") from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - load_dataset with split gives a Dataset
        ds = ds[split]
    return ds


def iter_texts(sources: Sequence[str], report: SkipReport | None = None, split: str = "train",
               text_column: str = "text", allow_outside: bool = False) -> Iterator[str]:
    """Every text of the training parts (captions, interleaved texts, text documents), for the BPE. A record with
    a text over ``MAX_TEXT_CHARS`` is skipped and counted as "too_long": the BPE trainer's work grows with the
    square of a text's longest run without spaces, so one such text could hold up the whole vocabulary."""
    report = report if report is not None else SkipReport()
    for part in resolve_sources(sources, split):
        recs: Iterable[tuple[str, list[str]]]
        if part.hub:
            ds = load_hub(part.location, split)
            column = ds[text_column] if text_column in ds.column_names else []
            recs = [(f"{part.location}[{i}]", [t]) for i, t in enumerate(column) if isinstance(t, str) and t]
        elif part.stream == "tar":
            recs = ((w, [t]) for w, _, t in tar_records(part.location, text_column, report) if t)
        elif part.stream == "codes":
            recs = ((w, texts) for w, texts in code_texts(Path(part.location)) if texts)
        elif part.kind == "pairs":
            recs = [(w, [t]) for w, _, t in pair_records(Path(part.location), text_column, report, allow_outside) if t]
        elif part.kind == "interleaved":
            recs = [(w, [x for k, x in segs if k == "t"])
                    for w, segs in interleaved_records(Path(part.location), report, allow_outside)]
        elif part.kind == "conversations":
            recs = [(w, [x for t in turns for k, x in t.segments if k == "t"])
                    for w, _, turns in conversation_records(Path(part.location), report, allow_outside)]
        else:
            recs = [(w, [t]) for w, t in text_records(Path(part.location), report)]
        for where, texts in recs:  # one record at a time: a streamed corpus is never held whole
            longest = max(map(len, texts), default=0)
            if longest > MAX_TEXT_CHARS:
                report.add("too_long", where, f"a text of {longest} characters (BPE: {MAX_TEXT_CHARS} at most)")
            else:
                report.ok()
                yield from texts


# ---------------------------------------------------------------- images with their captions


def _load_counted(src, where: str, report: SkipReport, shrink_to: int | None) -> Image.Image | None:
    """The decoded image, or None with the reason counted."""
    try:
        img = load_image(src, shrink_to=shrink_to)
    except ImageError as e:
        report.add(e.reason, where, str(e))
        return None
    report.ok()
    return img


def _iter_local(root: Path, text_column: str, report: SkipReport, shrink_to: int | None, allow_outside: bool = False):
    for where, path, text in pair_records(root, text_column, report, allow_outside):
        if not path.exists():
            report.add("missing", where, "the image file listed in the metadata does not exist")
            continue
        img = _load_counted(path, where, report, shrink_to)
        if img is not None:
            yield img, text


def _iter_tar(spec: str, text_column: str, report: SkipReport, shrink_to: int | None):
    for where, data, text in tar_records(spec, text_column, report):
        img = _load_counted(data, where, report, shrink_to)
        if img is not None:
            yield img, text


def code_texts(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(where, its non-empty texts) of every record of a code-shard directory (a pair's caption, a document's text
    pieces), a shard at a time."""
    codes = CodeSet.open(root)
    for i, shard in enumerate(codes.shards):
        reader = codes.reader(i)
        for k, (_, texts) in enumerate(reader.documents_of(0, len(reader))):
            yield f"{root / shard.name}[{k}]", [t for t in texts if t]


def iter_dataset(ds, image_column: str, text_column: str | None, report: SkipReport, name: str = "dataset",
                 shrink_to: int | None = None) -> Iterator[tuple[Image.Image, str | None]]:
    """Rows of a ``datasets.Dataset`` -> (image, text); images decoded by ``load_image``, bad ones counted."""

    cols = list(ds.column_names)
    if image_column not in cols:
        raise UserError(f"{name}: no image column {image_column!r} (columns: {', '.join(cols)}); "
                        "pass the right one with --image-column")
    if text_column is not None and text_column not in cols:
        text_column = None  # image-only data set
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    for i, row in enumerate(ds):
        where = f"{name}[{i}]"
        value = row[image_column]
        src = None
        if isinstance(value, dict):
            src = value.get("bytes") or value.get("path")
        elif isinstance(value, (bytes, str, Image.Image)):
            src = value
        if src is None:
            report.add("missing", where, "no image")
            continue
        text = row[text_column] if text_column else None
        if text is not None and not isinstance(text, str):
            report.add("bad_record", where, f"{text_column!r} is not a string")
            continue
        img = _load_counted(src, where, report, shrink_to)
        if img is not None:
            yield img, text


def iter_image_text(data: str, image_column: str = "image", text_column: str = "text", split: str = "train",
                    report: SkipReport | None = None, strict: bool = False, *, shrink_to: int | None = None,
                    allow_outside: bool = False) -> Iterator[tuple[Image.Image, str | None]]:
    """Yield ``(RGB PIL image, text | None)`` for every good record of ``data``; count the bad ones.

    ``data``: an imagefolder directory (``DIR/<split>`` if it has split folders), tar shards or a hub data set name.
    ``report``: where skipped records are counted (a fresh one if None; its summary is logged at the
    end if anything was skipped). ``strict``: raise UserError on the first bad record.
    ``shrink_to``: the consumer's image size; big images are decoded at reduced scale (faster).
    ``allow_outside``: read images of an imagefolder that lie outside it (``records.pair_records``).
    Raises UserError when the source has no usable record at all.
    """
    own = report is None
    if report is None:
        report = SkipReport(strict=strict)
    elif strict:
        report.strict = True
    start_records, start_good = report.records, report.good
    path = Path(data).expanduser()
    if is_tar_source(data):
        it = _iter_tar(data, text_column, report, shrink_to)
    elif path.is_dir() and is_code_dir(path):
        raise UserError(f"{data}: holds image codes (`earlyfusion encode`), not images; give the images they came from")
    elif path.is_dir():
        root = split_root(path, split)
        has_records = any(p.is_file() and (p.name in METADATA_NAMES or is_image_file(p)) for p in root.rglob("*"))
        if not has_records and any(p.suffix in _DATA_FILE_EXTS for p in root.rglob("*")):
            it = iter_dataset(load_hub(str(path), split), image_column, text_column, report, str(path), shrink_to)
        elif not has_records:
            raise UserError(f"{root}: no images and no metadata.jsonl found; give an imagefolder directory "
                            "(image files + metadata.jsonl with file_name and text)")
        else:
            it = _iter_local(root, text_column, report, shrink_to, allow_outside)
    elif path.exists():
        raise UserError(f"{data}: is a file; give an imagefolder directory or a hub data set name")
    elif data.startswith((".", "/", "~")) or data.count("/") > 1 or "\\" in data:
        raise UserError(f"{data}: no such directory")
    else:
        it = iter_dataset(load_hub(data, split), image_column, text_column, report, data, shrink_to)
    yield from it
    if report.good == start_good:
        raise UserError(f"{data}: none of its {report.records - start_records} records could be used "
                        f"({report.summary()})")
    if own and report.total:
        log.warning("%s: %s", data, report.summary())
