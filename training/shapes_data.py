"""``earlyfusion data shapes``: the built-in data set written to a directory, from the scene grammar of ``shapes``.

DIR/train, DIR/test (held out; what eval scores) and DIR/val (what training validates on) as imagefolders of
image-caption pairs; DIR/interleaved.jsonl (OBELICS-style documents of training images and text around them);
DIR/text.jsonl (sentences in the attribute vocabulary); with ``--num-conversations``, DIR/conversations.json and the
held-out DIR/conversations_test.json (``shapes_chat``); DIR/shapes.json says what was written. The same seed writes
byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import progress
from earlyfusion.core.options import MAX_SEED, check_number
from earlyfusion.training.shapes import (
    BACKGROUND,
    COLOUR_NAMES,
    COLOURS,
    MARKER,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    caption,
    picture_of,
    png_bytes,
    random_scene,
    render_array,
)
from earlyfusion.training.shapes_chat import write_conversations


# ---------------------------------------------------------------- text for the other data kinds

_T2I_BEFORE = ("here is a picture of {}.", "a picture of {}:", "look at this image of {}.")
_T2I_NEXT = ("and here is one of {}.", "next, {}:", "now a picture of {}.")
_I2T_AFTER = ("this picture shows {}.", "above: {}.", "in this image there is {}.")


def _describe_attribute(rng: np.random.Generator) -> str:
    """A sentence using the attribute vocabulary (for the text-only lines)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
    kind = int(rng.integers(6))
    if kind == 0:
        return f"there is {caption(random_scene(rng))}."
    if kind == 1:
        return f"a {colour} {shape} can be small or large."
    if kind == 2:
        return f"a large {shape} is bigger than a small {shape}."
    if kind == 3:
        return f"a picture can show a {shape} {POSITION_PHRASES[pos]}."
    if kind == 4:
        others = [c for c in COLOUR_NAMES if c != colour]
        return f"the {shape} is {colour}, not {others[int(rng.integers(len(others)))]}."
    return "the shapes are " + ", ".join(SHAPES[:-1]) + f" and {SHAPES[-1]}; the colours are " + \
        ", ".join(COLOUR_NAMES[:-1]) + f" and {COLOUR_NAMES[-1]}."


# ---------------------------------------------------------------- the CLI command


MAX_ITEMS = 10_000_000
MAX_IMAGE_SIZE = 1024
MAX_ASPECT = 4  # the long side of a canvas is at most this many times its short side
MAX_SIZES = 16  # canvas sizes in one data set
_SIZE_RE = re.compile(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", re.IGNORECASE)


def _check_side(what: str, n: int) -> None:
    if not 16 <= n <= MAX_IMAGE_SIZE or n % 8:
        raise ValueError(f"{what} must be a multiple of 8 between 16 and {MAX_IMAGE_SIZE}, got {n}")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'32x32,48x32' -> [(32, 32), (48, 32)] (width, height); ValueError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--sizes needs at least one WIDTHxHEIGHT, e.g. 32x32,48x32")
    out = []
    for item in text.split(","):
        m = _SIZE_RE.fullmatch(item)
        if m is None:
            raise ValueError(f"--sizes: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 48x32)")
        w, h = int(m[1]), int(m[2])
        _check_side(f"--sizes {w}x{h}: each side", w)
        _check_side(f"--sizes {w}x{h}: each side", h)
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"--sizes {w}x{h}: the long side may be at most {MAX_ASPECT} times the short side")
        if (w, h) in out:
            raise ValueError(f"--sizes lists {w}x{h} twice")
        out.append((w, h))
    if len(out) > MAX_SIZES:
        raise ValueError(f"--sizes lists {len(out)} sizes; at most {MAX_SIZES}")
    return out


