"""Image augmentation before encoding: several code grids per training image.

A small data set is memorised fast when every image is always the same grid of codes. With
``--augment-views K`` (K > 1) the code cache holds K grids per image: view 0 is the image as the
image tokenizer sees it without augmentation (the same pixels as a run without augmentation), views
1..K-1 are random square crops (a side between ``min_scale`` and 1 of the image's short side, at a
random sub-pixel place) resampled to the tokenizer's size, the odd-numbered ones mirrored left-right when ``flip``
is on. A mirrored view's caption has the words of ``swap`` exchanged (left and right by default:
"a square on the left" becomes "a square on the right"), so a caption that says where things are stays
true of its mirrored picture (``mirror_caption``). Images that keep their aspect ratio (a vocabulary with grid tokens, ``max_grid``) keep it in every view: a
crop has the image's own shape (each side between ``min_scale`` and 1 of the image's), so every view has the
code grid of view 0. Training shows each image one view per epoch, every view once in K epochs (``packing``).

Every view is a pure function of (seed, the image's bytes, view index) and the settings: the same
seed gives the same grids wherever the data lies, and the settings are part of the code cache's key
(``key``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from earlyfusion.tokenizer.preprocess import load_image, preprocess_for_codes


@dataclass(frozen=True)
class Augment:
    views: int
    """Code grids per image (view 0 unaugmented); 1 = no augmentation."""
    min_scale: float
    """Smallest crop side as a fraction of the image's short side."""
    flip: bool
    """Mirror half of the augmented views left-right (the odd-numbered ones)."""
    seed: int
    swap: tuple[tuple[str, str], ...] = ()
    """Word pairs exchanged in the caption of a mirrored view."""

    @property
    def active(self) -> bool:
        return self.views > 1

    def key(self) -> list:
        """What of the settings shapes the cached codes (part of the cache key when active)."""
        # "odd": which views are mirrored (a rule older caches, which mirrored at random, did not follow)
        return ["augment", self.views, round(self.min_scale, 6), self.flip, self.seed] + (["odd"] if self.flip else [])

    @property
    def mirrors_captions(self) -> bool:
        """Whether some views show a caption of their own: mirrored views with words to exchange."""
        return self.active and self.flip and bool(self.swap)

    def mirrored(self, view: int) -> bool:
        """Whether view ``view`` is mirrored: the odd-numbered views when flipping, so that half of the augmented
        views are, and a view's caption can be chosen without the image."""
        return self.flip and view % 2 == 1

    def mirror_caption(self, text: str) -> str:
        """The caption of a mirrored view: ``text`` with the words of each ``swap`` pair exchanged (whole words; a
        capitalised word stays capitalised)."""
        if not self.swap or not text:
            return text
        table = {}
        for a, b in self.swap:
            for x, y in ((a, b), (b, a)):
                table[x], table[x.capitalize()] = y, y.capitalize()
        pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(table, key=len, reverse=True)) + r")\b"
        return re.sub(pattern, lambda m: table[m.group(1)], text)

    def params(self, image: bytes, view: int) -> tuple[float, float, float, bool]:
        """(crop side fraction, left fraction, top fraction, mirror) of one augmented view of an image file's bytes."""
        digest = hashlib.sha256(f"{self.seed}/{view}/".encode() + hashlib.sha256(image).digest()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        scale, left, top, _ = rng.random(4).tolist()  # four draws, the last unused: crops stay those of existing code caches
        return self.min_scale + (1.0 - self.min_scale) * scale, left, top, self.mirrored(view)

    def pixels(self, src: str | Path | bytes, size: int, max_grid: tuple[int, int] | None = None,
               downsample: int = 1) -> list[torch.Tensor]:
        """The K views of an image file (path or bytes) as tensors in [-1, 1]; view 0 is
        ``preprocess_for_codes(src, size, downsample, max_grid)``: (3, size, size), or with ``max_grid`` (images that
        keep their aspect ratio) the image at its own grid, a shape every view has. Raises ImageError for a bad
        image."""
        out = [preprocess_for_codes(src, size, downsample, max_grid)]
        if self.views == 1:
            return out
        target = (out[0].shape[2], out[0].shape[1])  # (width, height) of every view
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
        img = load_image(data, shrink_to=math.ceil(max(target) / self.min_scale))
        w, h = img.size
        for view in range(1, self.views):
            scale, left, top, mirror = self.params(data, view)
            if max_grid is None:
                cw = ch = min(w, h) * scale
            else:
                cw, ch = w * scale, h * scale
            x, y = left * (w - cw), top * (h - ch)
            # one resample of a sub-pixel box: small images get as many different crops as large ones
            crop = img.resize(target, Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
            if mirror:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # already the size, only converted
            out.append(preprocess_for_codes(crop, size, downsample, max_grid))
            if out[-1].shape != out[0].shape:  # pragma: no cover - aspect_grid gives a grid its own size back
                raise ValueError(f"augmented view of shape {tuple(out[-1].shape)}, not {tuple(out[0].shape)}")
        return out

NO_AUGMENT = Augment(views=1, min_scale=1.0, flip=False, seed=0)


def parse_swap(text: str | None) -> tuple[tuple[str, str], ...]:
    """'left:right,east:west' -> (("left", "right"), ("east", "west")); '' or 'none' -> (); ValueError naming the
    option otherwise."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    pairs = []
    for item in text.split(","):
        words = [w.strip() for w in item.split(":")]
        if len(words) != 2 or not all(re.fullmatch(r"[^\W\d_][\w'-]*", w) for w in words) or words[0] == words[1]:
            raise ValueError(f"--augment-flip-words takes word pairs such as left:right,east:west (or none), "
                             f"got {item.strip()!r}")
        pairs.append((words[0].lower(), words[1].lower()))
    seen = [w for pair in pairs for w in pair]
    if len(set(seen)) != len(seen):
        raise ValueError(f"--augment-flip-words names a word twice in {text!r}")
    return tuple(pairs)
