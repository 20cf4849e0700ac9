"""Real-pixel built-in data: ``earlyfusion data photos``, random crops of the photographs inside scikit-image.

scikit-image ships a few photographs in its wheel (``skimage.data``); the ones used here load without a
network (the others need pooch and a download, and are not listed). Each crop takes a random square of
the photograph (side between ``min_scale`` and ``max_scale`` of its shorter side, log-uniform; random
position; mirrored with probability 1/2 when ``flip`` is on), resized to ``image_size`` with Lanczos
filtering; grayscale photographs become RGB. The caption names the photograph ("a crop of the astronaut
photograph"), one fixed caption per photograph.

Train and test crops come from different photographs (``TEST_PHOTOS`` by default), so the test split
measures how a model does on photographs it has never seen. The val split holds new crops of the
training photographs (a random stream of their own, never the square of a train crop), so that
which-photograph accuracy can be measured on images not trained on (``earlyfusion eval`` does). The
layout is the imagefolder one that ``earlyfusion data shapes`` writes: ``DIR/train``, ``DIR/test`` and
``DIR/val``, each with PNG files and a ``metadata.jsonl`` of ``{"file_name", "text"}``, plus
``DIR/photos.json`` describing the set (and ``DIR/MANIFEST.json``, every file's size and checksum,
from the crash-safe write). Each crop is a pure function of (seed, photograph name, split, crop index):
the same options write byte-identical files, and the val split leaves the train and test files as
they are without it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from earlyfusion.core.checkpoint import atomic_dir
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log, progress
from earlyfusion.core.options import MAX_SEED, check_number
from earlyfusion.training.shapes import png_bytes

# name -> (skimage.data function, what the caption calls it); only photographs stored in the wheel itself
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut", "astronaut"),
    "brick": ("brick", "brick wall"),
    "camera": ("camera", "cameraman"),
    "cell": ("cell", "cell"),
    "chelsea": ("chelsea", "cat"),
    "clock": ("clock", "clock"),
    "coffee": ("coffee", "coffee cup"),
    "coins": ("coins", "coins"),
    "grass": ("grass", "grass"),
    "gravel": ("gravel", "gravel"),
    "hubble_deep_field": ("hubble_deep_field", "hubble deep field"),
    "immunohistochemistry": ("immunohistochemistry", "stained tissue"),
    "moon": ("moon", "moon"),
    "motorcycle": ("stereo_motorcycle", "motorcycle"),
    "page": ("page", "printed page"),
    "retina": ("retina", "retina"),
    "rocket": ("rocket", "rocket"),
    "text": ("text", "street sign"),
}
TEST_PHOTOS: tuple[str, ...] = ("camera", "chelsea", "coffee", "brick")
"""The held-out photographs: a grayscale portrait, an animal, a colour still life and a texture."""

MARKER = "photos.json"  # written into DIR; identifies the data set (and lets a rerun replace it)
MAX_CROPS = 100_000
VAL_STREAM = 1  # the val crops' random stream: seeded apart from the train and test crops'


def caption(name: str) -> str:
    return f"a crop of the {PHOTOS[name][1]} photograph"


def _names(text: str, flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"--{flag}: unknown photograph(s) {', '.join(unknown)}; the photographs are {', '.join(PHOTOS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--{flag}: a photograph is named twice in {text!r}")
    return names


@dataclass
class PhotosConfig:
    out: str
    """Output directory (created; a previous photos data set there is replaced)."""
    image_size: int = 64
    """Side of each crop in pixels (8 to 512)."""
    crops_per_photo: int = 500
    """Random crops taken from each photograph."""
    seed: int = 0
    """Random seed: the same seed writes byte-identical files."""
    min_scale: float = 0.2
    """Smallest crop side as a fraction of the photograph's shorter side (larger = more of the scene per crop)."""
    max_scale: float = 1.0
    """Largest crop side as a fraction of the photograph's shorter side."""
    flip: bool = True
    """Mirror each crop left-right with probability 1/2."""
    test_photos: str = ",".join(TEST_PHOTOS)
    """Comma-separated photographs whose crops form DIR/test (held out); the others form DIR/train."""
    photos: str = ",".join(PHOTOS)
    """Comma-separated photographs to use at all (the default lists every one that loads offline)."""
    val_crops: int = 20
    """New crops of each training photograph written to DIR/val, none showing the square of a train crop:
    what `eval` measures which-photograph accuracy on. Raise it for a tighter figure; 0 = no val split."""

    def __post_init__(self):
        check_number("image-size", self.image_size, 8, 512)
        check_number("crops-per-photo", self.crops_per_photo, 1, MAX_CROPS)
        check_number("val-crops", self.val_crops, 0, MAX_CROPS)
        check_number("seed", self.seed, 0, MAX_SEED)
        check_number("min-scale", self.min_scale, 0, 1)
        check_number("max-scale", self.max_scale, 0, 1)
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"--min-scale must be positive and at most --max-scale, got {self.min_scale} and {self.max_scale}")
        used = _names(self.photos, "photos")
        test = _names(self.test_photos, "test-photos")
        outside = [n for n in test if n not in used]
        if outside:
            raise ValueError(f"--test-photos {', '.join(outside)} not among --photos")
        if not test or len(test) == len(used):
            raise ValueError("--test-photos must name at least one photograph and leave at least one for training")

    @property
    def split(self) -> dict[str, tuple[str, ...]]:
        test = _names(self.test_photos, "test-photos")
        return {"train": tuple(n for n in _names(self.photos, "photos") if n not in test), "test": test}


