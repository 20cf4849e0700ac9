"""The built-in data set: one or two coloured shapes on a plain background, with templated captions.

Designed so that a tiny model can learn it on a CPU in minutes and an analytic judge can read it:

* a fixed vocabulary of attributes (``SHAPES``, ``COLOURS``, ``SIZES``, ``POSITIONS``), exposed here so
  evaluation can parse captions back into attributes (``parse_caption``);
* deterministic rendering: each shape is drawn at the centre of its cell of a 3x3 grid, with a fixed
  pixel size per size class and hard edges (no anti-aliasing, no jitter), so every attribute tuple is
  exactly one pixel pattern; two shapes never share a cell or a colour and never overlap;
* canvases of any listed size (``--sizes``, width x height): the 3x3 cells spread over the whole canvas, the shapes
  sized by its short side; a caption of a picture that is not square starts by saying so ("a wide picture: ",
  "a tall picture: "), a square one is as it always was;
* ``caption`` lists shapes in position order, so the caption is a function of the image;
* ``training.shapes_judge.recognise`` reads the attributes back from pixels without any model, so it can judge
  generated images.

``generate_cmd`` (``earlyfusion data shapes``) writes the image-caption pairs (imagefolder layout),
OBELICS-style interleaved documents and text-only lines.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import progress
from earlyfusion.core.options import MAX_SEED, check_number

# ---------------------------------------------------------------- attribute vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 165, 45),
    "blue": (25, 55, 230),
    "yellow": (245, 210, 10),
    "purple": (160, 35, 175),
    "cyan": (15, 195, 215),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                              "bottom left", "bottom", "bottom right")
# How each position is said in a caption ("... at the top left", "... in the centre").
POSITION_PHRASES: dict[str, str] = {p: f"at the {p}" for p in POSITIONS} | {
    "left": "on the left", "right": "on the right", "centre": "in the centre"}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

COLOUR_NAMES = list(COLOURS)  # in the palette's order (the text lines draw from it by index)
MAX_SHAPES = 2  # shapes per image: 1 or 2, about half each

# The shape of a picture, as a caption says it: a square picture's caption says nothing about it.
SQUARE, WIDE, TALL = "square", "wide", "tall"
PICTURES: tuple[str, ...] = (SQUARE, WIDE, TALL)
PICTURE_PREFIX: dict[str, str] = {SQUARE: "", WIDE: "a wide picture: ", TALL: "a tall picture: "}


def picture_of(width: int, height: int) -> str:
    """SQUARE, WIDE (wider than tall) or TALL: what a caption says of a ``width`` x ``height`` picture."""
    return SQUARE if width == height else WIDE if width > height else TALL


def _canvas(size) -> tuple[int, int]:
    """(width, height) of an image size given as one side (a square) or as (width, height)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


