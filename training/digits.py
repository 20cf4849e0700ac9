"""Real handwriting as built-in data: ``earlyfusion data digits``, the handwritten digits that ship with scikit-learn.

scikit-learn's wheel holds 1,797 handwritten digits (8x8 pixels, 17 grey levels, about 180 of each of the ten
classes; ``sklearn.datasets.load_digits`` reads them from the package, nothing is downloaded). Each is written as
an ``image_size`` px picture, dark ink on white, enlarged with bicubic filtering, and captioned with one fixed
sentence per class ("a handwritten digit seven"): a small real data set with a closed caption set, on which
``earlyfusion eval`` scores reading and drawing by class (``earlyfusion.class_judge``).

Per class, the digits are shuffled by ``seed`` and dealt out: ``test_fraction`` of them to DIR/test (what eval
scores), ``val_fraction`` to DIR/val (what train picks its best checkpoint on) and the rest to DIR/train. Every
file is a pure function of (seed, fractions, size): the same options write byte-identical files. The layout is the
imagefolder one that the other makers write (PNG files and a ``metadata.jsonl`` of ``{"file_name", "text"}`` per
split), plus ``DIR/digits.json`` describing the set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from earlyfusion.core.checkpoint import atomic_dir
from earlyfusion.core.errors import UserError
from earlyfusion.core.options import MAX_SEED, check_number
from earlyfusion.training.shapes import png_bytes


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MARKER = "digits.json"  # written into DIR; identifies the data set (and lets a rerun replace it)
LEVELS = 16  # the digits' darkest grey level (they run 0..16)


def caption(label: int) -> str:
    return f"a handwritten digit {WORDS[label]}"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) in 0..16, labels (N,)) from scikit-learn's package files; a one-line error without it."""
    try:
        from sklearn import datasets  # only this maker needs scikit-learn (the `digits` extra)
    except ImportError:
        raise UserError("`earlyfusion data digits` needs scikit-learn, whose package holds the digits: "
                        "pip install 'earlyfusion[digits]' (or scikit-learn)") from None
    d = datasets.load_digits()
    return np.asarray(d.images, dtype=np.uint8), np.asarray(d.target, dtype=np.int64)


@dataclass
class DigitsConfig:
    out: str
    """Output directory (created; a previous digits data set there is replaced)."""
    image_size: int = 32
    """Side of each picture in pixels (8 to 256); the digits are 8x8 and enlarged with bicubic filtering."""
    test_fraction: float = 0.2
    """Share of each class written to DIR/test, the split eval scores."""
    val_fraction: float = 0.1
    """Share of each class written to DIR/val, the split train picks its best checkpoint on (0 = none: train then
    validates on test)."""
    seed: int = 0
    """Which digits go to which split: the same seed writes byte-identical files."""

    def __post_init__(self):
        check_number("image-size", self.image_size, 8, 256)
        check_number("test-fraction", self.test_fraction, 0, 1)
        check_number("val-fraction", self.val_fraction, 0, 1)
        check_number("seed", self.seed, 0, MAX_SEED)
        if not 0 < self.test_fraction or self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError(f"--test-fraction must be above 0 and --test-fraction + --val-fraction below 0.9, got "
                             f"{self.test_fraction} and {self.val_fraction}")


def picture(digit: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (0..16, 16 = ink) as uint8 RGB (size, size, 3): dark ink on white, bicubic."""
    gray = Image.fromarray((255 - digit.astype(np.float64) * 255 / LEVELS).round().astype(np.uint8), "L")
    big = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC))
    return np.repeat(big[:, :, None], 3, axis=2)


def assign(labels: np.ndarray, cfg: DigitsConfig) -> dict[str, list[int]]:
    """Indices of the digits of each split: per class a ``seed`` shuffle dealt as test, val, then train."""
    rng = np.random.default_rng([cfg.seed, 8])
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(len(WORDS)):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        n_test, n_val = round(cfg.test_fraction * len(idx)), round(cfg.val_fraction * len(idx))
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test:n_test + n_val]
        out["train"] += idx[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items() if v}


def generate(cfg: DigitsConfig, dest: Path) -> dict[str, int]:
    """Write the data set into the (empty) directory ``dest``; returns the number of pictures per split."""
    images, labels = load_digits()
    counts = {}
    for split, idx in assign(labels, cfg).items():
        root = dest / split
        root.mkdir()
        rows = []
        for i in idx:
            file = f"{WORDS[labels[i]]}-{i:04d}.png"
            (root / file).write_bytes(png_bytes(picture(images[i], cfg.image_size)))
            rows.append(json.dumps({"file_name": file, "text": caption(int(labels[i]))}) + "\n")
        (root / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")
        counts[split] = len(idx)
    info = {"generator": "earlyfusion data digits", "version": 1, "image_size": cfg.image_size, "seed": cfg.seed,
            "test_fraction": cfg.test_fraction, "val_fraction": cfg.val_fraction, "counts": counts,
            "captions": {w: caption(c) for c, w in enumerate(WORDS)},
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test part)"}
    (dest / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return counts


def generate_cmd(cfg: DigitsConfig) -> int:
    """``earlyfusion data digits``: write the pictures to ``cfg.out``."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} exists and is not a digits data set (no {MARKER}); choose another directory or empty it")
    load_digits()  # a missing scikit-learn fails before anything is written
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:  # a previous digits data set is replaced only once the new one is complete
        counts = generate(cfg, tmp)
    print(f"wrote {', '.join(f'{n} {k}' for k, n in counts.items())} handwritten digits, {cfg.image_size}x"
          f"{cfg.image_size}, to {out} in {time.perf_counter() - t0:.1f}s")
    return 0
