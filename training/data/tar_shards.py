"""WebDataset tar shards: naming them (brace patterns), reading their image-caption records as a stream.

A source of tar shards is a brace pattern (``shards/{00000..00099}.tar``, also ``{a,b}`` lists, several groups),
one ``.tar`` file, or a directory whose files are ``.tar`` files (no images, no metadata). Every shard a pattern
names must exist: a missing one is an error before anything is read.

A record is the run of consecutive members sharing a key (WebDataset's rule: the member name up to the first dot
of its last path component): one image member (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and its caption,
``KEY.txt`` (UTF-8) or ``KEY.json`` (an object whose text column is the caption). Members are read one after
another with ``tarfile`` in stream mode, never extracted to disk and never all in memory.

Bad input is counted by reason in the ``SkipReport`` (or, strict, raises), as for an imagefolder: a member name
that is absolute or climbs with '..' ("outside_data_dir"; nothing is ever written under that name, but a shard
that holds one was not made for this), a record without an image ("missing"), a caption that is not UTF-8 or not a
JSON object with the text column ("bad_utf8", "bad_json", "bad_record"), an over-long caption or an image member
over ``MAX_IMAGE_MEMBER_BYTES`` ("too_long", "too_large"; neither is read). A shard cut short: cut inside a member,
``tarfile`` fails reading it ("truncated": that record, and the shard ends there); cut on a block boundary,
``tarfile`` sees a normal end, so the shard's last bytes are checked for the end-of-archive marker (two zero
blocks) and the last record, which may be incomplete, is dropped with the shard counted ("truncated_shard").
Images themselves are decoded (and their own damage counted) by whoever uses them.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from earlyfusion.core.errors import UserError

from .records import MAX_LINE_BYTES, MAX_TEXT_CHARS, SkipReport, parse_json

TAR_SUFFIX = ".tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image members, in the order one is chosen when a record has several."""
MAX_IMAGE_MEMBER_BYTES = 256 << 20
"""Largest image member read: far above any photograph a tokenizer needs (its pixels are capped anyway)."""
_BLOCK = tarfile.BLOCKSIZE
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MAX_EXPANDED = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{00000..00003}`` numeric ranges (zero-padded as the first
    bound is), ``{a,b}`` lists; a pattern without braces is itself."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) >= _MAX_EXPANDED:
            raise UserError(f"{pattern}: the range {{{body}}} names over {_MAX_EXPANDED} shards")
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise UserError(f"{pattern}: {{{body}}} is neither a range such as {{00000..00099}} nor a list such as {{a,b}}")
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_tar_source(spec: str) -> bool:
    """Whether ``spec`` (no ``:WEIGHT``) names tar shards: a brace pattern or a path ending in .tar, or a directory
    holding .tar files and nothing an imagefolder has."""
    if "{" in spec and "}" in spec:
        return True
    path = Path(spec).expanduser()
    if path.suffix == TAR_SUFFIX:
        return True
    return path.is_dir() and _tars_in(path) != [] and not any(
        p.is_dir() and not p.name.startswith(".") for p in path.iterdir()) and not any(
        p.is_file() and not p.name.startswith(".") and p.suffix != TAR_SUFFIX for p in path.iterdir())


def _tars_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == TAR_SUFFIX and p.is_file() and not p.name.startswith("."))


