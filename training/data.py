"""Training data for the unified decoder: sources -> cached image codes -> documents -> packed batches.

Sources (``--data``, each optionally ``SPEC:WEIGHT``)
  * a data directory such as the built-in one (``earlyfusion data shapes``): all of its parts, with
    default weights pairs 0.8 / interleaved 0.1 / text 0.1 (renormalised over the parts present, times
    the source's weight): ``DIR/train`` (or DIR itself) image-caption pairs in the imagefolder layout,
    ``DIR/interleaved.jsonl``, ``DIR/text.jsonl``. ``DIR/test`` is held out (``heldout_pairs``);
  * an interleaved ``.jsonl`` (OBELICS: parallel ``texts`` / ``images`` lists, one of each pair null,
    image paths relative to the file) or a text ``.jsonl`` (``{"text": ...}``) or ``.txt`` (one
    document per non-empty line);
  * a hub data set name (image + text columns -> pairs, text column only -> text documents).
  The mixture weight is the probability that the next document comes from that part.

Image codes are computed once: the images of a source go through ``datasets.Dataset.map`` (batched
VQ-VAE ``encode`` under inference mode) and the result is saved with ``save_to_disk`` under
``cache_dir/codes-<key>``, the key being a hash of (every image path with its size and mtime, the
image tokenizer fingerprint, this pipeline's version). A later run with the same images and image
tokenizer loads it; any change re-encodes. Text is tokenised at load (fast; depends on the vocabulary).

Documents
  * a pair becomes, per draw, ``<s> <boi> codes <eoi> caption </s>`` (reading, ``reading_ratio`` of
    the time) or ``<s> caption <boi> codes <eoi> </s>`` (drawing), the caption dropped for
    ``cond_dropout`` of drawing examples (``<s> <boi> codes <eoi> </s>``: the unconditional case that
    classifier-free guidance needs). A pair without caption is always the unconditional document.
    Without ``reading_image_loss`` a reading example has no loss on its image span (``<boi> codes
    <eoi>`` as targets): it trains only the caption, and unconditional image modelling is left to the
    caption-dropped examples.
  * interleaved records keep their order (consecutive texts joined by a blank line, as the paragraphs
    they are); text records are ``<s> text </s>``.

Too long for the context (T = ``context_len``): a pair's caption is cut to T - (h*w + 4) tokens (both
orders then fit). Other documents: if ``<s>`` plus their image spans alone exceed T the record is
skipped ("too_long"); otherwise text is cut from the end of each text segment in order, keeping room
for every image that follows, and the document ends without ``</s>``. Truncations are counted
(``PreparedData.truncated``); under ``strict`` they are errors.

Bad input is skipped and counted by reason in a ``training.sources.SkipReport`` (with ``strict`` the
first one raises a UserError naming file:line): malformed JSON ("bad_json"), invalid UTF-8
("bad_utf8"), records of the wrong shape ("bad_record"), empty records ("empty"), unusable images
(the ``ImageError`` reasons: "missing", "empty_file", "not_an_image", "truncated", "too_large",
"unreadable"; an interleaved record with one bad image is skipped whole), "too_long".

Packing: rows of exactly T tokens hold whole documents (an image span is never split: documents are
never split at all); each row is filled first-fit from a look-ahead of the next 16 documents of the
stream, so little is padding. Separation: positions restart at 0 in every document and ``doc_ids``
let the decoder attend only within the document (block-diagonal causal mask), so packing changes
nothing a document sees: a packed row trains exactly like separate unpadded rows, and no document
conditions on an unrelated predecessor (which would teach the model to continue one caption with the
next image). The last token of a document has no target (its "next token" is the next document's
``<s>``), padding has target -100, doc id -1 and modality -1.

Batches (``PackedBatches``) are dicts of (B, T) tensors: tokens, targets (-100 = no loss), positions,
doc_ids (int64) and modality (int8: 0 text, 1 image code or ``<eoi>``, -1 no target) of the target
token. All randomness (mixture choice, reading/drawing, condition dropout, epoch shuffles) comes from
one seeded ``torch.Generator`` plus per-(part, epoch) permutation seeds; ``state_dict()`` is plain
JSON, and a fresh ``PackedBatches`` given it continues with identical batches. Every process builds
the same global batch; ``sharded(rank, world)`` yields one process's rows of it.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from earlyfusion.errors import UserError
from earlyfusion.tokenizer.preprocess import ImageError, is_image_file, preprocess, to_pil
from earlyfusion.logs import is_main_process, log
from earlyfusion.training.sources import METADATA_NAMES, SkipReport, _load_hub, _local_records, _split_root

PIPELINE_VERSION = 1
DEFAULT_PART_WEIGHTS = {"pairs": 0.8, "interleaved": 0.1, "text": 0.1}
INTERLEAVED_FILE = "interleaved.jsonl"
TEXT_FILES = ("text.jsonl", "text.txt")
LOOKAHEAD = 16
ENCODE_BATCH = 256
TEXT, IMAGE, NO_TARGET = 0, 1, -1
IGNORE = -100
READ, DRAW, UNCOND = 0, 1, 2  # the three documents a pair can become
PARAGRAPH = "\n\n"  # joins consecutive texts of an interleaved record (OBELICS texts are paragraphs)

Kind = Literal["pairs", "interleaved", "text"]


# ---------------------------------------------------------------- options


@dataclass
class DataConfig:
    sources: list[str]
    """Data sources, each optionally SPEC:WEIGHT (see the module docstring)."""
    context_len: int = 256
    """Packed row length T."""
    batch_size: int = 32
    """Rows per global batch."""
    reading_ratio: float = 0.5
    """Fraction of image-caption pairs shown image->caption; the rest caption->image."""
    cond_dropout: float = 0.1
    """Fraction of caption->image examples whose caption is dropped."""
    reading_image_loss: bool = True
    """Also train on the image codes of a reading (image -> caption) example, not only on its caption."""
    seed: int = 0
    """Seed of every random choice of the data stream."""
    strict: bool = False
    """Raise on the first bad record (or truncation) instead of skipping and counting it."""
    cache_dir: str | None = None
    """Image-code cache; None = <first local source>/.earlyfusion-cache."""
    image_column: str = "image"
    """Image column of hub data sets."""
    text_column: str = "text"
    """Text column of hub data sets and imagefolder metadata."""
    split: str = "train"
    """Split used for training."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError("no data sources given")
        if self.context_len < 4 or self.batch_size < 1:
            raise ValueError(f"context_len must be >= 4 and batch_size >= 1 (got {self.context_len}, {self.batch_size})")
        if not 0.0 <= self.reading_ratio <= 1.0 or not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError("reading_ratio must be in [0, 1] and cond_dropout in [0, 1)")


