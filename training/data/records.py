"""Reading the records of local files, with bad-input accounting.

Every reader yields the good records and counts every bad one by reason in a ``SkipReport`` (with
``strict`` the first bad one raises a UserError naming file:line instead): malformed JSON ("bad_json"),
invalid UTF-8 ("bad_utf8"), records of the wrong shape ("bad_record"), empty records ("empty"). The
image reasons of ``tokenizer.preprocess.ImageError`` ("missing", "empty_file", "not_an_image",
"truncated", "too_large", "unreadable") and "too_long" are counted by the code that meets them.

Files
  * imagefolder: image files + ``metadata.jsonl`` (``file_name`` and a text column per line; any folder
    may hold one, paths are relative to it) or ``metadata.csv``; splits are sub-folders (``DIR/train``,
    ``DIR/test``) or the folder itself; a folder of images without metadata gives captions None;
  * interleaved ``.jsonl`` (OBELICS: parallel ``texts`` / ``images`` lists, one of each pair null, image
    paths relative to the file); consecutive texts of a record are joined by a blank line;
  * text ``.jsonl`` (``{"text": ...}``) or ``.txt`` (one document per non-empty line).

Local imagefolders are read line by line here rather than through ``datasets.load_dataset``, because
``datasets`` aborts the whole folder on one malformed metadata line or a zero-byte image; here every
good record comes through and every bad one is counted. A UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from earlyfusion.errors import UserError
from earlyfusion.tokenizer.preprocess import is_image_file

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
SPLIT_DIRS = ("train", "test", "validation", "valid", "val", "dev", "eval")
VALIDATION_DIRS = ("validation", "valid", "val", "dev")
"""Split folders meant for choosing a model (training's validation), checked in this order."""
PARAGRAPH = "\n\n"  # joins consecutive texts of an interleaved record (OBELICS texts are paragraphs)
_BOM = b"\xef\xbb\xbf"


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


# ---------------------------------------------------------------- lines of a file


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; UserError if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e})") from None


def text_lines(path: Path, report: SkipReport) -> Iterator[tuple[str, str]]:
    """(where = "path:line", text) per non-blank line; invalid UTF-8 is counted, a leading BOM dropped."""
    raw = read_file(path)
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("bad_utf8", where, str(e))
            continue
        yield where, text


def jsonl_records(path: Path, report: SkipReport) -> Iterator[tuple[str, object]]:
    """(where, parsed object) per line; bad UTF-8 and bad JSON are counted."""
    for where, line in text_lines(path, report):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.add("bad_json", where, str(e))
            continue
        yield where, obj