@dataclass(frozen=True, order=True)
class ShapeSpec:
    """One shape in a scene: all four attributes are names from the vocabulary above."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.size, SIZES, "size"), (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"


def _position_key(s: ShapeSpec) -> tuple:
    return (POSITIONS.index(s.position), s.shape, s.colour, s.size)


def caption(specs, picture: str = SQUARE) -> str:
    """'a small red circle at the top left and a large blue square at the bottom' (position order); a picture that
    is not square (``picture`` WIDE or TALL) starts with 'a wide picture: ' / 'a tall picture: '."""
    specs = sorted(specs, key=_position_key)
    if not specs:
        raise ValueError("a scene needs at least one shape")
    if picture not in PICTURE_PREFIX:
        raise ValueError(f"unknown picture shape {picture!r}; expected one of {', '.join(PICTURES)}")
    return PICTURE_PREFIX[picture] + " and ".join(s.phrase() for s in specs)


_PHRASE_RE = re.compile(
    r"a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) (?P<where>{})".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES),
        "|".join(re.escape(p) for p in sorted(POSITION_PHRASES.values(), key=len, reverse=True))))
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text: str) -> frozenset[ShapeSpec] | None:
    """Invert ``caption``: the set of shapes a caption names (whatever picture shape it states), or None if it is not
    one of ours.

    Tolerates case, surrounding/repeated whitespace and a trailing full stop (model output).
    """
    parsed = parse_picture(text)
    return None if parsed is None else parsed[1]


def parse_picture(text: str) -> tuple[str, frozenset[ShapeSpec]] | None:
    """Invert ``caption`` whole: (the picture's shape, SQUARE when the caption states none; the shapes it names), or
    None if it is not one of ours."""
    if not isinstance(text, str):
        return None
    norm = " ".join(text.lower().split()).rstrip(".").strip()
    picture = SQUARE
    for name, prefix in PICTURE_PREFIX.items():
        if prefix and norm.startswith(prefix.strip()):
            picture, norm = name, norm[len(prefix.strip()):].strip()
            break
    if not norm:
        return None
    specs = []
    for part in norm.split(" and "):
        m = _PHRASE_RE.fullmatch(part)
        if m is None:
            return None
        specs.append(ShapeSpec(m["shape"], m["colour"], m["size"], _PHRASE_TO_POSITION[m["where"]]))
    if len({s.position for s in specs}) != len(specs):
        return None  # two shapes in one cell: no image can show that
    return picture, frozenset(specs)


# ---------------------------------------------------------------- geometry and rendering


def shape_sizes(image_size: int) -> dict[str, int]:
    """Side of the square a shape occupies, per size class (scaled with the image; always fits a cell)."""
    return {"small": max(3, image_size * 7 // 32), "large": max(5, image_size * 5 // 16)}


def _cell_centre(index: int, extent: int) -> float:
    return (index + 0.5) * extent / 3


@lru_cache(maxsize=64)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape: hard edges, decided at pixel centres."""
    c = np.arange(side) + 0.5 - side / 2  # pixel-centre offsets from the middle
    if shape == "square":
        m = np.ones((side, side), bool)
    elif shape == "circle":
        m = (c[:, None] ** 2 + c[None, :] ** 2) <= (side / 2) ** 2
        if m.all():  # tiny circles: drop the corners so a circle never equals a square
            m[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    elif shape == "triangle":  # apex up, base along the bottom row, half-width grows 1/2 px per row
        rows = np.arange(side)[:, None]
        m = np.abs(c[None, :]) <= (rows + 1) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def _placements(width: int, height: int | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """(size, position) -> top-left pixel of the shape's box, centred in its grid cell, on a ``width`` x ``height``
    canvas (square when ``height`` is None); shapes are sized by the short side."""
    height = width if height is None else height
    out = {}
    for size, side in shape_sizes(min(width, height)).items():
        for p, pos in enumerate(POSITIONS):
            row, col = divmod(p, 3)
            top = math.floor(_cell_centre(row, height) - side / 2 + 0.5)
            left = math.floor(_cell_centre(col, width) - side / 2 + 0.5)
            out[size, pos] = (top, left)
    return out


def render_array(specs, image_size: int | tuple[int, int] = 32) -> np.ndarray:
    """uint8 (height, width, 3) rendering of a scene; ``image_size``: the side of a square, or (width, height)."""
    width, height = _canvas(image_size)
    a = np.empty((height, width, 3), np.uint8)
    a[:] = BACKGROUND
    sides = shape_sizes(min(width, height))
    places = _placements(width, height)
    for s in specs:
        side = sides[s.size]
        top, left = places[s.size, s.position]
        box = a[top:top + side, left:left + side]  # (side, side, 3) view
        box[shape_mask(s.shape, side)] = COLOURS[s.colour]
    return a


def render(specs, image_size: int | tuple[int, int] = 32) -> Image.Image:
    """The image of a scene (RGB; ``image_size``: the side of a square, or (width, height))."""
    return Image.fromarray(render_array(specs, image_size), "RGB")


def random_scene(rng: np.random.Generator) -> frozenset[ShapeSpec]:
    """One or two shapes (about half each) in distinct cells with distinct colours."""
    n = 1 + int(rng.integers(MAX_SHAPES))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    names = list(COLOURS)
    return frozenset(
        ShapeSpec(SHAPES[int(rng.integers(len(SHAPES)))], names[int(c)], SIZES[int(rng.integers(len(SIZES)))],
                  POSITIONS[int(p)])
        for p, c in zip(positions, colours))


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
        if self.num_interleaved > MAX_ITEMS or self.num_text > MAX_ITEMS:
            raise ValueError(f"--num-interleaved and --num-text must be at most {MAX_ITEMS}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.num_interleaved < 0 or self.num_text < 0:
            raise ValueError("--num-interleaved and --num-text must be >= 0")


MARKER = "shapes.json"  # written into DIR; identifies the built-in data set (and lets us replace it)


def png_bytes(a: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as the PNG file the built-in data sets write."""
    b = io.BytesIO()
    Image.fromarray(a, "RGB").save(b, "PNG", optimize=False, compress_level=6)
    return b.getvalue()


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
    if n_val:  # streams of their own, after the others: train and test do not depend on the val split
        val_rng = np.random.default_rng([cfg.seed, 4])
        val_canvases = [sizes[int(k)] for k in val_rng.integers(len(sizes), size=n_val)]
        _write_split(dest / "val", [random_scene(val_rng) for _ in range(n_val)], val_canvases)
    doc_rng = np.random.default_rng([cfg.seed, 1])
    with open(dest / "interleaved.jsonl", "w", encoding="utf-8") as f:
        for doc in _interleaved_docs(doc_rng, train, cfg.num_interleaved):
            f.write(json.dumps(doc) + "\n")
    text_rng = np.random.default_rng([cfg.seed, 2])
    with open(dest / "text.jsonl", "w", encoding="utf-8") as f:
        for _ in range(cfg.num_text):
            f.write(json.dumps({"text": _describe_attribute(text_rng)}) + "\n")
    counts = {"train": n_train, "test": n_test, "interleaved": cfg.num_interleaved, "text": cfg.num_text}
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
    need = cfg.num_images * per_image + (cfg.num_interleaved + cfg.num_text) * 200
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
          f"{counts['interleaved']} interleaved documents and {counts['text']} text lines to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