# ---------------------------------------------------------------- source specs


@dataclass
class PartSpec:
    kind: Kind
    location: str
    """An imagefolder root, a .jsonl/.txt file or a hub name."""
    weight: float
    source: str
    """The --data entry it came from (one image cache per entry)."""
    hub: bool = False


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


def _has_images_or_metadata(root: Path) -> bool:
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_file() and (p.name in METADATA_NAMES or is_image_file(p)):
            return True
    return False


def _jsonl_kind(path: Path) -> Kind:
    """interleaved if the first usable record has texts/images, text if it has text."""
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


def resolve_sources(sources: Sequence[str], split: str = "train") -> list[PartSpec]:
    parts: list[PartSpec] = []
    for spec in sources:
        name, weight = parse_source(spec)
        w = 1.0 if weight is None else weight
        path = Path(name).expanduser()
        if path.is_dir():
            found: list[tuple[Kind, str]] = []
            try:
                root = _split_root(path, split)
            except UserError:
                root = None
            if root is not None and _has_images_or_metadata(root):
                found.append(("pairs", str(root)))
            if (path / INTERLEAVED_FILE).is_file():
                found.append(("interleaved", str(path / INTERLEAVED_FILE)))
            text_file = next((path / t for t in TEXT_FILES if (path / t).is_file()), None)
            if text_file is not None:
                found.append(("text", str(text_file)))
            if not found:
                raise UserError(f"--data {name}: no training data found (expected a '{split}' imagefolder or images + "
                                f"metadata.jsonl, {INTERLEAVED_FILE} or {TEXT_FILES[0]})")
            total = sum(DEFAULT_PART_WEIGHTS[k] for k, _ in found)
            parts += [PartSpec(k, loc, w * DEFAULT_PART_WEIGHTS[k] / total, spec) for k, loc in found]
        elif path.is_file():
            if path.suffix == ".txt":
                parts.append(PartSpec("text", str(path), w, spec))
            elif path.suffix == ".jsonl":
                parts.append(PartSpec(_jsonl_kind(path), str(path), w, spec))
            else:
                raise UserError(f"--data {name}: unsupported file type (give a directory, a .jsonl or a .txt file)")
        elif _looks_like_path(name):
            raise UserError(f"--data {name}: no such file or directory")
        else:
            parts.append(PartSpec("pairs", name, w, spec, hub=True))
    return parts


# ---------------------------------------------------------------- reading records (no images yet)


def _read_lines(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e})") from None


