"""Reading raw image(-text) sources with bad-input accounting.

``iter_image_text`` yields ``(RGB PIL image, text or None)`` from

* an imagefolder directory: image files + ``metadata.jsonl`` (``file_name`` and ``text`` per line; any
  folder may hold one, paths are relative to it), or ``metadata.csv``; splits are sub-folders
  (``DIR/train``, ``DIR/test``) or the folder itself; a folder of images without metadata gives text None;
* a hub data set name (or a local data set directory of parquet/arrow files) via ``datasets``, with
  ``image_column`` / ``text_column``; images are read with ``Image(decode=False)`` and decoded by our own
  ``load_image`` so a bad image is counted, not fatal.

Local imagefolders are read line by line here rather than through ``datasets.load_dataset``, because
``datasets`` aborts the whole folder on one malformed metadata line (ArrowInvalid JSON parse error) or a
zero-byte image; here every good record comes through and every bad one is counted by reason in a
``SkipReport``: the image reasons of ``tokenizer.preprocess.ImageError`` ("missing", "empty_file",
"not_an_image", "truncated", "too_large", "unreadable") plus "bad_json", "bad_utf8" and "bad_record"
(a metadata line without a usable ``file_name`` / text). With ``strict`` the first bad record raises a
UserError naming the file and line instead.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from earlyfusion.errors import UserError
from earlyfusion.tokenizer.preprocess import ImageError, is_image_file, load_image
from earlyfusion.logs import log

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
SPLIT_DIRS = ("train", "test", "validation", "valid", "val", "dev", "eval")
_DATA_FILE_EXTS = (".parquet", ".arrow")


class SkipReport:
    """Counts records read and records skipped by reason; ``strict`` raises on the first bad one."""

    def __init__(self, strict: bool = False, keep_examples: int = 3):
        self.strict = strict
        self.keep_examples = keep_examples
        self.records = 0  # every record considered, good or bad
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def ok(self, n: int = 1) -> None:
        """Count ``n`` good records."""
        self.records += n

    def add(self, reason: str, where: str, detail: str = "") -> None:
        """Count one bad record (or raise UserError in strict mode)."""
        if self.strict:
            msg = f"{where}: bad record ({reason.replace('_', ' ')}"
            msg += f": {detail})" if detail else ")"
            raise UserError(msg + "; fix or remove it, or run without --strict to skip and count bad records")
        self.records += 1
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep_examples:
            ex.append(where)

    def update(self, other: SkipReport) -> None:
        """Fold another report's counts into this one (several sources, several workers)."""
        self.records += other.records
        self.counts.update(other.counts)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.keep_examples - len(mine))])

    @property
    def total(self) -> int:
        """Number of skipped records."""
        return sum(self.counts.values())

    @property
    def good(self) -> int:
        return self.records - self.total

    def summary(self) -> str:
        """'skipped 7 of 1000 records: 3 truncated, 2 not_an_image, 2 bad_json' (most frequent first)."""
        if not self.total:
            return f"skipped 0 of {self.records} records"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"skipped {self.total} of {self.records} records: {parts}"

    def as_dict(self) -> dict:
        return {"records": self.records, "skipped": self.total, "by_reason": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()!r})"


# ---------------------------------------------------------------- local imagefolder


def _split_root(data: Path, split: str) -> Path:
    """The folder holding ``split``: DIR/split if present, else DIR itself (unless DIR has other splits)."""
    if (data / split).is_dir():
        return data / split
    others = sorted(d.name for d in data.iterdir() if d.is_dir() and d.name in SPLIT_DIRS)
    if others:
        raise UserError(f"{data}: no '{split}' split folder (found: {', '.join(others)}); "
                        f"pick one of them with the split option or point at the folder itself")
    return data


def _metadata_rows(meta: Path, text_column: str, report: SkipReport) -> Iterator[tuple[str, Path, str | None]]:
    """(where, image path, text) per good metadata row; bad rows are counted."""
    raw = meta.read_bytes()
    if meta.suffix == ".csv":
        yield from _csv_rows(meta, raw, text_column, report)
        return
    for lineno, line in enumerate(raw.splitlines(), 1):
        where = f"{meta}:{lineno}"
        if not line.strip():
            continue
        try:
            s = line.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a byte-order mark
        except UnicodeDecodeError as e:
            report.add("bad_utf8", where, str(e))
            continue
        try:
            row = json.loads(s)
        except json.JSONDecodeError as e:
            report.add("bad_json", where, str(e))
            continue
        item = _check_row(row, meta, where, text_column, report)
        if item is not None:
            yield item


