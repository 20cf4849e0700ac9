"""The analytic judge of the built-in shapes data: ``recognise`` reads a picture's shapes back from its pixels without
any model (palette classification, connected components, template matching), so evaluation can judge drawn images
attribute by attribute."""

from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image

from earlyfusion.training.shapes import (BACKGROUND, COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, ShapeSpec, shape_mask,
                                         shape_sizes)

_BG = np.array(BACKGROUND, np.float32)
_DIRS = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32) - _BG  # (C, 3) colour - background
_DIR_NORM2 = (_DIRS ** 2).sum(-1)  # (C,)
# A pixel farther than this from every colour/background blend line (noise, a foreign colour) is background.
_MAX_COLOUR_DIST = 70.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean (H, W) mask, each as an (N, 2) array of (row, col)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pix = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pix.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        out.append(np.array(pix, np.int64))
    return out


@lru_cache(maxsize=16)
def _templates(image_size: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(shape, size, pixel offsets (N, 2) relative to the centroid rounded, centroid) per template."""
    out = []
    for size, side in shape_sizes(image_size).items():
        for shape in SHAPES:
            pix = np.argwhere(shape_mask(shape, side))  # (N, 2)
            out.append((shape, size, pix, pix.mean(0)))
    return out


def _best_template(pix: np.ndarray, height: int, width: int) -> tuple[str, str, float]:
    """Template (shape, size) with the highest IoU against a component, aligned at the centroid ±1 px."""
    comp = np.zeros((height + 2, width + 2), bool)  # one pixel of margin so shifted templates index safely
    comp[pix[:, 0] + 1, pix[:, 1] + 1] = True
    bound = np.array([height + 2, width + 2])
    centroid = pix.mean(0)
    best = ("square", "small", -1.0)
    for shape, size, tpix, tcent in _templates(min(height, width)):
        base = np.floor(centroid - tcent + 0.5).astype(np.int64) + 1
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                placed = tpix + base + (dr, dc)  # (N, 2)
                inside = ((placed >= 0) & (placed < bound)).all(1)
                inter = int(comp[placed[inside, 0], placed[inside, 1]].sum())
                iou = inter / (len(pix) + len(placed) - inter)
                if iou > best[2]:
                    best = (shape, size, iou)
    return best


def recognise(img: Image.Image) -> frozenset[ShapeSpec]:
    """Read the shapes in an image analytically (no model): the judge for generated images.

    Each pixel is read as a blend of the background and one palette colour (the colour whose blend
    line it is nearest); it belongs to that colour if it is at least half of it, else to the
    background (so blurred edges split at the 50 % contour and areas survive blur); each 8-connected component of one colour that is not a speck is one shape: its
    centroid gives the grid cell (thirds of each side), the best-matching template (IoU, at the size the
    picture's short side gives) gives shape and size. Pictures of any shape are read as they are
    (``picture_of(*img.size)`` says which a caption would state).
    """
    img = img.convert("RGB")
    w, h = img.size
    a = np.asarray(img, np.float32) - _BG  # (h, w, 3) offsets from the background
    # Each pixel as a blend bg + alpha * (colour - bg): alpha and the distance off that line per colour.
    alpha = np.einsum("hwk,ck->hwc", a, _DIRS) / _DIR_NORM2  # (h, w, C)
    resid = np.linalg.norm(a[:, :, None, :] - alpha[..., None] * _DIRS, axis=-1)  # (h, w, C)
    resid[(alpha < 0.5) | (alpha > 1.6)] = np.inf  # under half the colour: background (keeps blurred areas)
    label = resid.argmin(-1)
    label[resid.min(-1) > _MAX_COLOUR_DIST] = len(COLOUR_NAMES)  # unknown -> background
    min_area = 0.4 * min(len(t[2]) for t in _templates(min(w, h)))
    found = []
    for ci, colour in enumerate(COLOUR_NAMES):
        mask = label == ci
        if not mask.any():
            continue
        for pix in _components(mask):
            if len(pix) < min_area:
                continue  # a speck of noise
            shape, size, _ = _best_template(pix, h, w)
            cy, cx = pix.mean(0) + 0.5
            row = min(2, max(0, int(cy * 3 // h)))
            col = min(2, max(0, int(cx * 3 // w)))
            found.append(ShapeSpec(shape, colour, size, POSITIONS[3 * row + col]))
    return frozenset(found)
