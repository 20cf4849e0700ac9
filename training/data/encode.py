"""``earlyfusion encode``: a corpus pre-tokenized by its image tokenizer into code shards (format: ``code_shards``).

Input units: each tar shard of a WebDataset source is one unit, an imagefolder is cut into units of ``--shard-size``
records (in the order ``records.pair_records`` lists them), an interleaved or text ``.jsonl`` (or a ``.txt``) into
units of ``--shard-size`` lines (``records.line_ranges``: a scan for newlines, so that each process reads only its
own units); unit i becomes ``shard-<i>.safetensors`` with its own record ``shard-<i>.json``. Image-caption pairs make
shards of pairs, the files shards of documents (``code_shards``: an interleaved document keeps its images and the
text around them in order and is kept whole or skipped whole; a text document holds no image). Several processes (``accelerate launch``, ``torchrun``) take the units i with
i mod WORLD_SIZE = RANK: disjoint inputs, disjoint outputs. A unit whose shard and record are already there (a killed
encode run again) is skipped, once its record shows it came from the same input and image tokenizer; anything else
in the directory (another tokenizer's codes, other data) is an error. Rank 0 holds ``CODES/.lock`` for the whole
command and writes ``manifest.json`` once every unit is done.

Work in each process is a pipeline: a pool of processes decodes and resizes the next images (``--workers``) while
the image tokenizer encodes the batch before them, on the GPU when there is one. Bad images are counted by reason
per shard (``--strict``: the first one is an error).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from earlyfusion.core.checkpoint import CheckpointError, load_json
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log, progress
from earlyfusion.core.rundir import run_lock
from earlyfusion.tokenizer.image_span import SpanGrammar
from earlyfusion.tokenizer.preprocess import ImageError, preprocess_for_codes
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, vq_fingerprint
from earlyfusion.tokenizer.vq_config import VQConfig

from .code_shards import BLOCK_RECORDS, FORMAT, MANIFEST_FILE, VERSION, codes_dtype, shard_name, write_code_shard, write_manifest
from .distributed import gather_objects, join
from .records import (
    LineRange,
    SkipReport,
    interleaved_records,
    jsonl_kind,
    line_ranges,
    pair_records,
    split_root,
    text_records,
)
from .files import remove_temporaries
from .tar_shards import is_tar_source, read_tar, tar_paths


@dataclass
class EncodeConfig:
    data: str
    """Corpus to encode: tar shards (a brace pattern such as shards/{00000..00099}.tar, one .tar, or a directory of
    .tar files) or an imagefolder directory (image files + metadata.jsonl) of image-caption pairs; an interleaved
    .jsonl ({"texts": [...], "images": [...]} per line) or a text .jsonl / .txt of documents. Held-out pairs for the
    run's validation: encode that split into CODES/val (--split val --out CODES/val)."""
    image_tokenizer: str
    """Image tokenizer run directory (`earlyfusion tokenizer train`, or `import chameleon`'s image_tokenizer)."""
    out: str
    """Directory of code shards to write (manifest.json + shard-*.safetensors); run again to finish a killed encode."""
    grid_tokens: bool = False
    """Keep each image's aspect ratio (its own code grid), for a vocabulary built with --grid-tokens; off, images are
    centre-cropped to the tokenizer's square."""
    shard_size: int = 10_000
    """Records per code shard when --data is an imagefolder, lines per code shard for a .jsonl or .txt (tar shards
    keep one code shard per tar)."""
    batch_size: int = 256
    """Images per image-tokenizer forward pass."""
    workers: int | None = None
    """Processes that decode and resize images ahead of the tokenizer; unset = one per core; 0 = decode in this
    process, between the tokenizer's batches."""
    split: str = "train"
    """Split folder of an imagefolder with split folders."""
    text_column: str = "text"
    """Caption field of imagefolder metadata and of .json members of tar shards."""
    strict: bool = False
    """Fail on the first bad record instead of skipping and counting it."""
    allow_outside_paths: bool = False
    """Let an interleaved .jsonl name images outside its own folder (absolute paths, '..', links out of it); off, such
    records are skipped and counted as outside_data_dir."""

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1 or (self.workers is not None and self.workers < 0):
            raise ValueError("--shard-size and --batch-size must be at least 1, --workers at least 0")


@dataclass
class Unit:
    """One input unit: what it reads, and the identity of that input (a resumed encode must find the same)."""

    index: int
    input: str
    digest: str
    records: object  # (its SkipReport) -> iterator of (where, image source, caption)
    size: int | None = None
    """Records it lists (an imagefolder's unit), None when only reading tells (a tar shard)."""

    @property
    def name(self) -> str:
        return shard_name(self.index)