def _csv_rows(meta: Path, raw: bytes, text_column: str, report: SkipReport):
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        where = f"{meta}:{reader.line_num}"
        if any("\udc80" <= ch <= "\udcff" for v in row.values() if isinstance(v, str) for ch in v):
            report.add("bad_utf8", where)
            continue
        if None in row:  # more fields than the header
            report.add("bad_record", where, "too many fields")
            continue
        item = _check_row(row, meta, where, text_column, report)
        if item is not None:
            yield item


def _check_row(row, meta: Path, where: str, text_column: str, report: SkipReport):
    if not isinstance(row, dict):
        report.add("bad_record", where, "not a JSON object")
        return None
    name = row.get("file_name")
    if not isinstance(name, str) or not name.strip():
        report.add("bad_record", where, "no file_name")
        return None
    text = row.get(text_column)
    if text is not None and not isinstance(text, str):
        report.add("bad_record", where, f"{text_column!r} is not a string")
        return None
    path = meta.parent / name
    return f"{where} ({name})", path, text


def _local_records(root: Path, text_column: str, report: SkipReport) -> Iterator[tuple[str, Path, str | None]]:
    metas = sorted(p for p in root.rglob("*") if p.name in METADATA_NAMES and p.is_file())
    if metas:
        for meta in metas:
            yield from _metadata_rows(meta, text_column, report)
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts):
                yield str(p), p, None


def _iter_local(root: Path, text_column: str, report: SkipReport, shrink_to: int | None):
    for where, path, text in _local_records(root, text_column, report):
        if not path.exists():
            report.add("missing", where, "the image file listed in the metadata does not exist")
            continue
        try:
            img = load_image(path, shrink_to=shrink_to)
        except ImageError as e:
            report.add(e.reason, where, str(e))
            continue
        report.ok()
        yield img, text


# ---------------------------------------------------------------- datasets (hub or local data files)


def iter_dataset(ds, image_column: str, text_column: str | None, report: SkipReport, name: str = "dataset",
                 shrink_to: int | None = None) -> Iterator[tuple[Image.Image, str | None]]:
    """Rows of a ``datasets.Dataset`` -> (image, text); images decoded by ``load_image``, bad ones counted."""
    import datasets

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
        try:
            img = load_image(src, shrink_to=shrink_to)
        except ImageError as e:
            report.add(e.reason, where, str(e))
            continue
        report.ok()
        yield img, text


def _load_hub(data: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(data, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load data set {data!r} split {split!r}: {e}") from None
    except Exception as e:  # network, auth, a broken repository: one line for the user
        raise UserError(f"cannot load data set {data!r} split {split!r} ({type(e).__name__}: {e}); no local "
                        "directory has that name: check the name, your network/HF token, or give a local "
                        "imagefolder directory") from None


# ---------------------------------------------------------------- the entry point


def iter_image_text(data: str, image_column: str = "image", text_column: str = "text", split: str = "train",
                    report: SkipReport | None = None, strict: bool = False, *,
                    shrink_to: int | None = None) -> Iterator[tuple[Image.Image, str | None]]:
    """Yield ``(RGB PIL image, text | None)`` for every good record of ``data``; count the bad ones.

    ``data``: an imagefolder directory (``DIR/<split>`` if it has split folders) or a hub data set name.
    ``report``: where skipped records are counted (a fresh one if None; its summary is logged at the
    end if anything was skipped). ``strict``: raise UserError on the first bad record.
    ``shrink_to``: the consumer's image size; big images are decoded at reduced scale (faster).
    Raises UserError when the source has no usable record at all.
    """
    own = report is None
    if report is None:
        report = SkipReport(strict=strict)
    elif strict:
        report.strict = True
    start_records, start_good = report.records, report.good
    path = Path(data).expanduser()
    if path.is_dir():
        root = _split_root(path, split)
        has_records = any(p.is_file() and (p.name in METADATA_NAMES or is_image_file(p)) for p in root.rglob("*"))
        if not has_records and any(p.suffix in _DATA_FILE_EXTS for p in root.rglob("*")):
            it = iter_dataset(_load_hub(str(path), split), image_column, text_column, report, str(path), shrink_to)
        elif not has_records:
            raise UserError(f"{root}: no images and no metadata.jsonl found; give an imagefolder directory "
                            "(image files + metadata.jsonl with file_name and text)")
        else:
            it = _iter_local(root, text_column, report, shrink_to)
    elif path.exists():
        raise UserError(f"{data}: is a file; give an imagefolder directory or a hub data set name")
    elif data.startswith((".", "/", "~")) or data.count("/") > 1 or "\\" in data:
        raise UserError(f"{data}: no such directory")
    else:
        it = iter_dataset(_load_hub(data, split), image_column, text_column, report, data, shrink_to)
    yield from it
    if report.good == start_good:
        raise UserError(f"{data}: none of its {report.records - start_records} records could be used "
                        f"({report.summary()})")
    if own and report.total:
        log.warning("%s: %s", data, report.summary())