def load_photo(name: str) -> np.ndarray:
    """The photograph as uint8 (H, W, 3): grayscale replicated to RGB, an alpha channel dropped."""
    fn, _ = PHOTOS[name]
    try:
        a = getattr(skimage.data, fn)()
    except Exception as e:  # a build of scikit-image without the file falls back to a download: refuse it
        raise UserError(f"photograph {name!r} (skimage.data.{fn}) cannot be loaded offline: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}; leave it out with --photos") from None
    if isinstance(a, tuple):
        a = a[0]  # stereo pairs: the left view
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise UserError(f"photograph {name!r} has pixels of type {a.dtype}, expected uint8")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def crop_boxes(rng: np.random.Generator, height: int, width: int, n: int, image_size: int, min_scale: float,
               max_scale: float) -> list[tuple[int, int, int, bool]]:
    """``n`` random crops (top, left, side, mirrored) of an image: log-uniform side, uniform position."""
    short = min(height, width)
    lo = min(short, max(image_size, round(min_scale * short)))
    hi = max(lo, round(max_scale * short))
    out = []
    for _ in range(n):
        side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        side = min(max(side, lo), hi)
        top = int(rng.integers(height - side + 1))
        left = int(rng.integers(width - side + 1))
        out.append((top, left, side, bool(rng.random() < 0.5)))
    return out


def _boxes(cfg: PhotosConfig, name: str, shape: tuple[int, ...], n: int, *stream: int) -> list[tuple[int, int, int, bool]]:
    """``n`` crop boxes of a photograph of ``shape`` from the random stream (seed, name, *stream)."""
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode()), *stream])
    return crop_boxes(rng, shape[0], shape[1], n, cfg.image_size, cfg.min_scale, cfg.max_scale)


def val_boxes(cfg: PhotosConfig, name: str, shape: tuple[int, ...]) -> list[tuple[int, int, int, bool]]:
    """Up to ``cfg.val_crops`` boxes for the val split: drawn from their own stream, skipping every square that a
    train crop of the photograph (or an earlier val crop) shows. Fewer when the scale range leaves too few
    squares (a square photograph at --min-scale 1 has one); the caller reports the shortfall."""
    seen = {b[:3] for b in _boxes(cfg, name, shape, cfg.crops_per_photo)}
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode()), VAL_STREAM])
    out: list[tuple[int, int, int, bool]] = []
    for _ in range(50 * cfg.val_crops + 200):  # tries; ample unless the free squares are nearly exhausted
        if len(out) == cfg.val_crops:
            break
        box = crop_boxes(rng, shape[0], shape[1], 1, cfg.image_size, cfg.min_scale, cfg.max_scale)[0]
        if box[:3] not in seen:
            seen.add(box[:3])
            out.append(box)
    return out