def _jsonl_records(path: Path, report: SkipReport) -> Iterator[tuple[str, object]]:
    """(where, parsed object) per line; bad UTF-8 and bad JSON are counted. A UTF-8 BOM is accepted."""
    raw = _read_lines(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            report.add("bad_utf8", where, str(e))
            continue
        try:
            yield where, json.loads(s)
        except json.JSONDecodeError as e:
            report.add("bad_json", where, str(e))


def _interleaved_records(path: Path, report: SkipReport) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(where, [("t", text) | ("i", absolute image path), ...]) per usable record."""
    base = path.parent
    for where, obj in _jsonl_records(path, report):
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
                else:
                    segs.append(("i", str(base / im)))
            if problem:
                break
        if problem:
            report.add("bad_record", where, problem)
        elif not segs:
            report.add("empty", where, "no text and no image")
        else:
            yield where, segs


def _text_records(path: Path, report: SkipReport) -> Iterator[tuple[str, str]]:
    if path.suffix == ".txt":
        raw = _read_lines(path)
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, line.decode("utf-8")
            except UnicodeDecodeError as e:
                report.add("bad_utf8", where, str(e))
        return
    for where, obj in _jsonl_records(path, report):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            report.add("bad_record", where, "needs a 'text' string")
        elif not text.strip():
            report.add("empty", where, "empty text")
        else:
            yield where, text


def _pair_records(root: str, text_column: str, report: SkipReport) -> list[tuple[str, str, str | None]]:
    """(where, image path, caption or None) for every usable metadata row / image file."""
    return [(where, str(path), text) for where, path, text in _local_records(Path(root), text_column, report)]


def _hub_dataset(name: str, split: str):
    import datasets

    ds = _load_hub(name, split)
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - load_dataset with split gives a Dataset
        ds = ds[split]
    return ds


def iter_texts(sources: Sequence[str], report: SkipReport | None = None, split: str = "train",
               text_column: str = "text") -> Iterator[str]:
    """Every text of the training parts (captions, interleaved texts, text documents), for the BPE."""
    report = report if report is not None else SkipReport()
    for part in resolve_sources(sources, split):
        if part.hub:
            ds = _hub_dataset(part.location, split)
            texts = [t for t in ds[text_column] if isinstance(t, str) and t] if text_column in ds.column_names else []
        elif part.kind == "pairs":
            texts = [t for _, _, t in _pair_records(part.location, text_column, report) if t]
        elif part.kind == "interleaved":
            recs = list(_interleaved_records(Path(part.location), report))
            report.ok(len(recs))
            yield from (x for _, segs in recs for k, x in segs if k == "t")
            continue
        else:
            texts = [t for _, t in _text_records(Path(part.location), report)]
        report.ok(len(texts))
        yield from texts


# ---------------------------------------------------------------- image codes, cached


@dataclass
class ImageTable:
    """Codes of a set of images: row i <-> ``srcs[i]``; ``reasons[i]`` is "" or why the image is unusable."""

    srcs: list[str]
    codes: np.ndarray  # (N, h*w) int32
    reasons: list[str]
    cache_hit: bool = False
    seconds: float = 0.0

    def __post_init__(self):
        self.index = {s: i for i, s in enumerate(self.srcs)}


class _ImageEncoder:
    """The batched function given to ``datasets.map``: image sources -> codes, or the reason they failed."""

    def __init__(self, image_tokenizer: str | Path, strict: bool):
        self.image_tokenizer = image_tokenizer
        self.strict = strict
        self._vq = None

    @property
    def vq(self):
        if self._vq is None:
            from earlyfusion.tokenizer.vqvae import load_vqvae

            self._vq = load_vqvae(self.image_tokenizer)
        return self._vq

    def __call__(self, batch: dict) -> dict:
        vq = self.vq
        size = vq.cfg.image_size
        n_codes = vq.cfg.tokens_per_image
        srcs, wheres = batch["src"], batch["where"]
        reasons = [""] * len(srcs)
        pixels, ok = [], []
        for i, (src, where) in enumerate(zip(srcs, wheres)):
            if isinstance(src, dict):  # hub image column read with decode=False
                src = src["bytes"] if src.get("bytes") is not None else src.get("path")
            try:
                if src is None:
                    raise ImageError("missing", where, "no image")
                pixels.append(preprocess(src, size))  # (3, S, S) in [-1, 1]
                ok.append(i)
            except ImageError as e:
                if self.strict:
                    raise UserError(f"{where}: bad record ({e}); fix or remove it, or run without --strict") from None
                reasons[i] = e.reason
        codes = np.zeros((len(srcs), n_codes), np.int32)
        if pixels:
            with torch.inference_mode():
                c = vq.encode(torch.stack(pixels))  # (b, h, w)
            codes[ok] = c.reshape(len(ok), -1).to(torch.int32).numpy()
        return {"codes": codes, "reason": reasons}


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so that several processes (accelerate launch) encode a source only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - no flock: processes may both encode
            pass
        yield


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own progress bars follow our rule: terminal and main process only."""
    import datasets

    show = is_main_process() and sys.stderr.isatty()
    was = datasets.is_progress_bar_enabled()
    if was and not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not show:
            datasets.enable_progress_bars()


def _stat_key(paths: Sequence[str]) -> list:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([p, None, None])
    return out


def encode_images(ds, key: str, image_tokenizer: str | Path, cache_root: Path, strict: bool = False,
                  desc: str = "encoding images") -> tuple[object, bool]:
    """``ds`` (columns src, where) -> the same rows with ``codes`` and ``reason``, from the cache if present."""
    import datasets

    name = f"codes-{key[:32]}"
    target = cache_root / name
    if target.is_dir():
        try:
            return datasets.load_from_disk(str(target)), True
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("image-code cache %s is unreadable (%s); re-encoding", target, e)
            shutil.rmtree(target, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_root / f"{name}.lock"):
        if target.is_dir():  # another process finished it while we waited
            return datasets.load_from_disk(str(target)), True
        encoder = _ImageEncoder(image_tokenizer, strict)
        h, w = encoder.vq.cfg.grid_size
        features = ds.features.copy()
        features["codes"] = datasets.List(datasets.Value("int32"), length=h * w)
        features["reason"] = datasets.Value("string")
        with _quiet_datasets():
            out = ds.map(encoder, batched=True, batch_size=ENCODE_BATCH, features=features, new_fingerprint=key[:32],
                         desc=desc)
        tmp = cache_root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_datasets():
            out.save_to_disk(str(tmp))
        os.replace(tmp, target)
    return out, False


def _table_from(ds, srcs: list[str], hit: bool, seconds: float) -> ImageTable:
    if not len(ds):
        return ImageTable([], np.zeros((0, 0), np.int32), [], cache_hit=hit, seconds=seconds)
    data = ds.with_format("numpy")[:]
    codes = np.asarray(data["codes"], dtype=np.int32).reshape(len(srcs), -1)
    reasons = [str(r) for r in data["reason"]]
    return ImageTable(srcs, codes, reasons, cache_hit=hit, seconds=seconds)


def local_image_table(paths: Sequence[str], wheres: Sequence[str], image_tokenizer: str | Path, vq_fp: str,
                      cache_root: Path, strict: bool = False) -> ImageTable:
    """Codes for local image files (deduplicated by path), cached by (paths, sizes, mtimes, tokenizer)."""
    import datasets

    t0 = time.perf_counter()
    srcs = list(dict.fromkeys(paths))
    if not srcs:
        return ImageTable([], np.zeros((0, 0), np.int32), [], cache_hit=True)
    first_where = {}
    for p, w in zip(paths, wheres):
        first_where.setdefault(p, w)
    key = hashlib.sha256(json.dumps([PIPELINE_VERSION, vq_fp, _stat_key(srcs)]).encode()).hexdigest()
    ds = datasets.Dataset.from_dict({"src": srcs, "where": [first_where[s] for s in srcs]})
    out, hit = encode_images(ds, key, image_tokenizer, cache_root, strict)
    if list(out["src"]) != srcs:  # a hash collision or a hand-edited cache: never use wrong codes
        raise UserError(f"{cache_root}: image-code cache entry does not match the data; delete the cache directory")
    return _table_from(out, srcs, hit, time.perf_counter() - t0)


# ---------------------------------------------------------------- prepared parts


@dataclass
class Part:
    """One part of the mixture, ready to sample: pairs (codes + caption ids) or whole documents."""

    kind: Kind
    name: str
    weight: float
    codes: np.ndarray | None = None  # pairs: (N, h*w) int32
    captions: list[np.ndarray] = field(default_factory=list)  # pairs: caption text ids (may be empty)
    docs: list[np.ndarray] = field(default_factory=list)  # interleaved/text: document ids (int32)

    def __len__(self) -> int:
        return len(self.codes) if self.kind == "pairs" else len(self.docs)


@dataclass
class PreparedData:
    parts: list[Part]
    report: SkipReport
    truncated: Counter
    """Documents cut to the context, by part kind."""
    images_cached: int = 0
    images_encoded: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{len(p)} {p.kind} ({p.weight:.2f})" for p in self.parts)
        trunc = sum(self.truncated.values())
        return (f"data: {parts}; images {self.images_cached} cached + {self.images_encoded} encoded; "
                f"{self.report.summary()}" + (f"; {trunc} truncated to the context" if trunc else "")
                + f"; {self.seconds:.1f}s")


def default_cache_dir(sources: Sequence[str]) -> Path:
    for spec in sources:
        p = Path(parse_source(spec)[0]).expanduser()
        if p.exists():
            d = (p if p.is_dir() else p.parent) / ".earlyfusion-cache"
            if os.access(d if d.exists() else d.parent, os.W_OK):
                return d
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "earlyfusion"


def _check_tokenizers(vocab, image_tokenizer: str | Path) -> str:
    from earlyfusion.tokenizer.vqvae import read_vq_config, vq_fingerprint

    fp = vq_fingerprint(image_tokenizer)
    if vocab.layout.image_tokenizer_fingerprint != fp:
        raise UserError(f"the vocabulary was built for image tokenizer {vocab.layout.image_tokenizer_fingerprint[:12]} "
                        f"but {image_tokenizer} is {fp[:12]}; rebuild it with "
                        f"`earlyfusion vocab build --image-tokenizer {image_tokenizer}`")
    grid = read_vq_config(image_tokenizer).grid_size
    if tuple(grid) != tuple(vocab.grid):
        raise UserError(f"{image_tokenizer}: code grid {grid} differs from the vocabulary's {vocab.grid}")
    return fp


class _Builder:
    """Turns records into id arrays with the truncation rules of the module docstring."""

    def __init__(self, vocab, context_len: int, strict: bool):
        self.v = vocab
        self.T = context_len
        self.strict = strict
        self.span = vocab.tokens_per_image + 2
        self.truncated: Counter = Counter()

    def note_truncated(self, kind: str, where: str, detail: str) -> None:
        if self.strict:
            raise UserError(f"{where}: {detail} (longer than --context-len {self.T}); shorten it, raise the context "
                            "length, or run without --strict to truncate and count")
        self.truncated[kind] += 1

    def caption(self, ids: list[int], where: str) -> np.ndarray:
        cap = self.T - (self.span + 2)
        if len(ids) > cap:
            self.note_truncated("pairs", where, f"caption of {len(ids)} tokens")
            ids = ids[:cap]
        return np.asarray(ids, np.int32)

    def document(self, pieces: list[tuple[str, object]], where: str, kind: str, report: SkipReport) -> np.ndarray | None:
        """pieces: ("t", text ids) | ("i", codes (h*w,)) -> document ids, or None if skipped."""
        v = self.v
        n_img = sum(k == "i" for k, _ in pieces)
        n_text = sum(len(x) for k, x in pieces if k == "t")
        budget = None
        if 2 + n_img * self.span + n_text > self.T:
            need = 1 + n_img * self.span
            if need > self.T:
                report.add("too_long", where, f"{n_img} image(s) need {need} tokens > --context-len {self.T}")
                return None
            budget = self.T - need
            self.note_truncated(kind, where, f"document of {2 + n_img * self.span + n_text} tokens")
        out: list[np.ndarray] = [np.asarray([v.bos], np.int32)]
        for k, x in pieces:
            if k == "t":
                if budget is not None:
                    x = x[:budget]
                    budget -= len(x)
                out.append(np.asarray(x, np.int32))
            else:
                out.append(np.concatenate([[v.boi], np.asarray(x, np.int64) + v.image_start, [v.eoi]]).astype(np.int32))
        if budget is None:
            out.append(np.asarray([v.eos], np.int32))
        return np.concatenate(out)


def prepare(cfg: DataConfig, vocab, image_tokenizer: str | Path) -> PreparedData:
    """Read every source, encode (or load cached) image codes, tokenise text: the mixture parts."""
    t0 = time.perf_counter()
    report = SkipReport(strict=cfg.strict)
    specs = resolve_sources(cfg.sources, cfg.split)
    has_images = any(s.kind in ("pairs", "interleaved") for s in specs)
    vq_fp = _check_tokenizers(vocab, image_tokenizer) if has_images else ""
    if has_images and cfg.context_len < vocab.tokens_per_image + 4:
        raise UserError(f"--context-len {cfg.context_len} cannot hold one image document "
                        f"(<s> <boi> {vocab.tokens_per_image} codes <eoi> </s> = {vocab.tokens_per_image + 4} tokens)")
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg.sources)
    builder = _Builder(vocab, cfg.context_len, cfg.strict)
    parts: list[Part] = []
    cached = encoded = 0

    # records of every part; local images of one --data entry share one cached table
    records: list[tuple[PartSpec, list]] = []
    images_by_source: dict[str, tuple[list[str], list[str]]] = {}
    for spec in specs:
        if spec.hub:
            records.append((spec, []))
            continue
        if spec.kind == "pairs":
            recs = _pair_records(spec.location, cfg.text_column, report)
            paths, wheres = images_by_source.setdefault(spec.source, ([], []))
            paths += [p for _, p, _ in recs]
            wheres += [w for w, _, _ in recs]
        elif spec.kind == "interleaved":
            recs = list(_interleaved_records(Path(spec.location), report))
            paths, wheres = images_by_source.setdefault(spec.source, ([], []))
            for where, segs in recs:
                for k, x in segs:
                    if k == "i":
                        paths.append(x)
                        wheres.append(where)
        else:
            recs = list(_text_records(Path(spec.location), report))
        records.append((spec, recs))

    tables: dict[str, ImageTable] = {}
    for source, (paths, wheres) in images_by_source.items():
        table = local_image_table(paths, wheres, image_tokenizer, vq_fp, cache_root, cfg.strict)
        tables[source] = table
        cached += len(table.srcs) if table.cache_hit else 0
        encoded += 0 if table.cache_hit else len(table.srcs)
        log.info("%s: %d images %s in %.1fs", source, len(table.srcs),
                 "loaded from the code cache" if table.cache_hit else "encoded", table.seconds)

    for spec, recs in records:
        if spec.hub:
            part, n_new, n_old = _hub_part(spec, cfg, vocab, image_tokenizer, vq_fp, cache_root, builder, report)
            encoded += n_new
            cached += n_old
        elif spec.kind == "pairs":
            part = _pairs_part(spec, recs, tables[spec.source], vocab, builder, report)
        elif spec.kind == "interleaved":
            part = _interleaved_part(spec, recs, tables[spec.source], vocab, builder, report)
        else:
            texts = vocab.encode_texts([t for _, t in recs])
            docs = [builder.document([("t", ids)], where, "text", report) for (where, _), ids in zip(recs, texts)]
            part = Part("text", spec.location, spec.weight, docs=[d for d in docs if d is not None])
            report.ok(len(part.docs))
        if len(part) == 0:
            log.warning("%s: no usable records; left out of the mixture", spec.location)
            continue
        parts.append(part)
    if not parts:
        raise UserError(f"--data {' '.join(cfg.sources)}: no usable records at all ({report.summary()})")
    data = PreparedData(parts, report, builder.truncated, cached, encoded, time.perf_counter() - t0)
    if report.total:
        for reason, examples in sorted(report.examples.items()):
            log.warning("skipped %d record(s) (%s), e.g. %s", report.counts[reason], reason, examples[0])
    log.info("%s", data.summary())
    return data


