"""Which photograph is an image a crop of: the judge of drawn images on ``earlyfusion data photos`` data.

A data set from ``earlyfusion data photos`` captions every crop with one fixed sentence per photograph
(its ``photos.json`` lists them), so reading and drawing can both be scored by photograph:

* a caption names photograph X when its words are X's caption, or when the words that set X's caption
  apart from the others' (what is left after the words all captions share at the start and the end:
  "cameraman", "brick wall") occur in it and no other photograph's do (``photo_of_caption``);
* an image is judged by a classifier trained on the real training crops (``train_judge``): multinomial
  logistic regression on fixed colour, gradient and texture statistics of the image shrunk to at most
  ``JUDGE_SIZE`` px (colour moments and histograms, a coarse colour layout, gradient magnitude and
  orientation histograms and local binary patterns at two scales). Training crops are also shown
  blurred (shrunk and enlarged again), so that the softness of a tokenizer's reconstruction is not
  taken for a property of one photograph. Its accuracy on real crops it was not trained on is the
  ceiling for drawn images.

Full-batch L-BFGS from zero weights on a CPU: the same images and ``seed`` (which only picks how much
each blurred copy is blurred) give the same judge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.scores import tokenize
from earlyfusion.tokenizer.preprocess import preprocess
from earlyfusion.training.data.records import SkipReport, pair_records

JUDGE_SIZE = 32  # images are judged at this side (or their own, when smaller): the drawn images' scale of detail
WEIGHT_DECAY = 1e-3  # L2 penalty on the logistic weights, per training image
STEPS = 40  # L-BFGS iterations: it has settled by then on photographs
_EPS = 1e-6


# ---------------------------------------------------------------- captions back to photographs


def _distinct_words(captions: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Per photograph, its caption's words without the words every caption starts and ends with."""
    words = {n: tuple(tokenize(c)) for n, c in captions.items()}
    seqs = list(words.values())
    head = 0
    while all(len(w) > head for w in seqs) and len({w[head] for w in seqs}) == 1:
        head += 1
    tail = 0
    while all(len(w) > head + tail for w in seqs) and len({w[len(w) - 1 - tail] for w in seqs}) == 1:
        tail += 1
    return {n: w[head:len(w) - tail] or w for n, w in words.items()}


def _contains(words: Sequence[str], part: Sequence[str]) -> bool:
    return any(tuple(words[i:i + len(part)]) == tuple(part) for i in range(len(words) - len(part) + 1))


def photo_of_caption(text: str, captions: Mapping[str, str]) -> str | None:
    """The photograph (a key of ``captions``) that ``text`` names, or None when it names none or several."""
    words = tokenize(text)
    exact = [n for n, c in captions.items() if tokenize(c) == words]
    if len(exact) == 1:
        return exact[0]
    named = [n for n, part in _distinct_words(captions).items() if _contains(words, part)]
    return named[0] if len(named) == 1 else None


# ---------------------------------------------------------------- a photos data set on disk


def read_photos_info(data: Path) -> dict | None:
    """The ``photos.json`` of a ``data photos`` directory, or None when ``data`` is not one."""
    path = Path(data) / "photos.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not readable as JSON ({e}); rewrite the data set with `earlyfusion data photos`") from None
    if not isinstance(info, dict) or info.get("generator") != "earlyfusion data photos" or not isinstance(info.get("captions"), dict):
        return None
    return info


def load_split(root: Path, captions: Mapping[str, str], size: int) -> tuple[torch.Tensor, list[str], int]:
    """The images of an imagefolder split whose caption is one of ``captions`` as (N, 3, size, size) in [-1, 1],
    their photographs, and how many rows were skipped (another caption, or a file that is missing or not an image)."""

    by_caption = {tuple(tokenize(c)): n for n, c in captions.items()}
    meta = Path(root) / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{root}: no metadata.jsonl; rewrite the data set with `earlyfusion data photos`")
    images, labels, skipped = [], [], 0
    report = SkipReport()  # the data rules of training: paths confined to the split, lines bounded, bad JSON counted
    for _, path, text in pair_records(Path(root), "text", report):
        name = by_caption.get(tuple(tokenize(text))) if text else None
        if name is None:
            skipped += 1
            continue
        try:
            images.append(preprocess(path, size))
        except (ValueError, OSError, UserError):
            skipped += 1
            continue
        labels.append(name)
    skipped += report.total
    if not images:
        return torch.zeros(0, 3, size, size), [], skipped
    return torch.stack(images), labels, skipped


def pil_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (N, 3, H, W) in [-1, 1]."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------- features


