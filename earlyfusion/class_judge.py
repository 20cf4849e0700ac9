"""Reading and drawing scored by class, on any data whose captions form a closed set.

A data set whose held-out captions are all training captions, and whose training split has few distinct captions
(``closed_set``: at most ``MAX_CLASSES``, each caption shared by two or more images on average; the ten sentences of
``earlyfusion data digits``, the photographs of ``earlyfusion data photos``), is a classification task in captions.
``earlyfusion eval`` then measures, beside the decoder's caption exact match:

* ``class_linear_accuracy``: a linear classifier (multinomial logistic regression) on the raw pixels of the real
  training images, scored on the held-out images: how well this split can be read by the simplest model, the
  figure the decoder's reading is compared with;
* ``class_drawn_accuracy``: the share of drawings that a classifier trained on the real training images takes for
  their caption's class. The judge is the same logistic regression, trained also on blurred copies of the training
  images (shrunk and enlarged again) so that the softness of a tokenizer's reconstruction is not taken for a
  property of one class; ``class_judge_real_accuracy`` and ``class_judge_recon_accuracy`` are its accuracy on the
  real held-out images and on the image tokenizer's reconstructions of them: the ceilings for drawn images.

Images are compared at their own side, shrunk to at most ``JUDGE_SIZE`` px. Full-batch L-BFGS from zero weights on a
CPU: the same images give the same classifiers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from earlyfusion.core.logs import log
from earlyfusion.photo_judge import blurred, fit_logistic, load_split, pil_batch
from earlyfusion.scores import tokenize
from earlyfusion.training.data.records import SkipReport, pair_records
from earlyfusion.training.sizing import MAX_CLASSES

CLASS_KEYS = ("class_pairs", "class_count", "class_caption_accuracy", "class_linear_accuracy", "class_drawn_accuracy",
              "class_judge_real_accuracy", "class_judge_recon_accuracy")
JUDGE_SIZE = 32  # pixels per side the classifiers see at most: enough for a class, few enough weights for L-BFGS
WEIGHT_DECAY = 1e-2  # L2 penalty on the standardised pixel weights: a linear model on ~3,000 inputs and ~1,000 images
STEPS = 100  # L-BFGS iterations: a fixed budget, so that the same images always give the same classifier
SEED = 0  # picks how much each blurred copy is blurred: one judge per data set, whatever --seed the drawings use


def caption_key(text: str | None) -> tuple[str, ...]:
    """Captions compared as the scores compare them: their words, case and punctuation aside."""
    return tuple(tokenize(text or ""))


def training_captions(root: Path, text_column: str = "text") -> Counter:
    """How many training images carry each caption (by ``caption_key``) in an imagefolder split."""
    return Counter(caption_key(t) for _, _, t in pair_records(Path(root), text_column, SkipReport()) if t and t.strip())


def closed_set(train: Counter, heldout: Sequence[str]) -> bool:
    """Whether captions ``heldout`` and a training split's caption counts ``train`` make a closed caption set."""
    return (2 <= len(train) <= MAX_CLASSES and sum(train.values()) >= 2 * len(train)
            and bool(heldout) and all(caption_key(c) in train for c in heldout))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, F) raw pixels, shrunk (area) to at most JUDGE_SIZE per side."""
    x = images.float().clamp(-1, 1)
    side = min(JUDGE_SIZE, x.shape[-1], x.shape[-2])
    if x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="area")
    return x.flatten(1)


@dataclass
class LinearClassifier:
    """Multinomial logistic regression on standardised raw pixels (``_pixels``)."""

    names: list
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, images: torch.Tensor) -> list:
        if not len(images):
            return []
        logits = ((_pixels(images) - self.mean) / self.scale) @ self.weight + self.bias
        return [self.names[i] for i in logits.argmax(1).tolist()]

    def accuracy(self, images: torch.Tensor, labels: Sequence) -> float | None:
        if not len(labels):
            return None
        return sum(p == t for p, t in zip(self.predict(images), labels)) / len(labels)


def fit_linear(images: torch.Tensor, labels: Sequence, with_blurred: bool = False, steps: int = STEPS) -> LinearClassifier:
    """Fit the classifier on images (N, 3, H, W) in [-1, 1] of two or more labels; ``with_blurred``: also on a blurred
    copy of each (the drawings' judge)."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(t) for t in labels])
    x = _pixels(images)
    if with_blurred:
        x, y = torch.cat([x, _pixels(blurred(images, SEED))]), torch.cat([y, y])
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-2)  # a pixel that never changes gets no weight to speak of
    weight, bias = fit_logistic((x - mean) / scale, y, len(names), WEIGHT_DECAY / len(names), steps)
    return LinearClassifier(names, mean, scale, weight, bias)


def class_figures(train_root: Path, captions: Sequence[str], reads: Sequence[str], real: torch.Tensor | None,
                  drawn: list, reconstruct: Callable[[], torch.Tensor]) -> tuple[dict, list[dict]]:
    """The ``CLASS_KEYS`` figures of held-out ``captions`` (their real images ``real``, (N, 3, H, W), or None), the
    decoder's readings ``reads`` and drawings ``drawn`` (PIL), and per drawing the class the judge saw in it; every
    figure None when the captions are not a closed set of the training split at ``train_root``. ``reconstruct``
    gives the image tokenizer's reconstructions of the held-out images."""
    figures = dict.fromkeys(CLASS_KEYS)
    none = [{} for _ in drawn]
    if not Path(train_root).is_dir():
        return figures, none
    counts = training_captions(train_root)
    if not closed_set(counts, captions):
        return figures, none
    truth = [caption_key(c) for c in captions]
    figures.update(class_pairs=len(truth), class_count=len(counts),
                   class_caption_accuracy=sum(caption_key(r) == t for r, t in zip(reads, truth)) / len(truth))
    size = drawn[0].size[0] if drawn else (real.shape[-1] if real is not None else JUDGE_SIZE)
    images, labels, skipped = load_split(train_root, {k: " ".join(k) for k in counts}, size)
    if skipped:
        log.warning("class judge: %d row(s) of %s skipped (not a readable image)", skipped, train_root)
    if len(set(labels)) < 2:
        log.warning("class judge: %s holds images of fewer than two captions: no classifiers", train_root)
        return figures, none
    if real is not None:
        figures["class_linear_accuracy"] = fit_linear(images, labels).accuracy(real, truth)
    judge = fit_linear(images, labels, with_blurred=True)
    if drawn:
        seen = judge.predict(pil_batch(drawn))
        figures["class_drawn_accuracy"] = sum(s == t for s, t in zip(seen, truth)) / len(truth)
        none = [{"judged_class": " ".join(s)} for s in seen]
    if real is not None:
        figures["class_judge_real_accuracy"] = judge.accuracy(real, truth)
    figures["class_judge_recon_accuracy"] = judge.accuracy(reconstruct(), truth)
    return figures, none