def _pairs_part(spec: PartSpec, recs, table: ImageTable, vocab, builder: _Builder, report: SkipReport) -> Part:
    rows, caps = [], []
    good = []
    for where, path, text in recs:
        row = table.index[path]
        reason = table.reasons[row]
        if reason:
            report.add(reason, where)
            continue
        good.append((where, row, text if text and text.strip() else ""))
    ids = vocab.encode_texts([t for _, _, t in good])
    for (where, row, _), cap in zip(good, ids):
        rows.append(row)
        caps.append(builder.caption(cap, where))
    report.ok(len(rows))
    codes = table.codes[np.asarray(rows, np.int64)] if rows else np.zeros((0, vocab.tokens_per_image), np.int32)
    return Part("pairs", spec.location, spec.weight, codes=codes, captions=caps)


def _interleaved_part(spec: PartSpec, recs, table: ImageTable, vocab, builder: _Builder, report: SkipReport) -> Part:
    good = []
    for where, segs in recs:
        bad = next(((k, table.reasons[table.index[x]]) for k, (kind, x) in enumerate(segs)
                    if kind == "i" and table.reasons[table.index[x]]), None)
        if bad is not None:
            report.add(bad[1], f"{where} (segment {bad[0]}: {segs[bad[0]][1]})")
            continue
        good.append((where, segs))
    flat = [x for _, segs in good for k, x in segs if k == "t"]
    encoded = iter(vocab.encode_texts(flat))
    docs = []
    for where, segs in good:
        pieces = [("t", next(encoded)) if k == "t" else ("i", table.codes[table.index[x]]) for k, x in segs]
        d = builder.document(pieces, where, "interleaved", report)
        if d is not None:
            docs.append(d)
    report.ok(len(docs))
    return Part("interleaved", spec.location, spec.weight, docs=docs)