def _count(idx: torch.Tensor, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of bin indices ``idx`` (N, M) in [0, bins), the normalised histogram (N, bins)."""
    rows = torch.arange(idx.shape[0]).unsqueeze(1) * bins  # one bincount over every image at once
    flat = (idx.long() + rows).flatten()
    h = torch.bincount(flat, None if weights is None else weights.flatten(), minlength=idx.shape[0] * bins)
    h = h.view(idx.shape[0], bins).float()
    return h / h.sum(1, keepdim=True).clamp_min(_EPS)


def _histogram(values: torch.Tensor, bins: int, lo: float, hi: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, the normalised histogram of ``values`` (N, M) over ``bins`` equal bins of [lo, hi]."""
    return _count(((values - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1), bins, weights)


def _gradients(gray: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude and orientation histograms and the mean magnitude of (N, H, W) gray images."""
    dx = gray[:, 1:-1, 2:] - gray[:, 1:-1, :-2]
    dy = gray[:, 2:, 1:-1] - gray[:, :-2, 1:-1]
    mag = (dx * dx + dy * dy).sqrt().flatten(1)
    angle = torch.atan2(dy, dx).flatten(1) % math.pi  # unsigned orientation in [0, pi)
    return torch.cat([_histogram(torch.log(mag + 1e-3), 8, math.log(1e-3), math.log(1.5)),
                      _histogram(angle, 8, 0.0, math.pi, weights=mag + _EPS), mag.mean(1, keepdim=True)], 1)


def _local_binary_patterns(gray: torch.Tensor) -> torch.Tensor:
    """Histogram of 8-neighbour local binary patterns (256 codes) of (N, H, W) gray images."""
    centre = gray[:, 1:-1, 1:-1] + 1.0 / 255  # a neighbour counts as brighter by at least one grey level
    h, w = centre.shape[1:]
    code = torch.zeros_like(centre, dtype=torch.int32)
    offsets = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]
    for bit, (dy, dx) in enumerate(offsets):
        code += (gray[:, dy:dy + h, dx:dx + w] >= centre).int() << bit
    return _count(code.flatten(1), 256)


def features(images: torch.Tensor) -> torch.Tensor:
    """Fixed colour, gradient and texture statistics of (N, 3, H, W) images in [-1, 1]: (N, F)."""
    x = images.float().clamp(-1, 1).add(1).div(2)  # (N, 3, H, W) in [0, 1]
    side = min(JUDGE_SIZE, x.shape[-1], x.shape[-2])
    if x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="area")
    n = x.shape[0]
    flat = x.flatten(2)  # (N, 3, H*W)
    gray = x.mean(1)  # (N, H, W)
    chroma = (x - x.mean(1, keepdim=True)).abs().mean(1).flatten(1)  # (N, H*W): 0 for gray pixels
    q = (x * 3.999).long()  # 4 levels per channel
    joint = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
    parts = [flat.mean(2), flat.std(2), chroma.mean(1, keepdim=True), _histogram(chroma, 8, 0.0, 0.5),
             _count(joint, 64), _histogram(gray.flatten(1), 16, 0.0, 1.0),
             F.adaptive_avg_pool2d(x, 2).reshape(n, -1), _gradients(gray), _local_binary_patterns(gray)]
    half = F.avg_pool2d(gray[:, None], 2)[:, 0] if side >= 8 else gray
    parts += [_gradients(half), _local_binary_patterns(half)]
    return torch.cat(parts, 1)


def blurred(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image shrunk by 2 or 4 (chosen per image from ``seed``) and enlarged back: a soft copy."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.randint(0, 2, (images.shape[0],), generator=g)
    out = images.clone()
    side = images.shape[-1]
    for f in (2, 4):
        pick = factor == (f // 2 - 1)
        if pick.any() and side >= 2 * f:
            small = F.interpolate(images[pick], scale_factor=1 / f, mode="area")
            out[pick] = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


# ---------------------------------------------------------------- the classifier


@dataclass
class PhotoJudge:
    """Logistic regression over standardised ``features``: which of ``names`` an image is a crop of."""

    names: list[str]
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    weight: torch.Tensor  # (F, C)
    bias: torch.Tensor  # (C,)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return ((features(images) - self.mean) / self.scale) @ self.weight + self.bias  # (N, C)

    def predict(self, images: torch.Tensor) -> list[str]:
        return [self.names[i] for i in self.logits(images).argmax(1).tolist()] if len(images) else []

    def accuracy(self, images: torch.Tensor, labels: Sequence[str]) -> float | None:
        """The fraction of ``images`` judged to be a crop of their own label's photograph; None for none."""
        if not len(labels):
            return None
        return sum(p == t for p, t in zip(self.predict(images), labels)) / len(labels)


@torch.no_grad()
def _standardise(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.mean(0), feats.std(0).clamp_min(1e-4)


def train_judge(images: torch.Tensor, labels: Sequence[str], seed: int = 0, steps: int = STEPS) -> PhotoJudge:
    """Fit the judge on real crops (N, 3, H, W) in [-1, 1] and their photographs' names (two or more)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise UserError(f"the photo judge needs crops of at least two photographs, got {len(names)}; "
                        "write the data set with more training photographs")
    y = torch.tensor([names.index(t) for t in labels])
    feats = torch.cat([features(images), features(blurred(images, seed))])
    y = torch.cat([y, y])
    mean, scale = _standardise(feats)
    weight, bias = fit_logistic((feats - mean) / scale, y, len(names), WEIGHT_DECAY, steps)
    return PhotoJudge(names, mean, scale, weight, bias)


def fit_logistic(z: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int = STEPS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (D, classes), bias) of multinomial logistic regression on standardised inputs ``z`` (N, D) and labels
    ``y``: cross-entropy plus ``weight_decay`` times the squared weights, full-batch L-BFGS from zero weights (the
    same inputs give the same classifier)."""
    weight = torch.zeros(z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()