def _stat_digest(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def source_kind(data: str) -> str:
    """What ``--data`` holds: "pairs" (tar shards, an imagefolder), "interleaved" or "text" (a .jsonl, a .txt)."""
    path = Path(data).expanduser()
    if not is_tar_source(data) and path.is_file():
        if path.suffix == ".txt":
            return "text"
        if path.suffix == ".jsonl":
            return jsonl_kind(path)
        raise UserError(f"--data {data}: unsupported file type (give tar shards, an imagefolder, a .jsonl or a .txt)")
    return "pairs"


def _pairs(records):
    """(where, [image source], [caption]) of each (where, image source, caption)."""
    return ((where, [src], [caption]) for where, src, caption in records)


def _documents(path: Path, kind: str, part: LineRange, allow_outside: bool):
    """(where, image paths, text pieces: before, between and after the images) of each record of a file's ``part``."""
    def records(report: SkipReport):
        if kind == "text":
            yield from ((where, [], [text]) for where, text in text_records(path, report, part))
            return
        for where, segs in interleaved_records(path, report, allow_outside, part):
            images, texts = [], [""]
            for k, x in segs:
                if k == "i":
                    images.append(x)
                    texts.append("")
                else:
                    texts[-1] = x
            yield where, images, texts
    return records


def input_units(cfg: EncodeConfig, listing: SkipReport) -> list[Unit]:
    """The input units of ``cfg.data`` (see the module docstring); an imagefolder's listing counts its bad rows in
    ``listing``."""
    if is_tar_source(cfg.data):
        return [Unit(i, str(p), _stat_digest(p), lambda report, p=p: _pairs(read_tar(p, cfg.text_column, report)))
                for i, p in enumerate(tar_paths(cfg.data))]
    path = Path(cfg.data).expanduser()
    if path.is_file():
        kind = source_kind(cfg.data)
        return [Unit(i, f"{path} lines {r.first_line}..{r.first_line + cfg.shard_size - 1}", _stat_digest(path),
                     _documents(path, kind, r, cfg.allow_outside_paths))
                for i, r in enumerate(line_ranges(path, cfg.shard_size))]
    if not path.is_dir():
        raise UserError(f"--data {cfg.data}: neither tar shards, an imagefolder directory nor a .jsonl/.txt file")
    root = split_root(path, cfg.split)
    recs = list(pair_records(root, cfg.text_column, listing))
    units = []
    for i, a in enumerate(range(0, len(recs), cfg.shard_size)):
        part = recs[a:a + cfg.shard_size]
        digest = hashlib.sha256("\n".join(w for w, _, _ in part).encode()).hexdigest()
        units.append(Unit(i, f"{root} records {a}..{a + len(part) - 1}", digest,
                          lambda report, part=part: _pairs(part), len(part)))
    if not units:
        raise UserError(f"--data {cfg.data}: no records ({listing.summary()})")
    return units


def _own_record(cfg: EncodeConfig, fingerprint: str, dtype: np.dtype) -> dict:
    kind = source_kind(cfg.data)
    return {"format": FORMAT, "version": VERSION, **({"kind": kind} if kind != "pairs" else {}),
            "image_tokenizer": fingerprint, "grid_tokens": cfg.grid_tokens, "codes_dtype": dtype.name}


def finished(out: Path, unit: Unit, own: dict) -> bool:
    """Whether ``unit`` was encoded by an earlier run (shard and record present); UserError when what is there came
    from another image tokenizer, another grid mode or other data."""
    record_path = (out / unit.name).with_suffix(".json")
    if not record_path.is_file():
        return False
    try:
        rec = load_json(record_path)
    except CheckpointError:
        return False  # written atomically, so never half; unreadable all the same: encode the unit again
    for key, value in own.items():
        if rec.get(key) != value:
            raise UserError(f"--out {out} holds codes made otherwise ({record_path}: {key} {rec.get(key)!r}, this "
                            f"encode {value!r}); choose another --out or remove it")
    if (rec.get("input"), rec.get("input_digest")) != (unit.input, unit.digest):
        raise UserError(f"--out {out} holds codes of other data ({record_path} came from {rec.get('input')}); the data "
                        "changed since the encode began, or --out belongs to another corpus: choose another --out")
    shard = out / unit.name
    return shard.is_file() and shard.stat().st_size == rec.get("bytes")


DECODE_CHUNK = 32
"""Images one decode task holds: enough that handing tasks between processes costs little beside decoding them."""


def one_thread() -> None:
    torch.set_num_threads(1)  # a decode process: its tensors are one image's, and the cores are the pool's


def decode_chunk(srcs: list, wheres: list[str], image_size: int, downsample: int, max_grid) -> list:
    """(pixels as float32 (3, h, w) | None, (reason, message) | None) of each image: run in a decode process."""
    out = []
    for src, where in zip(srcs, wheres):
        try:
            out.append((preprocess_for_codes(src, image_size, downsample, max_grid).numpy(), None))
        except ImageError as e:
            out.append((None, (e.reason, str(e))))
    return out


class _Done:
    """A decode chunk worked out in this process (``--workers 0``), with the interface of a pool's result."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class EncodePipeline:
    """Decode ahead in processes, encode batches here, write each unit when its last record is encoded.

    Processes, not threads: decoding a small image is mostly interpreter work, which threads would take in turns. The
    pool is forked before the image tokenizer is loaded (and before a GPU is touched); each decode process runs one
    torch thread."""

    def __init__(self, cfg: EncodeConfig, out: Path, own: dict, device: torch.device, bar, stack: contextlib.ExitStack):
        self.cfg, self.out, self.own, self.device, self.bar = cfg, out, own, device, bar
        # every core decodes: the tokenizer's forward is the lighter stage where images are decoded on the CPU, and
        # this process mostly waits for decoded images
        self.workers = (os.cpu_count() or 1) if cfg.workers is None else cfg.workers
        self.pool = stack.enter_context(multiprocessing.get_context("fork").Pool(self.workers, one_thread)) \
            if self.workers else None
        self.vq = load_vqvae(cfg.image_tokenizer).to(device).eval()
        vc = self.vq.cfg
        if cfg.grid_tokens and not isinstance(vc, VQConfig):
            raise UserError(f"--image-tokenizer {cfg.image_tokenizer} takes only {vc.image_size}x{vc.image_size} "
                            "images, so its images cannot keep their aspect ratio; leave out --grid-tokens")
        self.shape = (vc.image_size, vc.downsample, tuple(vc.grid_size) if cfg.grid_tokens else None)
        # the span lengths of any vocabulary of this tokenizer in this grid mode (the ids do not matter here)
        self.grammar = SpanGrammar(0, 1, 2, vc.codebook_size, tuple(vc.grid_size), cfg.grid_tokens)
        self.images = 0
        self.seconds = 0.0  # from the first image read to the last shard written

    def encode_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Codes (n, h, w) int64 of decoded images of one shape: stacked, copied to the device, encoded, copied back."""
        x = torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.vq.encode(x).to("cpu", torch.int64).numpy()

    def _submit(self, records: list):
        args = ([src for _, srcs, _ in records for src in srcs], [w for w, srcs, _ in records for _ in srcs],
                *self.shape)
        if not args[0]:  # text documents: nothing to decode
            return _Done([])
        return self.pool.apply_async(decode_chunk, args) if self.pool is not None else _Done(decode_chunk(*args))

    def _flush(self, batch: list, done: dict) -> None:
        by_shape: dict[tuple, list] = {}
        for unit, slot, pixels in batch:
            by_shape.setdefault(tuple(pixels.shape), []).append((unit, slot, pixels))
        for items in by_shape.values():
            codes = self.encode_pixels([p for _, _, p in items])
            for (unit, (doc, k), _), c in zip(items, codes):
                done[unit]["codes"][doc][k] = c
        self.images += len(batch)
        self.bar.update(len(batch))
        batch.clear()

    def run(self, units: list[Unit]) -> None:
        t0 = time.perf_counter()
        try:
            self._run(units)
        finally:
            self.seconds = time.perf_counter() - t0

    def _tasks(self, units: list[Unit], acc: dict):
        """(unit, records) chunks of each unit's records, then (unit, None) when the unit has been read."""
        for unit in units:
            report = SkipReport(strict=self.cfg.strict)
            acc[unit.index] = {"unit": unit, "codes": [], "captions": [], "report": report}
            records = unit.records(report)
            while chunk := list(itertools.islice(records, DECODE_CHUNK)):
                yield unit.index, chunk
            yield unit.index, None

    def _run(self, units: list[Unit]) -> None:
        ahead = 2 * -(-self.cfg.batch_size // DECODE_CHUNK) + 2 * self.workers  # chunks in flight
        acc: dict[int, dict] = {}
        window: collections.deque = collections.deque()
        batch: list = []
        tasks = self._tasks(units, acc)
        while True:
            while len(window) < ahead and (task := next(tasks, None)) is not None:
                window.append((task, self._submit(task[1]) if task[1] is not None else None))
            if not window:
                break
            (unit, records), result = window.popleft()
            a = acc[unit]
            if records is None:  # the unit has been read: encode what is left of it, write it
                self._flush(batch, acc)
                self._write(acc.pop(unit))
                continue
            decoded = iter(result.get())
            for where, srcs, texts in records:
                images = [next(decoded) for _ in srcs]
                error = next((e for _, e in images if e is not None), None)
                if error is not None:  # a document is kept whole or not at all
                    k = next(i for i, (_, e) in enumerate(images) if e is not None)
                    a["report"].add(error[0], where if len(srcs) == 1 else f"{where} (image {k}: {srcs[k]})", error[1])
                    continue
                a["report"].ok()
                a["codes"].append([None] * len(srcs))
                a["captions"].append(texts)
                batch += [(unit, (len(a["codes"]) - 1, k), pixels) for k, (pixels, _) in enumerate(images)]
            if len(batch) >= self.cfg.batch_size:
                self._flush(batch, acc)

    def _write(self, a: dict) -> None:
        unit, report = a["unit"], a["report"]
        record = {**self.own, "input": unit.input, "input_digest": unit.digest,
                  "skipped": dict(sorted(report.counts.items())), "examples": report.as_dict()["examples"]}
        codes = [c for doc in a["codes"] for c in doc]
        texts = [t for doc in a["captions"] for t in doc]
        per_record = None
        if "kind" in self.own:  # documents: their layout, and the most tokens one document's images take
            per_record = [len(doc) for doc in a["codes"]]
            record["most_image_tokens"] = max((sum(self.grammar.span_length(c.shape) for c in doc)
                                               for doc in a["codes"]), default=0)
        write_code_shard(self.out, unit.name, codes, texts, record, images_per_record=per_record)


def encode_cmd(cfg: EncodeConfig) -> int:
    """``earlyfusion encode``: see the module docstring."""
    t0 = time.perf_counter()
    rank, world = join()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the code shards")
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(run_lock(out, "encode"))
                remove_temporaries(out)  # the other processes wait below: nothing of this encode is being written yet
            except UserError as e:
                error = str(e)
        error = gather_objects(error)[0]
        if error:
            raise UserError(error)
        mine: list = []
        results = gather_objects(_encode_own(cfg, out, rank, world, mine))
        failed = next((r for r in results if isinstance(r, str)), None)
        if failed:
            raise UserError(failed)
        if rank == 0:
            units, own, listing = mine
            vq = read_vq_config(cfg.image_tokenizer)
            manifest = write_manifest(out, [u.name for u in units], {
                **own, "codebook_size": vq.codebook_size, "grid": list(vq.grid_size), "image_size": vq.image_size,
                "block_records": BLOCK_RECORDS, "source": cfg.data, "text_column": cfg.text_column}, listing.counts)
            images = sum(n for n, _ in results)
            busy = max(t for _, t in results)
            skipped = sum(manifest["skipped"].values())
            rate = images / max(busy, 1e-9)
            print(f"encoded {images} image(s) in {time.perf_counter() - t0:.1f}s ({rate:.{1 if rate >= 10 else 3}f} "
                  f"images/s from first read to last write, {world} process(es)); {out}: {manifest['records']} records "
                  f"in {len(manifest['shards'])} shard(s)"
                  + (f", skipped {skipped}: " + ", ".join(f"{n} {k}" for k, n in manifest["skipped"].items())
                     if skipped else ""))
    return 0


def _encode_own(cfg: EncodeConfig, out: Path, rank: int, world: int, mine: list) -> tuple[int, float] | str:
    """Encode this process's share: (images encoded, seconds its pipeline ran), or the one-line error that stopped it
    (every process must reach the gather that follows). ``mine`` receives (all units, the shards' own record, the
    listing's report)."""
    try:
        listing = SkipReport(strict=cfg.strict)
        units = input_units(cfg, listing)
        fingerprint = vq_fingerprint(cfg.image_tokenizer)
        own = _own_record(cfg, fingerprint, codes_dtype(read_vq_config(cfg.image_tokenizer).codebook_size))
        mine += [units, own, listing]
        if rank == 0 and (out / MANIFEST_FILE).is_file():
            old = load_json(out / MANIFEST_FILE)
            if old.get("image_tokenizer") != fingerprint:
                raise UserError(f"--out {out} holds codes of image tokenizer {str(old.get('image_tokenizer'))[:12]}, not "
                                f"{fingerprint[:12]}; choose another --out")
        share = [u for u in units if u.index % world == rank]
        todo = [u for u in share if not finished(out, u, own)]
        if len(todo) < len(share):
            log.info("%d of %d shard(s) were encoded by an earlier run; encoding the other %d", len(share) - len(todo),
                     len(share), len(todo))
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
        sizes = [u.size for u in todo]
        total = sum(sizes) if None not in sizes else None
        with progress(total=total, desc="encode", unit="img") as bar, contextlib.ExitStack() as stack:
            pipe = EncodePipeline(cfg, out, own, device, bar, stack)
            pipe.run(todo)
        return pipe.images, pipe.seconds
    except UserError as e:
        return " ".join(str(e).split())
    except OSError as e:
        return f"{e.filename or out}: {e.strerror or e}; free space (or fix permissions) and run encode again: finished " \
               "shards are kept"