def jsonl_kind(path: Path) -> str:
    """"interleaved" if the first usable record has texts/images, "text" if it has text."""
    with open(path, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                if "texts" in obj or "images" in obj:
                    return "interleaved"
                if "text" in obj:
                    return "text"
    raise UserError(f"{path}: no usable record (expected JSON lines with 'texts'/'images' lists or a 'text' field)")


# ---------------------------------------------------------------- interleaved and text files


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies inside the folder ``root`` as written (absolute paths and '..' that leave it do not;
    symbolic links inside it are the user's own choice and are followed)."""
    return Path(os.path.normpath(os.path.abspath(path))).is_relative_to(os.path.normpath(os.path.abspath(root)))


def interleaved_records(path: Path, report: SkipReport, allow_outside: bool = False
                        ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(where, [("t", text) | ("i", absolute image path), ...]) per usable record. Image paths must stay inside
    the file's folder (no absolute paths or '..' out of it) unless ``allow_outside``."""
    base = path.parent
    for where, obj in jsonl_records(path, report):
        texts = obj.get("texts") if isinstance(obj, dict) else None
        images = obj.get("images") if isinstance(obj, dict) else None
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            report.add("bad_record", where, "needs 'texts' and 'images' lists of the same length")
            continue
        segs: list[tuple[str, str]] = []
        problem = ""
        for k, (t, im) in enumerate(zip(texts, images)):
            if t is not None and im is not None:
                problem = f"position {k} has both a text and an image"
            elif t is not None:
                if not isinstance(t, str):
                    problem = f"texts[{k}] is not a string"
                elif t and segs and segs[-1][0] == "t":  # consecutive paragraphs
                    segs[-1] = ("t", segs[-1][1] + PARAGRAPH + t)
                elif t:
                    segs.append(("t", t))
            elif im is not None:
                if not isinstance(im, str) or not im.strip():
                    problem = f"images[{k}] is not a path"
                elif not allow_outside and not inside(base / im, base):
                    report.add("outside_data_dir", where, f"images[{k}] {im!r} points outside {base}")
                    problem = "skip"
                else:
                    segs.append(("i", str(base / im)))
            if problem:
                break
        if problem == "skip":
            continue
        if problem:
            report.add("bad_record", where, problem)
        elif not segs:
            report.add("empty", where, "no text and no image")
        else:
            yield where, segs


def text_records(path: Path, report: SkipReport) -> Iterator[tuple[str, str]]:
    """(where, text) per document: a non-blank line of a .txt, a ``{"text": ...}`` line of a .jsonl."""
    if path.suffix == ".txt":
        yield from text_lines(path, report)
        return
    for where, obj in jsonl_records(path, report):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            report.add("bad_record", where, "needs a 'text' string")
        elif not text.strip():
            report.add("empty", where, "empty text")
        else:
            yield where, text


# ---------------------------------------------------------------- imagefolder


def split_root(data: Path, split: str) -> Path:
    """The folder holding ``split``: DIR/split if present, else DIR itself (unless DIR has other splits)."""
    if (data / split).is_dir():
        return data / split
    others = sorted(d.name for d in data.iterdir() if d.is_dir() and d.name in SPLIT_DIRS)
    if others:
        raise UserError(f"{data}: no '{split}' split folder (found: {', '.join(others)}); "
                        f"pick one of them with the split option or point at the folder itself")
    return data


def validation_split(data: Path) -> str:
    """The split a training run validates on: DIR's validation folder (``VALIDATION_DIRS``) when it has one, else
    ``test``. Choosing the run's best model on a validation split leaves the test split's figures unbiased; a
    photos data set's test split holds other photographs, whose captions the model cannot know."""
    for name in VALIDATION_DIRS:
        if (data / name).is_dir():
            return name
    return "test"


def has_images_or_metadata(root: Path) -> bool:
    """Whether ``root`` holds an image file or a metadata file outside hidden folders."""
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_file() and (p.name in METADATA_NAMES or is_image_file(p)):
            return True
    return False


def _metadata_rows(meta: Path, root: Path, text_column: str, report: SkipReport, allow_outside: bool
                   ) -> Iterator[tuple[str, Path, str | None]]:
    """(where, image path, text) per good metadata row; bad rows are counted."""
    rows = _csv_rows(meta, read_file(meta), report) if meta.suffix == ".csv" else jsonl_records(meta, report)
    for where, row in rows:
        item = _check_row(row, meta, where, text_column, report)
        if item is None:
            continue
        if not allow_outside and not inside(item[1], root):
            report.add("outside_data_dir", where, f"file_name points outside {root}")
            continue
        yield item


def _csv_rows(meta: Path, raw: bytes, report: SkipReport):
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
        yield where, row


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


def pair_records(root: Path, text_column: str, report: SkipReport, allow_outside: bool = False
                 ) -> Iterator[tuple[str, Path, str | None]]:
    """(where, image path, caption or None) for every usable metadata row, or every image file without metadata.
    A metadata ``file_name`` must stay inside ``root`` (no absolute paths or '..' out of it) unless
    ``allow_outside``; rows that leave it are skipped and counted as "outside_data_dir"."""
    metas = sorted(p for p in root.rglob("*") if p.name in METADATA_NAMES and p.is_file())
    if metas:
        for meta in metas:
            yield from _metadata_rows(meta, root, text_column, report, allow_outside)
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts):
                yield str(p), p, None
