"""Image codes, computed once and cached.

The images of a source go through ``datasets.Dataset.map`` (batched VQ-VAE ``encode`` under inference
mode) and the result is saved with ``save_to_disk`` under ``cache_dir/codes-<key>``, the key being a
hash of (every image path with its size and mtime, the image tokenizer fingerprint, this pipeline's
version); a hub data set's key uses its ``datasets`` fingerprint instead of the paths. A later run with
the same images and image tokenizer loads it; any change re-encodes. A damaged entry is rebuilt, and a
file lock makes several processes (accelerate launch) encode a source only once.

With augmentation (``augment.Augment``, ``--augment-views K``) each image gets K code grids (view 0
unaugmented), and the augmentation settings join the key: other settings are another cache entry.

For a vocabulary with grid tokens (``grid_tokens``, which joins the key) images keep their aspect ratio: each is
resized whole to its own code grid (``preprocess_to_grid``, at most the image tokenizer's grid), images of one
grid are encoded together, and the table keeps every image's grid beside its codes (padded with -1 to the
largest grid). Images smaller than one code or too far from square for the largest grid are skipped and
counted ("too_small", "extreme_aspect") like other bad images.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import is_main_process, log
from earlyfusion.tokenizer.preprocess import ImageError
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config

from .augment import NO_AUGMENT, Augment
from .config import PIPELINE_VERSION
from .sources import parse_source

ENCODE_BATCH = 256


PAD_CODE = -1  # fills the codes past an image's own grid (grid tokens: rows are padded to the largest grid)


def grid_codes(flat: np.ndarray, grid) -> np.ndarray:
    """The (h, w) code grid held in a padded row of codes (its first h*w codes, raster order)."""
    h, w = (int(x) for x in grid)
    return flat[:h * w].reshape(h, w)


@dataclass
class ImageTable:
    """Codes of a set of images: row i <-> ``srcs[i]``; ``reasons[i]`` is "" or why the image is unusable.

    ``image(i, view)`` is an image's code grid as an (h, w) array, ``grid(i)`` its (h, w)."""

    srcs: list[str]
    codes: np.ndarray  # (N, L) int32: the images as they are (view 0), each h*w codes in raster order, then PAD_CODE
    reasons: list[str]
    cache_hit: bool = False
    seconds: float = 0.0
    views: np.ndarray | None = None  # (N, K-1, L) int32: the augmented views 1..K-1 (each of its image's grid), or None
    grids: np.ndarray | None = None  # (N, 2) int32: (rows, columns) of each image; (0, 0) for an unusable one

    def __post_init__(self):
        self.index = {s: i for i, s in enumerate(self.srcs)}
        if self.grids is None:
            if self.srcs:
                raise ValueError("an ImageTable of images needs their grids")
            self.grids = np.zeros((0, 2), np.int32)

    def grid(self, row: int) -> tuple[int, int]:
        """(rows, columns) of the code grid of image ``row``."""
        return tuple(int(x) for x in self.grids[row])

    def image(self, row: int, view: int = 0) -> np.ndarray:
        """The (h, w) int32 code grid of image ``row``: view 0 as it is, 1..K-1 augmented."""
        return grid_codes(self.codes[row] if view == 0 else self.views[row, view - 1], self.grids[row])


def grid_key(grid_tokens: bool) -> list:
    """The grid-token mode's part of a cache key: nothing without it, so fixed-grid entries keep their keys."""
    return ["grid_tokens"] if grid_tokens else []