def tar_paths(spec: str) -> list[Path]:
    """The shards ``spec`` names (see the module docstring); UserError when one is missing or there are none."""
    path = Path(spec).expanduser()
    if path.is_dir():
        paths = _tars_in(path)
    else:
        paths = [Path(p).expanduser() for p in expand_braces(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"--data {spec}: shard {missing[0]} does not exist{more}; every shard the pattern names must")
    if not paths:
        raise UserError(f"--data {spec}: no .tar shards found")
    return paths


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's way: 'a/b.c.jpg' -> ('a/b', 'c.jpg')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def safe_member_name(name: str) -> bool:
    """A relative name that stays inside the archive: not absolute, no '..' component, no NUL or backslash path."""
    if not name or "\x00" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in PurePosixPath(name.replace("\\", "/")).parts


def _caption(ext: str, data: bytes, where: str, text_column: str, report: SkipReport) -> tuple[bool, str | None]:
    """(ok, caption) of a .txt or .json member; a bad one is counted (ok False)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        report.add("bad_utf8", where, str(e))
        return False, None
    if ext == "json":
        try:
            obj = parse_json(text)
        except ValueError as e:
            report.add("bad_json", where, str(e))
            return False, None
        value = obj.get(text_column) if isinstance(obj, dict) else None
        if value is not None and not isinstance(value, str):
            report.add("bad_record", where, f"{text_column!r} is not a string")
            return False, None
        text = value
    if text is not None and len(text) > MAX_TEXT_CHARS:
        report.add("too_long", where, f"a caption of {len(text)} characters (at most {MAX_TEXT_CHARS})")
        return False, None
    return True, text


class _Record:
    """The members of one key as they are read: the chosen image's bytes, the caption, or why it is unusable."""

    def __init__(self, key: str, where: str):
        self.key, self.where = key, where
        self.images: dict[str, bytes] = {}
        self.caption: str | None = None
        self.bad = False  # already counted

    def finish(self, report: SkipReport) -> tuple[str, bytes, str | None] | None:
        if self.bad:
            return None
        ext = next((e for e in IMAGE_EXTS if e in self.images), None)
        if ext is None:
            report.add("missing", self.where, "no image member (.jpg, .jpeg, .png or .webp) with this key")
            return None
        return f"{self.where}.{ext}", self.images[ext], self.caption


def _has_end_marker(f, end: int) -> bool:
    """Whether the archive's bytes after offset ``end`` (the end of its last member) hold the two zero blocks that
    close a tar archive."""
    f.seek(end)
    tail = f.read(2 * _BLOCK)
    return len(tail) == 2 * _BLOCK and not tail.strip(b"\0")


def read_tar(path: Path, text_column: str, report: SkipReport) -> Iterator[tuple[str, bytes, str | None]]:
    """(where = "shard:key.ext", image bytes, caption or None) for every good record of one shard."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
        except tarfile.TarError as e:
            report.add("truncated_shard", str(path), f"not a tar archive ({e})")
            return
        rec: _Record | None = None
        end = 0
        member = None
        try:
            for member in tf:
                where = f"{path}:{member.name}"
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if not member.isfile():
                    continue
                if not safe_member_name(member.name):
                    report.add("outside_data_dir", where, "a member name that is absolute or climbs out with '..'")
                    continue
                key, ext = split_key(member.name)
                if rec is None or key != rec.key:
                    if rec is not None and (done := rec.finish(report)) is not None:
                        yield done
                    rec = _Record(key, f"{path}:{key}")
                if rec.bad or (ext not in IMAGE_EXTS and ext not in ("txt", "json")):
                    continue
                limit = MAX_IMAGE_MEMBER_BYTES if ext in IMAGE_EXTS else MAX_LINE_BYTES
                if member.size > limit:
                    report.add("too_large" if ext in IMAGE_EXTS else "too_long", where,
                               f"a member of {member.size} bytes (at most {limit} read)")
                    rec.bad = True
                    continue
                data = tf.extractfile(member).read()
                if ext in IMAGE_EXTS:
                    rec.images.setdefault(ext, data)
                else:
                    ok, rec.caption = _caption(ext, data, where, text_column, report)
                    rec.bad = not ok
        except (tarfile.TarError, EOFError, OSError) as e:
            name = f":{member.name}" if member is not None else ""
            report.add("truncated", f"{path}{name}", f"the shard ends inside this member ({e}); it was cut short")
            return
        if not _has_end_marker(f, end):
            report.add("truncated_shard", str(path), "no end-of-archive marker after its last member: the shard was "
                       "cut short, so its last record was dropped")
            return
        if rec is not None and (done := rec.finish(report)) is not None:
            yield done


def tar_records(spec: str, text_column: str, report: SkipReport) -> Iterator[tuple[str, bytes, str | None]]:
    """Every good record of every shard ``spec`` names, in order; bad ones counted."""
    for path in tar_paths(spec):
        yield from read_tar(path, text_column, report)