def render_crops(cfg: PhotosConfig, photo: np.ndarray, boxes: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
    """The crops (top, left, side, mirrored) of a photograph, resized: uint8 (image_size, image_size, 3) each."""
    img = Image.fromarray(photo, "RGB")
    out = []
    for top, left, side, mirror in boxes:
        c = img.crop((left, top, left + side, top + side)).resize((cfg.image_size, cfg.image_size), Image.Resampling.LANCZOS)
        a = np.asarray(c)
        out.append(np.ascontiguousarray(a[:, ::-1]) if cfg.flip and mirror else a)
    return out


def photo_crops(cfg: PhotosConfig, name: str, photo: np.ndarray) -> list[np.ndarray]:
    """The train or test crops of one photograph: a pure function of (seed, name, index)."""
    return render_crops(cfg, photo, _boxes(cfg, name, photo.shape, cfg.crops_per_photo))


def _write_split(root: Path, crops: Iterable[tuple[str, list[np.ndarray]]], bar) -> int:
    """One split folder: ``<photograph>-<index>.png`` per crop and its metadata.jsonl; returns the number written."""
    root.mkdir()
    rows = []
    for name, images in crops:
        for i, a in enumerate(images):
            file = f"{name}-{i:05d}.png"
            (root / file).write_bytes(png_bytes(a))
            rows.append({"file_name": file, "text": caption(name)})
            bar.update(1)
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return len(rows)


def generate(cfg: PhotosConfig, dest: Path) -> dict:
    """Write the data set into the (empty) directory ``dest``; returns the number of crops per split."""
    counts = {}
    val_names = cfg.split["train"] if cfg.val_crops else ()
    total = cfg.crops_per_photo * sum(len(v) for v in cfg.split.values()) + cfg.val_crops * len(val_names)
    bar = progress(total=total, desc="cropping photographs")
    photos = {n: load_photo(n) for names in cfg.split.values() for n in names}
    for split, names in cfg.split.items():
        counts[split] = _write_split(dest / split, ((n, photo_crops(cfg, n, photos[n])) for n in names), bar)
    val = {}

    def val_crops():  # one photograph's crops at a time, counting any shortfall
        for name in val_names:
            crops = render_crops(cfg, photos[name], val_boxes(cfg, name, photos[name].shape))
            val[name] = len(crops)
            if len(crops) < cfg.val_crops:
                bar.update(cfg.val_crops - len(crops))
                log.warning("val: only %d of %d crops of %s show a square that no train crop shows; wrote those "
                            "(widen --min-scale/--max-scale for more)", len(crops), cfg.val_crops, name)
            yield name, crops

    if val_names:
        counts["val"] = _write_split(dest / "val", val_crops(), bar)
        if not counts["val"]:  # no free squares at all: no val split rather than an empty one
            shutil.rmtree(dest / "val")
            del counts["val"]
    bar.close()
    info = {"generator": "earlyfusion data photos", "version": 1, "image_size": cfg.image_size, "seed": cfg.seed,
            "crops_per_photo": cfg.crops_per_photo, "min_scale": cfg.min_scale, "max_scale": cfg.max_scale,
            "flip": cfg.flip, "split": {k: list(v) for k, v in cfg.split.items()},
            "captions": {n: caption(n) for names in cfg.split.values() for n in names}, "counts": counts,
            "val": {"photos": list(val_names), "crops_per_photo": cfg.val_crops, "crops": val,
                    "about": "new crops of the training photographs, none showing the square of a train crop"}}
    (dest / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return counts


def _check_room(cfg: PhotosConfig, parent: Path) -> None:
    """Refuse to start when the file system cannot hold the data set (estimated from a few crops)."""
    name = cfg.split["train"][0]
    sample = photo_crops(PhotosConfig(**{**vars(cfg), "crops_per_photo": min(4, cfg.crops_per_photo)}), name, load_photo(name))
    per_image = sum(len(png_bytes(a)) for a in sample) / len(sample) + 4096  # the file's block and its metadata line
    n = cfg.crops_per_photo * sum(len(v) for v in cfg.split.values()) + cfg.val_crops * len(cfg.split["train"])
    need, free = n * per_image, shutil.disk_usage(parent).free
    if need > 0.9 * free:
        raise UserError(f"{n} crops at {cfg.image_size} px need about {need / 1e9:.2f} GB but {parent} has "
                        f"{free / 1e9:.2f} GB free; write fewer (--crops-per-photo) or smaller crops, or elsewhere")


def generate_cmd(cfg: PhotosConfig) -> int:
    """``earlyfusion data photos``: write the crops to ``cfg.out``."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} exists and is not a photos data set (no {MARKER}); choose another directory or empty it")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_room(cfg, out.parent)
    with atomic_dir(out) as tmp:  # a previous photos data set is replaced only once the new one is complete
        counts = generate(cfg, tmp)
    split = cfg.split
    val = f", and {counts['val']} val crops of the training photographs" if "val" in counts else ""
    print(f"wrote {counts['train']} train crops of {len(split['train'])} photographs and {counts['test']} test crops of "
          f"{len(split['test'])} others ({', '.join(split['test'])}){val}, {cfg.image_size}x{cfg.image_size}, to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