class _ImageEncoder:
    """The batched function given to ``datasets.map``: image sources -> codes, or the reason they failed."""

    def __init__(self, image_tokenizer: str | Path, strict: bool, augment: Augment = NO_AUGMENT,
                 grid_tokens: bool = False):
        self.image_tokenizer = image_tokenizer
        self.strict = strict
        self.augment = augment
        self.grid_tokens = grid_tokens
        self._vq = None

    @property
    def vq(self):
        if self._vq is None:

            self._vq = load_vqvae(self.image_tokenizer)
        return self._vq

    def __call__(self, batch: dict) -> dict:
        vq = self.vq
        size, downsample = vq.cfg.image_size, vq.cfg.downsample
        n_codes = vq.cfg.tokens_per_image
        max_grid = tuple(vq.cfg.grid_size) if self.grid_tokens else None
        srcs, wheres = batch["src"], batch["where"]
        K = self.augment.views
        reasons = [""] * len(srcs)
        grids = np.zeros((len(srcs), 2), np.int32)
        by_grid: dict[tuple[int, int], tuple[list[int], list[torch.Tensor]]] = {}  # grid -> (rows, K pixels per row)
        for i, (src, where) in enumerate(zip(srcs, wheres)):
            if isinstance(src, dict):  # hub image column read with decode=False
                src = src["bytes"] if src.get("bytes") is not None else src.get("path")
            try:
                if src is None:
                    raise ImageError("missing", where, "no image")
                views = self.augment.pixels(src, size, max_grid, downsample)  # K x (3, h*ds, w*ds) in [-1, 1]
            except ImageError as e:
                if self.strict:
                    raise UserError(f"{where}: bad record ({e}); fix or remove it, or run without --strict") from None
                reasons[i] = e.reason
                continue
            grid = vq.cfg.grid_of_pixels(*views[0].shape[1:])
            grids[i] = grid
            rows, pixels = by_grid.setdefault(grid, ([], []))
            rows.append(i)
            pixels += views
        codes = np.full((len(srcs), K, n_codes), PAD_CODE if self.grid_tokens else 0, np.int32)
        for (h, w), (rows, pixels) in by_grid.items():
            with torch.inference_mode():
                c = torch.cat([vq.encode(torch.stack(pixels[j:j + ENCODE_BATCH]))  # (b, h, w)
                               for j in range(0, len(pixels), ENCODE_BATCH)])
            codes[rows, :, :h * w] = c.reshape(len(rows), K, h * w).to(torch.int32).numpy()
        out = {"codes": codes[:, 0], "reason": reasons}
        if K > 1:
            out["views"] = codes[:, 1:]
        if self.grid_tokens:
            out["grid"] = grids
        return out


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so that several processes (accelerate launch) encode a source only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - no flock: processes may both encode
            pass
        yield


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own progress bars follow our rule: terminal and main process only."""

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


def cache_key(*parts) -> str:
    """The hex key of a cache entry: sha256 of the JSON of (pipeline version, *parts)."""
    return hashlib.sha256(json.dumps([PIPELINE_VERSION, *parts]).encode()).hexdigest()


def remove_stale_temporaries(cache_root: Path) -> None:
    """Delete the half-written ``.codes-*.tmp-PID`` folders of encoders that were killed (their process is gone)."""
    for tmp in cache_root.glob(".codes-*.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive but not ours (or no permission to ask): leave it
            pass


def encode_images(ds, key: str, image_tokenizer: str | Path, cache_root: Path, strict: bool = False,
                  desc: str = "encoding images", augment: Augment = NO_AUGMENT,
                  grid_tokens: bool = False) -> tuple[object, bool]:
    """``ds`` (columns src, where) -> (the same rows with ``codes`` and ``reason``, ``views`` when ``augment`` is
    active and ``grid`` with ``grid_tokens``; whether the cache had them). ``key`` must hold the augmentation's own
    (``augment_key``) and the grid mode's (``grid_key``)."""

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
        remove_stale_temporaries(cache_root)
        encoder = _ImageEncoder(image_tokenizer, strict, augment, grid_tokens)
        h, w = encoder.vq.cfg.grid_size
        features = ds.features.copy()
        features["codes"] = datasets.List(datasets.Value("int32"), length=h * w)
        features["reason"] = datasets.Value("string")
        if augment.active:
            features["views"] = datasets.List(datasets.List(datasets.Value("int32"), length=h * w), length=augment.views - 1)
        if grid_tokens:
            features["grid"] = datasets.List(datasets.Value("int32"), length=2)
        with _quiet_datasets():
            out = ds.map(encoder, batched=True, batch_size=ENCODE_BATCH, features=features, new_fingerprint=key[:32],
                         desc=desc)
        tmp = cache_root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_datasets():
            out.save_to_disk(str(tmp))
        os.replace(tmp, target)
    return out, False


