"""Code shards: a corpus pre-tokenized by its image tokenizer (``earlyfusion encode``), read back by training.

    CODES/
      manifest.json             what the shards hold and how to check them (below)
      shard-000000.safetensors  one per input unit (a tar shard, or --shard-size records of an imagefolder)
      shard-000000.json         the shard's own record (written after it; lets a killed encode skip it)
      .lock                     held by the encode writing the directory

A shard is one safetensors file of 1-d/2-d arrays: ``codes`` (every image's codes in raster order, one after another;
uint16 when the codebook has at most 65,536 codes, else int32, named by the manifest's "codes_dtype"), ``grids``
(I, 2) int32 (each image's code grid: rows, columns), ``text`` (uint8, the text pieces' UTF-8 bytes one after
another) and ``text_offsets`` (P + 1) int64 (piece p is text[off[p]:off[p+1]]). What a record is depends on the
manifest's "kind":

* "pairs" (image-caption pairs): record i is image i and piece i, its caption (empty when it has none);
* "text" and "interleaved" (documents): a fifth array ``image_offsets`` (N + 1) int64 gives record i the images
  [image_offsets[i], image_offsets[i+1]) and, one more than its images, the pieces from image_offsets[i] + i: the
  text before its first image, between each two, and after its last (each possibly empty). A text document is a
  record of no image and one piece.

The codes are the image tokenizer's raw codes, not vocabulary ids, and the text is text: any vocabulary built for
the same image tokenizer reads the same shards.

Checksums, at two grains. Each shard's own record (``shard-*.json``) holds the sha256 of the whole file ("sha256"),
of its index ("index_sha256": the safetensors header, ``grids`` and ``text_offsets``) and of each block of
``block_records`` records ("block_sha256": the block's codes and caption bytes). A reader checks the index when it
opens a shard and each block when it reads it: every byte read is checked, nothing is read only to be checked, and the
first training step costs what its own blocks cost, whatever the size of the corpus. The manifest holds the sha256 of
each shard's record ("record_sha256"), so that a record cannot change either.

manifest.json: "format" ``FORMAT``, "version", "kind" (``KINDS``; "pairs" when absent), "image_tokenizer" (its ``vq_fingerprint``), "codebook_size", "grid"
(the largest code grid), "grid_tokens" (images kept their aspect ratio, for a vocabulary with grid tokens),
"codes_dtype", "block_records", "source", "records" and "skipped" ({reason: count}) in all, "grids" (the distinct code
grids), and per shard "name", "input", "records", "skipped", "bytes", "sha256", "record_sha256", "caption_bytes" and
"longest_caption" (its caption of the most bytes, so that training can check its context holds the longest ones
without reading every shard; documents: "most_image_tokens", the most tokens the image spans of one of its
records take, so that training can check its context holds every document's images).

``CodeSet.open`` reads a directory: the manifest's fields must be there, and every shard must exist with the size the
manifest gives (a stat each, no reading); a shard that changed since is an error when it is read (``ShardReader``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from earlyfusion.core.checkpoint import CheckpointError, load_json, save_json, sha256_file
from earlyfusion.core.errors import UserError

from .files import atomic_file

MANIFEST_FILE = "manifest.json"
FORMAT = "earlyfusion.codes"
VERSION = 1
SHARD_SUFFIX = ".safetensors"
BLOCK_RECORDS = 512
"""Records of a checksummed block; training reads a block at a time (its shuffle window, ``stream``)."""
KINDS = ("pairs", "text", "interleaved")
_FIELDS = ("image_tokenizer", "codebook_size", "grid", "grid_tokens", "codes_dtype", "block_records", "shards")
_SHARD_FIELDS = ("name", "records", "bytes", "sha256", "record_sha256")


def codes_dtype(codebook_size: int) -> np.dtype:
    """The narrowest dtype that holds every raw code of a codebook: uint16 up to 65,536 codes, else int32."""
    return np.dtype(np.uint16) if codebook_size <= 1 << 16 else np.dtype(np.int32)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX}"


def shard_bytes(codes: list[np.ndarray], captions: list[str | None], dtype: np.dtype,
                images_per_record: list[int] | None = None) -> bytes:
    """One shard's file: ``codes`` the (h, w) code grids, ``captions`` the text pieces (None: empty);
    ``images_per_record`` None for pairs, else each document's number of images (the module docstring's layout)."""
    flat = np.concatenate([c.reshape(-1) for c in codes]).astype(dtype) if codes else np.zeros(0, dtype)
    grids = np.asarray([c.shape for c in codes], np.int32).reshape(-1, 2)
    texts = [(t or "").encode("utf-8") for t in captions]
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    text = np.frombuffer(b"".join(texts), np.uint8) if offsets[-1] else np.zeros(0, np.uint8)
    arrays = {"codes": flat, "grids": grids, "text": text, "text_offsets": offsets}
    if images_per_record is not None:
        arrays["image_offsets"] = np.zeros(len(images_per_record) + 1, np.int64)
        np.cumsum(images_per_record, out=arrays["image_offsets"][1:])
    # no header metadata: safetensors writes it in no fixed order, and the same records must give the same bytes
    return save(arrays)


def write_code_shard(out: Path, name: str, codes: list[np.ndarray], captions: list[str | None], record: dict,
                     block_records: int = BLOCK_RECORDS, images_per_record: list[int] | None = None) -> dict:
    """Write shard ``name`` (atomically) and then its own record ``name.json``: ``record`` (what made it; its
    "codes_dtype" the dtype) with the shard's counts, size and checksums. Returns the record written.
    ``images_per_record``: documents (see ``shard_bytes``); None: pairs."""
    path = out / name
    data = shard_bytes(codes, captions, np.dtype(record["codes_dtype"]), images_per_record)
    reader = ShardReader(data, np.dtype(record["codes_dtype"]))
    index, blocks = reader.checksums(block_records)
    with atomic_file(path) as f:
        f.write(data)
    texts = [(t or "").encode("utf-8") for t in captions]
    longest = max(range(len(texts)), key=lambda i: len(texts[i]), default=None)
    record = {**record, "name": name, "records": len(reader), "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "index_sha256": index, "block_records": block_records,
              "block_sha256": blocks, "caption_bytes": sum(map(len, texts)),
              "longest_caption": (captions[longest] or "") if texts else "",
              "grids": sorted({tuple(int(x) for x in c.shape) for c in codes})}
    save_json(path.with_suffix(".json"), record)
    return record


def write_manifest(out: Path, names: list[str], header: dict, skipped: dict | None = None) -> dict:
    """``manifest.json`` of the shards ``names`` (in order) from their own records, with ``header`` (what made them:
    the image tokenizer and its codebook, grid, grid mode, codes dtype, the source) and ``skipped`` (records counted
    as bad outside any shard, e.g. while listing an imagefolder)."""
    shards, counts, grids = [], Counter(skipped or {}), set()
    for name in names:
        rec = load_json((out / name).with_suffix(".json"))
        counts.update(rec.get("skipped") or {})
        grids.update(tuple(g) for g in rec["grids"])
        shards.append({**{k: rec.get(k) for k in ("name", "input", "records", "skipped", "bytes", "sha256",
                                                  "caption_bytes", "longest_caption", "most_image_tokens")
                          if k in rec},
                       "record_sha256": sha256_file((out / name).with_suffix(".json"))})
    manifest = {**header, "format": FORMAT, "version": VERSION, "records": sum(s["records"] for s in shards),
                "skipped": dict(sorted(counts.items())), "grids": [list(g) for g in sorted(grids)], "shards": shards}
    save_json(out / MANIFEST_FILE, manifest)
    return manifest


def is_code_dir(path: Path) -> bool:
    """Whether ``path`` is a directory of code shards (its manifest names the format)."""
    m = path / MANIFEST_FILE
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


_ST_DTYPES = {"U16": np.uint16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
_LAYOUT = {"grids": "I32", "text": "U8", "text_offsets": "I64"}  # and "codes": the manifest's codes dtype


class ShardReader:
    """Random access to the records of one shard: ``read(a, b)`` -> (code grids, captions) of records [a, b).

    ``source``: the file (read with ``pread`` at the offsets its safetensors header gives, never memory-mapped: a
    process holds what it read and nothing else of a shard; a mapping would count every page a long run touched as
    resident), or the shard's bytes. ``checks``: the shard's own record; its index is then checked here and each block
    as it is read (``CheckpointError`` naming the shard on a mismatch)."""

    def __init__(self, source: Path | bytes, dtype: np.dtype, checks: dict | None = None):
        self.path = source if isinstance(source, Path) else "<shard bytes>"
        self._fd, self._data = None, None if isinstance(source, Path) else memoryview(source)
        self._last: tuple = (-1, -1, None, None)  # the blocks read last: (first record, end, codes, text)
        want = {**_LAYOUT, "codes": {"uint16": "U16", "int32": "I32"}[dtype.name]}
        documents = False
        try:
            if self._data is None:
                self._fd = os.open(source, os.O_RDONLY)
            size = os.fstat(self._fd).st_size if self._data is None else len(self._data)
            n = int.from_bytes(self._pread(8, 0), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            head = self._pread(n, 8)
            header = json.loads(head)
            documents = "image_offsets" in header
            if documents:
                want["image_offsets"] = "I64"
            self._where = {}
            for name, st in want.items():
                info = header[name]
                start, end = (int(x) for x in info["data_offsets"])
                count = int(np.prod(info["shape"], dtype=np.int64))
                if info["dtype"] != st or end - start != count * np.dtype(_ST_DTYPES[st]).itemsize or 8 + n + end > size:
                    raise ValueError(f"{name}: {info['dtype']} {info['shape']} at {start}..{end}, expected {st}")
                self._where[name] = (8 + n + start, np.dtype(_ST_DTYPES[st]), count)
            index_raw = [self._raw(k, 0, self._where[k][2]) for k in ("grids", "text_offsets", "image_offsets")
                         if k in self._where]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            self.close()
            raise CheckpointError(f"{self.path}: not a readable code shard ({' '.join(str(e).split())}); it is "
                                  "truncated or corrupted: encode the corpus again") from None
        self.index_sha256 = hashlib.sha256(self._pread(8, 0) + head + b"".join(index_raw)).hexdigest()
        self.checks = checks
        if checks is not None and checks.get("index_sha256") != self.index_sha256:
            self._changed("its index")
        self.documents = documents
        self.grids = np.frombuffer(index_raw[0], np.int32).reshape(-1, 2).astype(np.int64)  # one per image
        self.piece_offsets = np.frombuffer(index_raw[1], np.int64)  # one per text piece, and the end
        image_codes = np.zeros(len(self.grids) + 1, np.int64)
        np.cumsum(self.grids[:, 0] * self.grids[:, 1], out=image_codes[1:])
        # per record: its first image and its first text piece (see the module docstring), then the end
        self.first_image = np.frombuffer(index_raw[2], np.int64) if documents else np.arange(len(self.grids) + 1)
        self.first_piece = self.first_image + np.arange(len(self.first_image)) if documents else self.first_image
        ok = (len(self.first_image) >= 1 and self.first_image[0] == 0 and self.first_image[-1] == len(self.grids)
              and bool((np.diff(self.first_image) >= 0).all()) and image_codes[-1] == self._where["codes"][2]
              and len(self.piece_offsets) == self.first_piece[-1] + 1)
        if not ok:
            self.close()
            raise CheckpointError(f"{self.path}: its arrays do not agree with each other; encode the corpus again")
        # per record: where its codes (elements) and its text (bytes) begin, then the ends
        self.code_offsets = image_codes[self.first_image]
        self.text_offsets = self.piece_offsets[self.first_piece]

    def _changed(self, what: str):
        self.close()
        raise CheckpointError(f"{self.path}: {what} differs from its checksum: the shard changed since it was encoded "
                              "(corrupted or replaced); encode the corpus again")

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset) if self._data is None else bytes(self._data[offset:offset + n])
        if len(data) != n:
            raise ValueError(f"{n} bytes at {offset} run past the end of the file")
        return data

    def _raw(self, name: str, a: int, b: int) -> bytes:
        """The bytes of elements [a, b) of one array."""
        base, dt, _ = self._where[name]
        return self._pread((b - a) * dt.itemsize, base + a * dt.itemsize) if b > a else b""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def __len__(self) -> int:
        return len(self.first_image) - 1

    def _span(self, lo: int, hi: int) -> tuple[bytes, bytes]:
        """(codes bytes, text bytes) of records [lo, hi)."""
        c0, c1, t0, t1 = (int(x) for x in (self.code_offsets[lo], self.code_offsets[hi], self.text_offsets[lo],
                                           self.text_offsets[hi]))
        return self._raw("codes", c0, c1), self._raw("text", t0, t1)

    def checksums(self, size: int) -> tuple[str, list[str]]:
        """(index sha256, sha256 of each block of ``size`` records: its codes' bytes as stored, then its captions')."""
        return self.index_sha256, [hashlib.sha256(b"".join(self._span(lo, min(lo + size, len(self))))).hexdigest()
                                   for lo in range(0, len(self), size)]

    def _check_blocks(self, lo: int, hi: int, size: int, codes_raw: bytes, text_raw: bytes) -> None:
        """Each block of ``size`` records in [lo, hi) (whole blocks) against its checksum."""
        item = self._where["codes"][1].itemsize
        c0, t0 = int(self.code_offsets[lo]), int(self.text_offsets[lo])
        for start in range(lo, hi, size):
            end = min(start + size, hi)
            codes = codes_raw[(int(self.code_offsets[start]) - c0) * item:(int(self.code_offsets[end]) - c0) * item]
            text = text_raw[int(self.text_offsets[start]) - t0:int(self.text_offsets[end]) - t0]
            if hashlib.sha256(codes + text).hexdigest() != self.checks["block_sha256"][start // size]:
                self._changed(f"the block of records {start}..{end - 1}")

    def documents_of(self, a: int, b: int) -> list[tuple[list[np.ndarray], list[str]]]:
        """(code grids, text pieces) of each record in [a, b): a pair's image and caption, a document's images and the
        text before, between and after them."""
        lo, hi, codes_raw, text_raw = self._last
        if not lo <= a <= b <= hi:
            size = self.checks["block_records"] if self.checks is not None else None
            lo, hi = (a // size * size, min(-(-b // size) * size, len(self))) if size else (a, b)
            try:
                codes_raw, text_raw = self._span(lo, hi)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot be read ({e}); it changed since it was opened") from None
            if size:
                self._check_blocks(lo, hi, size, codes_raw, text_raw)
            self._last = (lo, hi, codes_raw, text_raw)
        flat = np.frombuffer(codes_raw, self._where["codes"][1])
        c0, t0 = int(self.code_offsets[lo]), int(self.piece_offsets[self.first_piece[lo]])
        out = []
        for i in range(a, b):
            images, o = [], int(self.code_offsets[i]) - c0
            for g in range(int(self.first_image[i]), int(self.first_image[i + 1])):
                h, w = (int(x) for x in self.grids[g])
                images.append(flat[o:o + h * w].reshape(h, w))
                o += h * w
            texts = [text_raw[int(self.piece_offsets[j]) - t0:int(self.piece_offsets[j + 1]) - t0].decode(
                "utf-8", errors="replace") for j in range(int(self.first_piece[i]), int(self.first_piece[i + 1]))]
            out.append((images, texts))
        return out

    def read(self, a: int, b: int) -> tuple[list[np.ndarray], list[str]]:
        """(code grids, captions) of the pairs [a, b) of a shard of pairs."""
        if self.documents:
            raise CheckpointError(f"{self.path}: holds documents, not image-caption pairs")
        docs = self.documents_of(a, b)
        return [images[0] for images, _ in docs], [texts[0] for _, texts in docs]


@dataclass
class ShardInfo:
    name: str
    records: int
    bytes: int
    sha256: str
    record_sha256: str
    start: int
    """Index of its first record among all records of the directory."""


@dataclass
class CodeSet:
    """A directory of code shards, opened and checked (see the module docstring)."""

    root: Path
    manifest: dict
    shards: list[ShardInfo]

    @classmethod
    def open(cls, root: str | Path) -> CodeSet:
        root = Path(root)
        where = root / MANIFEST_FILE
        try:
            m = load_json(where)
        except CheckpointError as e:
            raise UserError(f"{e}; encode the corpus again") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise UserError(f"{where}: not a code-shard manifest (written by `earlyfusion encode`)")
        if m.get("kind", "pairs") not in KINDS:
            raise UserError(f"{where}: unknown kind of records {m.get('kind')!r} (expected one of {', '.join(KINDS)})")
        if m.get("version") != VERSION:
            raise UserError(f"{where}: version {m.get('version')} of the code-shard format; this earlyfusion reads "
                            f"version {VERSION}: encode the corpus again")
        missing = [k for k in _FIELDS if k not in m]
        entries = m.get("shards")
        if missing or not isinstance(entries, list) or any(
                not isinstance(s, dict) or any(k not in s for k in _SHARD_FIELDS) for s in entries):
            raise UserError(f"{where}: incomplete manifest (missing {', '.join(missing) or 'shard fields'}); encode the "
                            "corpus again")
        shards, start = [], 0
        for s in entries:
            name = str(s["name"])
            if Path(name).name != name or not name.endswith(SHARD_SUFFIX):
                raise UserError(f"{where}: shard name {name!r} is not a file of the directory")
            path = root / name
            try:
                size = path.stat().st_size
            except OSError:
                raise UserError(f"{path}: shard listed in {where} is missing; restore it or encode the corpus "
                                "again") from None
            if size != s["bytes"]:
                raise UserError(f"{path}: {size} bytes, but {where} says {s['bytes']}: the shard changed since it was "
                                "encoded (truncated or replaced); encode the corpus again")
            shards.append(ShardInfo(name, int(s["records"]), int(s["bytes"]), str(s["sha256"]), str(s["record_sha256"]),
                                    start))
            start += int(s["records"])
        return cls(root, m, shards)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def kind(self) -> str:
        """What a record is: "pairs", "text" or "interleaved" (the module docstring)."""
        return str(self.manifest.get("kind", "pairs"))

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["image_tokenizer"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["codes_dtype"])

    @property
    def block_records(self) -> int:
        return int(self.manifest["block_records"])

    @property
    def grids(self) -> list[tuple[int, int]]:
        return sorted({tuple(int(x) for x in g) for g in self.manifest.get("grids") or [self.manifest["grid"]]})

    def identity(self) -> str:
        """A digest of what the shards hold (their checksums and record counts): equal for the same corpus wherever it
        lies."""
        return hashlib.sha256(json.dumps([[s.sha256, s.records] for s in self.shards]).encode()).hexdigest()

    def check_tokenizer(self, fingerprint: str, grid_tokens: bool, where: str) -> None:
        """UserError unless the shards were encoded by the image tokenizer ``fingerprint`` in the grid mode of the
        vocabulary (``grid_tokens``)."""
        if self.fingerprint != fingerprint:
            raise UserError(f"{self.root}: codes of image tokenizer {self.fingerprint[:12]}, but {where} uses "
                            f"{fingerprint[:12]}; encode the corpus with the run's --image-tokenizer")
        if bool(self.manifest["grid_tokens"]) != bool(grid_tokens):
            how = "kept their aspect ratio (encode --grid-tokens)" if self.manifest["grid_tokens"] else \
                "were centre-cropped to squares"
            raise UserError(f"{self.root}: the images {how}, which a vocabulary "
                            f"{'with' if grid_tokens else 'without'} grid tokens cannot read; encode again "
                            f"{'with' if grid_tokens else 'without'} --grid-tokens")

    def reader(self, i: int) -> ShardReader:
        """Shard ``i``, checked against its own record (itself checked against the manifest) as it is read."""
        info = self.shards[i]
        record_path = (self.root / info.name).with_suffix(".json")
        try:
            raw = record_path.read_bytes()
            record = json.loads(raw)
        except (OSError, ValueError):
            raise UserError(f"{record_path}: the shard's record is missing or unreadable; encode the corpus "
                            "again") from None
        if hashlib.sha256(raw).hexdigest() != info.record_sha256 or record.get("block_records") != self.block_records:
            raise UserError(f"{record_path}: differs from its checksum in {self.root / MANIFEST_FILE}: it changed since "
                            "the corpus was encoded; encode the corpus again")
        return ShardReader(self.root / info.name, self.dtype, record)

    def locate(self, record: int) -> tuple[int, int]:
        """(shard index, record within it) of a record's index among all records."""
        starts = [s.start for s in self.shards]
        i = int(np.searchsorted(starts, record, side="right")) - 1
        return i, record - self.shards[i].start
