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

``shapes_data`` writes the data set (``earlyfusion data shapes``), ``shapes_chat`` its conversations.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


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


MARKER = "shapes.json"  # written into DIR; identifies the built-in data set (and lets us replace it)


def png_bytes(a: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as the PNG file the built-in data sets write."""
    b = io.BytesIO()
    Image.fromarray(a, "RGB").save(b, "PNG", optimize=False, compress_level=6)
    return b.getvalue()