@dataclass
class ShapesConfig:
    out: str
    """Output directory (created; a previous shapes data set there is replaced)."""
    num_images: int = 10000
    """Image-caption pairs in train + test (the val split comes on top)."""
    image_size: int = 32
    """Image side in pixels (multiple of 8, at least 16; shape geometry scales with it)."""
    sizes: str | None = None
    """Canvas sizes WIDTHxHEIGHT, comma-separated (e.g. 32x32,48x32): each scene is drawn on one of them, chosen at
    random, with the 3x3 cells spread over the canvas, and the caption of a canvas that is not square starts with
    "a wide picture:" or "a tall picture:". For training a model on several aspect ratios (with a vocabulary built
    by `vocab build --grid-tokens`). Each side a multiple of 8 from 16 to 1024, at most 4:1; unset = one square of
    --image-size."""
    seed: int = 0
    """Random seed: the same seed writes byte-identical files."""
    test_fraction: float = 0.1
    """Fraction of the pairs written to DIR/test (held out; what eval scores)."""
    val_fraction: float = 0.05
    """Pairs written to DIR/val, as a fraction of --num-images, on top of them (held out; what training validates on
    and keeps its best model by, so that choosing the model never looks at the test pairs; the train and test pairs
    are the same whatever it is); 0 = no val split (training then validates on test)."""
    num_interleaved: int = 1000
    """Interleaved documents (OBELICS-style texts/images lists) in DIR/interleaved.jsonl."""
    num_text: int = 1000
    """Text-only lines in DIR/text.jsonl."""
    num_conversations: int = 0
    """Conversations in LLaVA's JSON format in DIR/conversations.json (pictures in DIR/chat), and the test fraction of
    as many more held out in DIR/conversations_test.json (DIR/chat_test): questions about one picture (colour, shape,
    size, position, count, yes/no), questions about two (which has a shape, what changed) and edits answered with
    the edited picture (recolour, move, resize, add, remove). Held-out conversations show only two-shape scenes that
    no training pair or conversation shows. Drawn on the first canvas size."""

    def canvases(self) -> list[tuple[int, int]]:
        """The (width, height) of every canvas the scenes are drawn on."""
        return parse_sizes(self.sizes) if self.sizes is not None else [(self.image_size, self.image_size)]

    def __post_init__(self):
        if self.sizes is not None:
            parse_sizes(self.sizes)
            if self.image_size != ShapesConfig.image_size:
                raise ValueError("--sizes lists every canvas size; give it or --image-size, not both")
        if not 2 <= self.num_images <= MAX_ITEMS:
            raise ValueError(f"--num-images must be between 2 (one train and one test image) and {MAX_ITEMS}, got {self.num_images}")
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE or self.image_size % 8:
            raise ValueError(f"--image-size must be a multiple of 8 between 16 and {MAX_IMAGE_SIZE}, got {self.image_size}")
        check_number("seed", self.seed, 0, MAX_SEED)
        if max(self.num_interleaved, self.num_text, self.num_conversations) > MAX_ITEMS:
            raise ValueError(f"--num-interleaved, --num-text and --num-conversations must be at most {MAX_ITEMS}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if min(self.num_interleaved, self.num_text, self.num_conversations) < 0:
            raise ValueError("--num-interleaved, --num-text and --num-conversations must be >= 0")


def _write_split(root: Path, scenes: list[frozenset[ShapeSpec]], canvases: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """Write one split: scene i on canvas ``canvases[i]`` (width, height), its caption stating a canvas that is not
    square."""
    root.mkdir(parents=True)
    width = max(6, len(str(len(scenes) - 1)))
    rows = []
    for i, (scene, canvas) in enumerate(progress(list(zip(scenes, canvases)), desc=f"writing {root.name}")):
        name = f"{i:0{width}d}.png"
        (root / name).write_bytes(png_bytes(render_array(scene, canvas)))
        rows.append((name, caption(scene, picture_of(*canvas))))
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for name, text in rows:
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return rows


def _interleaved_docs(rng: np.random.Generator, train: list[tuple[str, str]], n: int) -> list[dict]:
    docs = []
    for _ in range(n):
        k = 1 + int(rng.integers(3))
        texts: list[str | None] = []
        images: list[str | None] = []
        for j in range(k):
            name, text = train[int(rng.integers(len(train)))]
            path = f"train/{name}"  # relative to interleaved.jsonl
            if rng.random() < 0.5:  # text then image (drawing direction)
                tpl = (_T2I_BEFORE if j == 0 else _T2I_NEXT)[int(rng.integers(3))]
                texts += [tpl.format(text), None]
                images += [None, path]
            else:  # image then text (reading direction)
                texts += [None, _I2T_AFTER[int(rng.integers(3))].format(text)]
                images += [path, None]
        docs.append({"texts": texts, "images": images})
    return docs


def generate(cfg: ShapesConfig, dest: Path) -> dict:
    """Write the data set into ``dest`` (must not exist); returns the counts written."""
    rng = np.random.default_rng(cfg.seed)
    scenes = [random_scene(rng) for _ in range(cfg.num_images)]
    sizes = cfg.canvases()
    if len(sizes) == 1:
        canvases = sizes * cfg.num_images
    else:  # a stream of its own: the scenes are those of a one-size data set of the same seed
        canvases = [sizes[int(k)] for k in np.random.default_rng([cfg.seed, 3]).integers(len(sizes), size=cfg.num_images)]
    n_test = min(cfg.num_images - 1, max(1, round(cfg.num_images * cfg.test_fraction)))
    n_train = cfg.num_images - n_test
    dest.mkdir(parents=True)
    train = _write_split(dest / "train", scenes[:n_train], canvases[:n_train])
    _write_split(dest / "test", scenes[n_train:], canvases[n_train:])
    n_val = round(cfg.num_images * cfg.val_fraction)
    val_scenes = []
    if n_val:  # streams of their own, after the others: train and test do not depend on the val split
        val_rng = np.random.default_rng([cfg.seed, 4])
        val_canvases = [sizes[int(k)] for k in val_rng.integers(len(sizes), size=n_val)]
        val_scenes = [random_scene(val_rng) for _ in range(n_val)]
        _write_split(dest / "val", val_scenes, val_canvases)
    doc_rng = np.random.default_rng([cfg.seed, 1])
    with open(dest / "interleaved.jsonl", "w", encoding="utf-8") as f:
        for doc in _interleaved_docs(doc_rng, train, cfg.num_interleaved):
            f.write(json.dumps(doc) + "\n")
    text_rng = np.random.default_rng([cfg.seed, 2])
    with open(dest / "text.jsonl", "w", encoding="utf-8") as f:
        for _ in range(cfg.num_text):
            f.write(json.dumps({"text": _describe_attribute(text_rng)}) + "\n")
    counts = {"train": n_train, "test": n_test, "interleaved": cfg.num_interleaved, "text": cfg.num_text}
    if cfg.num_conversations:
        written = write_conversations(dest, cfg.num_conversations, max(1, round(cfg.num_conversations * cfg.test_fraction)),
                                      cfg.seed, sizes[0], set(scenes[:n_train]),
                                      set(scenes[n_train:] + val_scenes) - set(scenes[:n_train]))
        counts["conversations"], counts["conversations_test"] = written["conversations.json"], \
            written["conversations_test.json"]
    if n_val:
        counts["val"] = n_val
    square = len(sizes) == 1 and sizes[0][0] == sizes[0][1]
    info = {"generator": "earlyfusion data shapes", "version": 1, "image_size": sizes[0][0], "seed": cfg.seed,
            "counts": counts, "shapes": list(SHAPES), "colours": COLOURS, "sizes": list(SIZES),
            "positions": list(POSITIONS), "background": list(BACKGROUND)}
    if not square:  # one square canvas: the file is as it always was
        del info["image_size"]
        info["canvases"] = [list(c) for c in sizes]
    (dest / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return counts


def _sizes_text(sizes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sizes)


def _check_room(cfg: ShapesConfig, parent: Path) -> None:
    """Estimate what the data set will take on disk (from a few rendered images) and refuse to start when the
    file system cannot hold it, instead of filling it."""
    rng = np.random.default_rng(cfg.seed)
    sizes = cfg.canvases()
    sample = [len(png_bytes(render_array(random_scene(rng), sizes[i % len(sizes)]))) for i in range(8)]
    per_image = sum(sample) / len(sample) + 4096  # the file's block and its metadata line
    need = (cfg.num_images + 2 * cfg.num_conversations) * per_image + (cfg.num_interleaved + cfg.num_text) * 200 + \
        cfg.num_conversations * 400
    free = shutil.disk_usage(parent).free
    if need > 0.9 * free:
        raise UserError(f"--num-images {cfg.num_images} at {_sizes_text(sizes)} px needs about {need / 1e9:.2f} GB but "
                        f"{parent} has {free / 1e9:.2f} GB free; write fewer or smaller images, or elsewhere")
    if need > 1e9:
        print(f"writing about {need / 1e9:.1f} GB ({cfg.num_images} images)", flush=True)


def generate_cmd(cfg: ShapesConfig) -> int:
    """``earlyfusion data shapes``: write the built-in data set to ``cfg.out``."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} exists and is not a shapes data set (no {MARKER}); "
                        "choose another directory or empty it")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_room(cfg, out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        counts = generate(cfg, tmp / "data")
        if out.exists():  # replace a previous shapes data set (never mix old and new files)
            old = tmp / "old"
            os.replace(out, old)
        os.replace(tmp / "data", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    val = f" + {counts['val']} val" if counts.get("val") else ""
    print(f"wrote {counts['train']} train{val} + {counts['test']} test images ({_sizes_text(cfg.canvases())}), "
          f"{counts['interleaved']} interleaved documents and {counts['text']} text lines"
          + (f", {counts['conversations']} + {counts['conversations_test']} held-out conversations"
             if counts.get("conversations") else "") + f" to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