def table_from(ds, srcs: list[str], hit: bool, seconds: float, grid: tuple[int, int]) -> ImageTable:
    """The ImageTable of an encoded data set (columns codes, reason, and grid with grid tokens) whose rows are
    ``srcs``; ``grid``: the image tokenizer's, every image's grid when the data set has no grid column."""
    if not len(ds):
        return ImageTable([], np.zeros((0, 0), np.int32), [], cache_hit=hit, seconds=seconds)
    data = ds.with_format("numpy")[:]
    codes = np.asarray(data["codes"], dtype=np.int32).reshape(len(srcs), -1)
    reasons = [str(r) for r in data["reason"]]
    views = np.asarray(data["views"], dtype=np.int32).reshape(len(srcs), -1, codes.shape[1]) if "views" in data else None
    if "grid" in data:
        grids = np.asarray(data["grid"], dtype=np.int32).reshape(len(srcs), 2)
    else:
        grids = np.tile(np.asarray(grid, np.int32), (len(srcs), 1))
    return ImageTable(srcs, codes, reasons, cache_hit=hit, seconds=seconds, views=views, grids=grids)


def augment_key(augment: Augment) -> list:
    """The augmentation's part of a cache key: nothing when inactive, so unaugmented entries keep their keys."""
    return [augment.key()] if augment.active else []


def local_image_table(paths: Sequence[str], wheres: Sequence[str], image_tokenizer: str | Path, vq_fp: str,
                      cache_root: Path, strict: bool = False, augment: Augment = NO_AUGMENT,
                      grid_tokens: bool = False) -> ImageTable:
    """Codes for local image files (deduplicated by path), cached by (paths, sizes, mtimes, tokenizer, augmentation,
    grid mode). ``grid_tokens``: images keep their aspect ratio (a vocabulary with grid tokens)."""


    t0 = time.perf_counter()
    srcs = list(dict.fromkeys(paths))
    if not srcs:
        return ImageTable([], np.zeros((0, 0), np.int32), [], cache_hit=True)
    first_where = {}
    for p, w in zip(paths, wheres):
        first_where.setdefault(p, w)
    key = cache_key(vq_fp, _stat_key(srcs), *augment_key(augment), *grid_key(grid_tokens))
    ds = datasets.Dataset.from_dict({"src": srcs, "where": [first_where[s] for s in srcs]})
    out, hit = encode_images(ds, key, image_tokenizer, cache_root, strict, augment=augment, grid_tokens=grid_tokens)
    if list(out["src"]) != srcs:  # a hash collision or a hand-edited cache: never use wrong codes
        raise UserError(f"{cache_root}: image-code cache entry does not match the data; delete the cache directory")
    return table_from(out, srcs, hit, time.perf_counter() - t0, read_vq_config(image_tokenizer).grid_size)


def default_cache_dir(sources: Sequence[str]) -> Path:
    """<first existing local source>/.earlyfusion-cache if writable, else $XDG_CACHE_HOME (or ~/.cache)/earlyfusion."""
    for spec in sources:
        p = Path(parse_source(spec)[0]).expanduser()
        if p.exists():
            d = (p if p.is_dir() else p.parent) / ".earlyfusion-cache"
            if os.access(d if d.exists() else d.parent, os.W_OK):
                return d
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "earlyfusion"


def resolve_cache_dir(cache_dir: str | None, sources: Sequence[str]) -> Path:
    """The cache directory given, or the default one for ``sources``."""
    return Path(cache_dir) if cache_dir else default_cache_dir(sources)