def _hub_part(spec: PartSpec, cfg: DataConfig, vocab, image_tokenizer, vq_fp: str, cache_root: Path,
              builder: _Builder, report: SkipReport) -> tuple[Part, int, int]:
    """A hub data set: pairs if it has the image column, else text documents from the text column."""
    import datasets

    ds = _hub_dataset(spec.location, cfg.split)
    cols = ds.column_names
    texts = [t if isinstance(t, str) else None for t in ds[cfg.text_column]] if cfg.text_column in cols else [None] * len(ds)
    if cfg.image_column not in cols:
        if cfg.text_column not in cols:
            raise UserError(f"{spec.location}: neither image column {cfg.image_column!r} nor text column "
                            f"{cfg.text_column!r} (columns: {', '.join(cols)})")
        recs = [(f"{spec.location}[{i}]", t) for i, t in enumerate(texts)]
        ok = [(w, t) for w, t in recs if t and t.strip()]
        for w, t in recs:
            if not (t and t.strip()):
                report.add("empty", w)
        docs = [builder.document([("t", ids)], w, "text", report) for (w, _), ids in zip(ok, vocab.encode_texts([t for _, t in ok]))]
        docs = [d for d in docs if d is not None]
        report.ok(len(docs))
        return Part("text", spec.location, spec.weight, docs=docs), 0, 0
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    wheres = [f"{spec.location}[{i}]" for i in range(len(ds))]
    srcs = ds.select_columns([cfg.image_column]).rename_column(cfg.image_column, "src").add_column("where", wheres)
    key = hashlib.sha256(json.dumps([PIPELINE_VERSION, vq_fp, ds._fingerprint, cfg.image_column, cfg.split]).encode()).hexdigest()
    t0 = time.perf_counter()
    out, hit = encode_images(srcs, key, image_tokenizer, cache_root, cfg.strict)
    table = _table_from(out.remove_columns(["src"]), wheres, hit, time.perf_counter() - t0)
    recs = [(w, w, t) for w, t in zip(wheres, texts)]
    part = _pairs_part(spec, recs, table, vocab, builder, report)
    return part, 0 if hit else len(ds), len(ds) if hit else 0


