"""Reading the records of local files, with bad-input accounting.

Every reader yields the good records and counts every bad one by reason in a ``SkipReport`` (with
``strict`` the first bad one raises a UserError naming file:line instead): malformed JSON, or JSON nested
deeper than the parser's recursion limit ("bad_json"), invalid UTF-8 ("bad_utf8"), records of the wrong
shape ("bad_record"), empty records ("empty"), a file a record names that lies outside the data directory
once symbolic links are followed ("outside_data_dir"), a line of a .jsonl / .txt file over
``MAX_LINE_BYTES`` (1 MiB) or a caption over ``MAX_TEXT_CHARS`` (65,536 characters) ("too_long"). The image
reasons of ``tokenizer.preprocess.ImageError`` ("missing", "empty_file", "not_an_image", "truncated",
"too_large", "unreadable") and the "too_long" of a document that overflows the context are counted by the
code that meets them.

The data is treated as untrusted: a line's length is checked while it is read, before it is decoded or
parsed, so one endless line costs a block of memory and no parsing; and every path a record names (a metadata
``file_name``, an interleaved image, an image found by listing the folder, a metadata file itself) must
resolve inside the data directory, so a link such as ``img.png -> /etc/passwd`` is never opened. Links that
stay inside it are followed.

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
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.preprocess import is_image_file

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
SPLIT_DIRS = ("train", "test", "validation", "valid", "val", "dev", "eval")
VALIDATION_DIRS = ("validation", "valid", "val", "dev")
"""Split folders meant for choosing a model (training's validation), checked in this order."""
PARAGRAPH = "\n\n"  # joins consecutive texts of an interleaved record (OBELICS texts are paragraphs)
MAX_LINE_BYTES = 1 << 20
"""Longest line of a .jsonl / .txt file read (1 MiB); a longer one is skipped as "too_long" unparsed. Far above
a caption record or an OBELICS web document, it bounds the memory and parsing work one line can cost."""
MAX_TEXT_CHARS = 1 << 16
"""Longest caption kept (65,536 characters, dozens of pages; real captions are a few hundred), and longest text
the BPE is trained on: byte-pair training slows down with the square of a text's longest run without spaces, so
one huge text could stall it; longer texts are skipped as "too_long"."""
_BOM = b"\xef\xbb\xbf"
_BLOCK = 1 << 18


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


@dataclass(frozen=True)
class LineRange:
    """Bytes [start, end) of a file, beginning at a line's start, and the number of that line (from 1)."""
    start: int
    end: int
    first_line: int


WHOLE = LineRange(0, -1, 1)  # a whole file (end -1: to its end)


def line_ranges(path: Path, lines: int) -> list[LineRange]:
    """``path`` cut after every ``lines``-th newline: ranges that ``file_lines`` reads one at a time, so that parts
    of a large file can be read apart (by several processes, or again after a kill) without reading what is before
    them. A scan for newlines only: nothing is parsed or kept."""
    out, start, count, pos, line = [], 0, 0, 0, 1
    try:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                at = -1
                while (at := block.find(b"\n", at + 1)) >= 0:
                    count += 1
                    if count == lines:
                        out.append(LineRange(start, pos + at + 1, line))
                        start, line, count = pos + at + 1, line + lines, 0
                pos += len(block)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    if pos > start:
        out.append(LineRange(start, pos, line))
    return out


def file_lines(path: Path, limit: int = MAX_LINE_BYTES, part: LineRange = WHOLE) -> Iterator[bytes | None]:
    """Each line of ``path`` (of its bytes ``part``) without its end (split like ``bytes.splitlines``, a leading
    UTF-8 BOM dropped), or None for a line over ``limit`` bytes. The file is read a block at a time and an over-long
    line is passed over without being kept, so a file of one endless line costs a block of memory, not its size."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    with f:
        buf, over, first = b"", False, part.start == 0
        left = None if part.end < 0 else part.end - part.start
        f.seek(part.start)
        while True:
            try:
                block = f.read(_BLOCK if left is None else min(_BLOCK, left))
            except OSError as e:
                raise UserError(f"{path}: cannot be read ({e})") from None
            if left is not None:
                left -= len(block)
            eof = not block
            buf += block
            if first:
                if len(buf) < len(_BOM) and not eof:
                    continue
                first = False
                if buf.startswith(_BOM):
                    buf = buf[len(_BOM):]
            lines = buf.splitlines(keepends=True)
            buf = b""
            # an unfinished last line waits for the next block, and so does a final "\r" (its "\n" may follow)
            if lines and not eof and not lines[-1].endswith(b"\n"):
                buf = lines.pop()
            for line in lines:
                n = len(line) - (2 if line.endswith(b"\r\n") else 1 if line.endswith((b"\n", b"\r")) else 0)
                yield None if over or n > limit else line[:n]
                over = False
            if eof:
                if over:
                    yield None
                return
            if len(buf) - buf.endswith(b"\r") > limit:
                over, buf = True, b"\r" if buf.endswith(b"\r") else b""


def text_lines(path: Path, report: SkipReport, part: LineRange = WHOLE) -> Iterator[tuple[str, str]]:
    """(where = "path:line", text) per non-blank line (of ``part``); over-long lines and invalid UTF-8 are counted,
    a leading BOM dropped."""
    for lineno, line in enumerate(file_lines(path, part=part), part.first_line):
        where = f"{path}:{lineno}"
        if line is None:
            report.add("too_long", where, f"a line over {MAX_LINE_BYTES} bytes")
            continue
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("bad_utf8", where, str(e))
            continue
        yield where, text


def parse_json(line: str | bytes):
    """The parsed JSON value; ValueError for anything that is not one. ``json`` raises RecursionError on deep
    nesting ('[' * 100000) and a plain ValueError on an integer of over 4300 digits: both are bad lines here."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def jsonl_records(path: Path, report: SkipReport, part: LineRange = WHOLE) -> Iterator[tuple[str, object]]:
    """(where, parsed object) per line (of ``part``); over-long lines, bad UTF-8 and bad JSON are counted."""
    for where, line in text_lines(path, report, part):
        try:
            obj = parse_json(line)
        except ValueError as e:
            report.add("bad_json", where, str(e))
            continue
        yield where, obj


def jsonl_kind(path: Path) -> str:
    """"interleaved" if the first usable record has texts/images, "text" if it has text."""
    for line in file_lines(path):
        if line is None:
            continue
        try:
            obj = parse_json(line)
        except ValueError:  # UnicodeDecodeError included
            continue
        if isinstance(obj, dict):
            if "texts" in obj or "images" in obj:
                return "interleaved"
            if "text" in obj:
                return "text"
    raise UserError(f"{path}: no usable record (expected JSON lines with 'texts'/'images' lists or a 'text' field)")


# ---------------------------------------------------------------- interleaved and text files


class Inside:
    """``Inside(root)(path)``: whether ``path`` lies inside the folder ``root`` once symbolic links are followed (of
    both): an absolute path, a '..' or a link that leads out of it does not, a link to another file inside it
    does. A path that cannot be resolved (a link loop) counts as outside.

    Resolving every path in full costs a system call per folder of it, each record; here each folder is resolved
    once (per reader) and a record costs one ``lstat`` of its own name, resolved in full only when that is a link."""

    _MAX_FOLDERS = 4096  # resolved folders kept; a data set names few, a hostile one cannot grow this

    def __init__(self, root: Path):
        self.real_root = str(root.resolve())
        self._prefix = os.path.join(self.real_root, "")
        self._folders: dict[str, str] = {}

    def __call__(self, path: Path) -> bool:
        try:
            real = self._real(os.fspath(path))
        except (OSError, RuntimeError, ValueError):  # RuntimeError: a link loop (Python < 3.13); ValueError: NUL
            return False
        return real == self.real_root or real.startswith(self._prefix)

    def _real(self, path: str) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return str(Path(path).resolve())
        real_folder = self._folders.get(folder)
        if real_folder is None:
            if len(self._folders) >= self._MAX_FOLDERS:
                self._folders.clear()
            real_folder = self._folders[folder] = os.path.realpath(folder or ".")
        real = os.path.join(real_folder, name)
        try:
            is_link = stat.S_ISLNK(os.lstat(real).st_mode)
        except FileNotFoundError:  # counted as missing by whoever opens it
            return real
        except OSError:  # a loop in its folders, a name too long: resolve decides
            is_link = True
        # Path.resolve, unlike os.path.realpath, raises on a link loop instead of returning it unresolved
        return str(Path(real).resolve()) if is_link else real


def outside_detail(path: Path, root: Path) -> str:
    """Why ``path`` is not inside ``root``: as written, or through a symbolic link (naming where it leads)."""
    if not Path(os.path.normpath(os.path.abspath(path))).is_relative_to(os.path.normpath(os.path.abspath(root))):
        return f"{path} is outside {root}"
    try:
        return f"{path} leads through a symbolic link to {path.resolve()}, outside {root}"
    except (OSError, RuntimeError, ValueError) as e:
        return f"{path} cannot be resolved ({e})"


def interleaved_records(path: Path, report: SkipReport, allow_outside: bool = False, part: LineRange = WHOLE
                        ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(where, [("t", text) | ("i", absolute image path), ...]) per usable record (of ``part``). Image paths must
    stay inside the file's folder (no absolute paths, '..' or symbolic links out of it) unless ``allow_outside``."""
    base = path.parent
    inside = Inside(base)
    for where, obj in jsonl_records(path, report, part):
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
                if not isinstance(im, str) or not im.strip() or "\x00" in im:
                    problem = f"images[{k}] is not a path"
                elif not allow_outside and not inside(base / im):
                    report.add("outside_data_dir", where, f"images[{k}]: {outside_detail(base / im, base)}")
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


def text_records(path: Path, report: SkipReport, part: LineRange = WHOLE) -> Iterator[tuple[str, str]]:
    """(where, text) per document (of ``part``): a non-blank line of a .txt, a ``{"text": ...}`` line of a .jsonl."""
    if path.suffix == ".txt":
        yield from text_lines(path, report, part)
        return
    for where, obj in jsonl_records(path, report, part):
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


def _metadata_rows(meta: Path, root: Path, inside: Inside | None, text_column: str, report: SkipReport
                   ) -> Iterator[tuple[str, Path, str | None]]:
    """(where, image path, text) per good metadata row; bad rows are counted. ``inside`` None: any path."""
    rows = _csv_rows(meta, read_file(meta), report) if meta.suffix == ".csv" else jsonl_records(meta, report)
    for where, row in rows:
        item = _check_row(row, meta, where, text_column, report)
        if item is None:
            continue
        if inside is not None and not inside(item[1]):
            report.add("outside_data_dir", where, f"file_name: {outside_detail(item[1], root)}")
            continue
        yield item


def _csv_rows(meta: Path, raw: bytes, report: SkipReport):
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over csv's own limit (128 Ki characters) or a malformed line
            # the reader has not counted the line it failed on, and goes on after it
            reason = "too_long" if "field larger than field limit" in str(e) else "bad_record"
            report.add(reason, f"{meta}:{reader.line_num + 1}", str(e))
            continue
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
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        report.add("bad_record", where, "no file_name")
        return None
    text = row.get(text_column)
    if text is not None and not isinstance(text, str):
        report.add("bad_record", where, f"{text_column!r} is not a string")
        return None
    if text is not None and len(text) > MAX_TEXT_CHARS:
        report.add("too_long", where, f"a caption of {len(text)} characters (at most {MAX_TEXT_CHARS})")
        return None
    path = meta.parent / name
    return f"{where} ({name})", path, text


def pair_records(root: Path, text_column: str, report: SkipReport, allow_outside: bool = False
                 ) -> Iterator[tuple[str, Path, str | None]]:
    """(where, image path, caption or None) for every usable metadata row, or every image file without metadata.
    Every path (a metadata ``file_name``, a listed image, a metadata file itself) must stay inside ``root`` once
    symbolic links are followed (no absolute paths, '..' or links out of it) unless ``allow_outside``; those that
    leave it are skipped and counted as "outside_data_dir", never opened."""
    inside = None if allow_outside else Inside(root)
    metas = sorted(p for p in root.rglob("*") if p.name in METADATA_NAMES and p.is_file())
    if metas:
        for meta in metas:
            if inside is not None and not inside(meta):
                report.add("outside_data_dir", str(meta), f"metadata file: {outside_detail(meta, root)}")
                continue
            yield from _metadata_rows(meta, root, inside, text_column, report)
    else:
        for p in sorted(root.rglob("*")):
            if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts):
                if inside is not None and not inside(p):
                    report.add("outside_data_dir", str(p), outside_detail(p, root))
                    continue
                yield str(p), p, None