# ---------------------------------------------------------------- the batch stream


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class PackedBatches:
    """Infinite iterator of packed global batches (see the module docstring); exact resume via state_dict."""

    def __init__(self, data: PreparedData, vocab, *, context_len: int, batch_size: int, reading_ratio: float = 0.5,
                 cond_dropout: float = 0.1, reading_image_loss: bool = True, seed: int = 0):
        self.data = data
        self.vocab = vocab
        self.T = context_len
        self.B = batch_size
        self.reading_ratio = reading_ratio
        self.cond_dropout = cond_dropout
        self.reading_image_loss = reading_image_loss
        self.seed = seed
        w = np.asarray([p.weight for p in data.parts], np.float64)
        self._cum = list(np.cumsum(w / w.sum()))
        for p in data.parts:
            longest = max((len(d) for d in p.docs), default=0) if p.kind != "pairs" else \
                max((len(c) for c in p.captions), default=0) + vocab.tokens_per_image + 4
            if longest > context_len:
                raise ValueError(f"{p.name}: a document of {longest} tokens exceeds context_len {context_len}; "
                                 "prepare the data with the same context length")
        self._gen = torch.Generator().manual_seed(seed)
        self._epoch = [0] * len(data.parts)
        self._pos = [0] * len(data.parts)
        self._perm: list[list[int] | None] = [None] * len(data.parts)
        self._pending: list[tuple[tuple[int, int, int], np.ndarray]] = []
        self.batches = 0

    @classmethod
    def from_config(cls, cfg: DataConfig, vocab, image_tokenizer: str | Path) -> PackedBatches:
        data = prepare(cfg, vocab, image_tokenizer)
        return cls(data, vocab, context_len=cfg.context_len, batch_size=cfg.batch_size, reading_ratio=cfg.reading_ratio,
                   cond_dropout=cfg.cond_dropout, reading_image_loss=cfg.reading_image_loss, seed=cfg.seed)

    @property
    def report(self) -> SkipReport:
        return self.data.report

    # ------------------------------------------------------------ documents
    def _take(self, p: int) -> int:
        n = len(self.data.parts[p])
        if self._pos[p] >= n:
            self._epoch[p] += 1
            self._pos[p] = 0
            self._perm[p] = None
        if self._perm[p] is None:
            g = torch.Generator().manual_seed(_seed_for(self.seed, "perm", p, self._epoch[p]))
            self._perm[p] = torch.randperm(n, generator=g).tolist()
        item = self._perm[p][self._pos[p]]
        self._pos[p] += 1
        return item

    def _document(self, p: int, item: int, variant: int) -> np.ndarray:
        part, v = self.data.parts[p], self.vocab
        if part.kind != "pairs":
            return part.docs[item]
        img = np.concatenate([[v.boi], part.codes[item].astype(np.int64) + v.image_start, [v.eoi]])
        cap = part.captions[item]
        if variant == READ:
            seq = [[v.bos], img, cap, [v.eos]]
        elif variant == DRAW:
            seq = [[v.bos], cap, img, [v.eos]]
        else:
            seq = [[v.bos], img, [v.eos]]
        return np.concatenate([np.asarray(s, np.int64) for s in seq])

    def _draw(self) -> tuple[tuple[int, int, int], np.ndarray]:
        r0, r1, r2 = torch.rand(3, generator=self._gen, dtype=torch.float64).tolist()
        p = min(bisect.bisect_right(self._cum, r0), len(self._cum) - 1)
        item = self._take(p)
        variant = READ
        part = self.data.parts[p]
        if part.kind == "pairs":
            if len(part.captions[item]) == 0:
                variant = UNCOND
            elif r1 < self.reading_ratio:
                variant = READ
            else:
                variant = UNCOND if r2 < self.cond_dropout else DRAW
        desc = (p, item, variant)
        return desc, self._document(*desc)

    def _untrained_prefix(self, desc: tuple[int, int, int]) -> int:
        """How many leading targets of the document get no loss: the image span of a reading example without
        ``reading_image_loss`` (<s> predicts <boi>, ..., the last code predicts <eoi>), else none."""
        p, _, variant = desc
        if variant == READ and not self.reading_image_loss and self.data.parts[p].kind == "pairs":
            return self.vocab.tokens_per_image + 2
        return 0

    def _row(self) -> list[tuple[tuple[int, int, int], np.ndarray]]:
        row, room = [], self.T
        while room >= 2:
            while len(self._pending) < LOOKAHEAD:
                self._pending.append(self._draw())
            i = next((i for i, (_, d) in enumerate(self._pending) if len(d) <= room), None)
            if i is None:
                break
            row.append(self._pending.pop(i))
            room -= len(row[-1][1])
        return row

    # ------------------------------------------------------------ batches
    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, T, v = self.B, self.T, self.vocab
        tokens = torch.full((B, T), v.pad, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        doc_ids = torch.full((B, T), -1, dtype=torch.long)
        for r in range(B):
            o = 0
            for k, (desc, doc) in enumerate(self._row()):
                n = len(doc)
                t = torch.from_numpy(doc.astype(np.int64))
                tokens[r, o:o + n] = t
                targets[r, o:o + n - 1] = t[1:]
                targets[r, o:o + self._untrained_prefix(desc)] = IGNORE
                positions[r, o:o + n] = torch.arange(n)
                doc_ids[r, o:o + n] = k
                o += n
            positions[r, o:] = torch.arange(T - o)
        is_image = ((targets >= v.image_start) & (targets < v.image_start + v.codebook_size)) | (targets == v.eoi)
        modality = torch.where(targets == IGNORE, NO_TARGET, torch.where(is_image, IMAGE, TEXT)).to(torch.int8)
        self.batches += 1
        return {"tokens": tokens, "targets": targets, "positions": positions, "doc_ids": doc_ids, "modality": modality}

    def sharded(self, rank: int, world: int) -> ShardedBatches:
        return ShardedBatches(self, rank, world)

    # ------------------------------------------------------------ exact resume
    def _signature(self) -> str:
        sig = [PIPELINE_VERSION, self.T, self.B, self.seed, self.reading_ratio, self.cond_dropout, self.reading_image_loss,
               [(p.kind, round(p.weight, 12), len(p)) for p in self.data.parts]]  # not paths: data may move
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()

    def state_dict(self) -> dict:
        return {
            "version": PIPELINE_VERSION,
            "signature": self._signature(),
            "generator": base64.b64encode(self._gen.get_state().numpy().tobytes()).decode("ascii"),
            "epoch": list(self._epoch),
            "pos": list(self._pos),
            "pending": [list(desc) for desc, _ in self._pending],
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("signature") != self._signature():
            raise UserError("the data stream cannot be resumed exactly: the data, the context length, the batch size, "
                            "the seed or the mixture differ from the checkpoint's; resume with the same data and options")
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self._gen.set_state(torch.from_numpy(raw))
        self._epoch = [int(e) for e in state["epoch"]]
        self._pos = [int(p) for p in state["pos"]]
        self._perm = [None] * len(self.data.parts)
        self._pending = [(tuple(d), self._document(*d)) for d in state["pending"]]
        self.batches = int(state["batches"])


class ShardedBatches:
    """One process's rows of every global batch: rows [rank*B/world, (rank+1)*B/world)."""

    def __init__(self, batches: PackedBatches, rank: int, world: int):
        if world < 1 or not 0 <= rank < world or batches.B % world:
            raise ValueError(f"batch size {batches.B} must be divisible by world size {world} (rank {rank})")
        self.batches = batches
        per = batches.B // world
        self.rows = slice(rank * per, (rank + 1) * per)

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return {k: v[self.rows] for k, v in next(self.batches).items()}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def training_batches(data: Sequence[str], *, vocab, image_tokenizer: str | Path, context_len: int, batch_size: int,
                     reading_ratio: float = 0.5, cond_dropout: float = 0.1, reading_image_loss: bool = True, seed: int = 0,
                     strict: bool = False, cache_dir: str | None = None, image_column: str = "image",
                     text_column: str = "text") -> PackedBatches:
    """What the trainer calls: prepare the sources and return the packed global-batch stream."""
    cfg = DataConfig(sources=list(data), context_len=context_len, batch_size=batch_size, reading_ratio=reading_ratio,
                     cond_dropout=cond_dropout, reading_image_loss=reading_image_loss, seed=seed, strict=strict,
                     cache_dir=cache_dir, image_column=image_column, text_column=text_column)
    return PackedBatches.from_config(cfg, vocab, image_tokenizer)


# ---------------------------------------------------------------- held-out pairs (validation / evaluation)


@dataclass
class HeldoutPair:
    caption: str
    codes: torch.Tensor
    """LongTensor (h, w)."""
    pixels: torch.Tensor
    """(3, S, S) float in [-1, 1], the image as the image tokenizer saw it."""
    path: str
    where: str

    @property
    def image(self):
        """The preprocessed image as PIL."""
        return to_pil(self.pixels)


def heldout_pairs(data: Sequence[str], *, vocab, image_tokenizer: str | Path, cache_dir: str | None = None,
                  split: str = "test", text_column: str = "text", limit: int = 0, strict: bool = False) -> list[HeldoutPair]:
    """Captioned images of the held-out split of every local data directory in ``data``.

    ``DIR/test`` when present; a plain imagefolder without split folders is used as is (then the
    pairs are not held out from training, a warning says so). Files, hub names and directories that
    have other splits but not ``split`` contribute nothing.
    """
    report = SkipReport(strict=strict)
    out: list[HeldoutPair] = []
    vq_fp = None
    for spec in data:
        path = Path(parse_source(spec)[0]).expanduser()
        if not path.is_dir():
            continue
        try:
            root = _split_root(path, split)
        except UserError:
            continue
        if not _has_images_or_metadata(root):
            continue
        if root == path:
            log.warning("%s has no '%s' folder: validation uses its own (training) images", path, split)
        vq_fp = vq_fp or _check_tokenizers(vocab, image_tokenizer)
        recs = [(w, p, t) for w, p, t in _pair_records(str(root), text_column, report) if t and t.strip()]
        if limit:
            recs = recs[:limit - len(out)]
        cache_root = Path(cache_dir) if cache_dir else default_cache_dir([str(path)])
        table = local_image_table([p for _, p, _ in recs], [w for w, _, _ in recs], image_tokenizer, vq_fp, cache_root, strict)
        size = None
        for where, p, text in recs:
            row = table.index[p]
            if table.reasons[row]:
                report.add(table.reasons[row], where)
                continue
            if size is None:
                from earlyfusion.tokenizer.vqvae import read_vq_config

                size = read_vq_config(image_tokenizer).image_size
            codes = torch.from_numpy(table.codes[row].astype(np.int64)).reshape(vocab.grid)
            out.append(HeldoutPair(caption=text, codes=codes, pixels=preprocess(p, size), path=p, where=where))
            report.ok()
        if limit and len(out) >= limit:
            break
    if report.total:
        log.warning("held-out pairs: %s", report.summary())
    return out
