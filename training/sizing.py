"""A decoder run sized to its data: the context must hold one image with its caption, and the steps should not
repeat a small data set so often that the model only replays it.

``context_error`` words the one-line error for a context that is too short (with the length needed and
what to change: ``--context-len`` or a preset whose ``max_seq_len`` holds it); ``epochs`` estimates how
many times the run goes through each part of its data, and ``say_epochs`` logs it, with a warning above
``MANY_PASSES``; ``repeats_too_often`` is the one decision behind the regularisation an unset option adds to a run
that would show its image-caption pairs more often than that.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.model.decoder import DECODER_PRESETS, DecoderConfig
from earlyfusion.training.data import SkipReport, parse_source, split_root
from earlyfusion.training.data.config import DEFAULT_READING_RATIO, MANY_PASSES, SIZED_CROP_SCALE
from earlyfusion.training.data.records import pair_records
from earlyfusion.training.shapes import MARKER as SHAPES_MARKER


def preset_context(name: str) -> int:
    """The max_seq_len of a decoder preset."""
    return int(DECODER_PRESETS[name].get("max_seq_len", DecoderConfig.max_seq_len))


def context_error(*, context_len: int, given: bool, max_seq_len: int, preset: str | None, need: int, what: str) -> str:
    """The one-line error for a context of ``context_len`` tokens that cannot hold ``need`` tokens (``what`` says which
    document); ``given``: --context-len was set (else the context is the decoder's max_seq_len)."""
    decoder = f"preset {preset}" if preset else "of --init-from"
    head = f"--context-len {context_len}" if given else f"the context of {context_len} tokens (max_seq_len of the decoder {decoder})"
    if need <= max_seq_len:
        fix = f"train with --context-len {need} or more (the decoder holds up to {max_seq_len})"
    else:
        bigger = [f"{n} ({preset_context(n)})" for n in DECODER_PRESETS if preset_context(n) >= need]
        fix = ("the decoder holds at most max_seq_len " + str(max_seq_len) + "; choose a --preset that holds "
               + str(need) + (f": {', '.join(bigger)}" if bigger else " (none of the presets does)"))
    return f"{head} cannot hold {what}, which needs {need} tokens; {fix}, or shorten the captions"


def epochs(data, vocab, *, steps: int, batch_size: int, context_len: int) -> list[tuple[str, float]]:
    """(part name, passes over it) for each part of the mixture, assuming full rows (packing leaves little padding).

    Documents are drawn by mixture weight: part p gets a share w_p of the documents, so a run of S·B·T tokens draws
    S·B·T / sum_q(w_q·L_q) documents, L_q the mean document length of part q.
    """
    total = sum(p.weight for p in data.parts)
    mean = [p.tokens(vocab) / max(len(p), 1) for p in data.parts]
    per_doc = sum(p.weight / total * m for p, m in zip(data.parts, mean))
    docs = steps * batch_size * context_len / max(per_doc, 1e-9)
    return [(p.name, docs * p.weight / total / max(len(p), 1)) for p in data.parts]


def pair_passes(data, vocab, *, steps: int, batch_size: int, context_len: int) -> float:
    """The most passes the run makes over a part of image-caption pairs (0 without one)."""
    passes = epochs(data, vocab, steps=steps, batch_size=batch_size, context_len=context_len)
    return max((n for p, (_, n) in zip(data.parts, passes) if p.kind == "pairs"), default=0.0)


def repeats_too_often(passes: float) -> bool:
    """Whether a run that shows its image-caption pairs ``passes`` times (``pair_passes``) repeats them so often that
    the model would replay them: then an unset --augment-views adds mirrored views (``DataConfig.sized``) and an unset
    --image-token-noise is SIZED_IMAGE_TOKEN_NOISE."""
    return passes > MANY_PASSES


SIZED_IMAGE_TOKEN_NOISE = 0.1
"""--image-token-noise, when unset, of a run that repeats its image-caption pairs too often (``repeats_too_often``),
where drawings of new captions otherwise come out as training images; 0 for other runs."""


def say_epochs(data, vocab, *, steps: int, batch_size: int, context_len: int) -> None:
    """Log how many passes over each part of the data the run makes; warn when one is past MANY_PASSES."""
    passes = epochs(data, vocab, steps=steps, batch_size=batch_size, context_len=context_len)
    views = {name: p.n_views if p.kind == "pairs" else 1 for p, (name, _) in zip(data.parts, passes)}
    log.info("%d steps of %d x %d tokens make about %s", steps, batch_size, context_len,
             ", ".join(f"{n:.1f} epochs of {name}" + (f" (each of its {views[name]} grids per image {n / views[name]:.1f} "
                                                      "times)" if views[name] > 1 else "") for name, n in passes))
    # a pair shown as K grids repeats each grid 1/K as often: what memorising depends on
    name, most = max(((name, n / views[name]) for name, n in passes), key=lambda x: x[1])
    if most > MANY_PASSES:
        log.warning("%s is seen about %.0f times (more than %d): a data set this small is memorised long before the "
                    "run ends; fewer --steps or more --augment-views help (the run's model is the one with the lowest "
                    "held-out loss unless --final last)", name, most,
                    MANY_PASSES)


def mirror_safe(sources: list[str]) -> bool:
    """Whether the image-caption pairs of ``sources`` are all the built-in shapes data's (the only data known to mean
    the same mirrored, its captions' left and right exchanged)."""
    dirs = [Path(parse_source(s)[0]).expanduser() for s in sources]
    dirs = [d for d in dirs if d.is_dir()]
    return bool(dirs) and all((d / SHAPES_MARKER).is_file() for d in dirs)


MAX_CLASSES = 100
"""The most distinct captions that still name a class each (``class_captions``); more is open captioning."""
MIN_PER_CLASS = 5  # images per distinct caption, on average, for captions to name classes rather than pictures


def caption_counts(sources: list[str], split: str = "train", text_column: str = "text") -> Counter | None:
    """How many images of the ``split`` of the local imagefolders ``sources`` carry each caption (lower-cased words);
    None when a source is not such a folder (a file, a hub data set, code shards): its captions are not read here."""
    counts: Counter = Counter()
    for spec in sources:
        path = Path(parse_source(spec)[0]).expanduser()
        if not path.is_dir():
            return None
        try:
            root = split_root(path, split)
        except UserError:
            return None
        for _, _, text in pair_records(root, text_column, SkipReport()):
            if text and text.strip():
                counts[" ".join(text.lower().split())] += 1
    return counts


def class_captions(counts: Counter | None) -> bool:
    """Whether captions (``caption_counts``) name classes: a few distinct ones (2 to MAX_CLASSES), each shared by
    MIN_PER_CLASS images or more on average. Such a caption says what the picture shows, not where or how large,
    so a crop that keeps nearly all of the picture keeps it true."""
    return (counts is not None and 2 <= len(counts) <= MAX_CLASSES
            and sum(counts.values()) >= MIN_PER_CLASS * len(counts))


def sized_options(data, noise: float | None, passes: float, seed: int):
    """(data options, image-token noise) of a run whose unset options are sized to how often it shows its
    image-caption pairs (``passes``): when they repeat too often (``repeats_too_often``) an unset --augment-views
    adds mirrored views (the built-in shapes data) or large crops (data whose captions name classes) and an unset
    --image-token-noise is SIZED_IMAGE_TOKEN_NOISE. Says in one line what was added
    and the option that turns each off."""
    repeats, added = repeats_too_often(passes), {}  # the option that turns it off -> what was added
    mirror = mirror_safe(data.sources)
    classes = repeats and not mirror and (data.augment_views is None or data.reading_ratio is None) and \
        class_captions(caption_counts(data.sources, data.split, data.text_column))
    if data.reading_ratio is None:
        data = data.sized_reading(repeats, classes)
        if data.reading_ratio is not None:
            added[f"--reading-ratio {DEFAULT_READING_RATIO}"] = f"{data.reading_ratio:.0%} of the pairs are reading examples"
    if data.augment_views is None:
        crops = classes
        data = data.sized(repeats, mirror, crops)
        if data.augment_views > 1 and data.augment_flip:
            swap = ", ".join(f"{a}/{b}" for a, b in data.augment(seed).swap)
            words = f"captions with {swap} exchanged where they occur" if swap else "captions unchanged"
            added["--augment-views 1"] = f"each image is shown as itself and as its mirror image, {words}"
        elif data.augment_views > 1:
            added["--augment-views 1"] = (f"each image is shown as itself and as {data.augment_views - 1} crops of at "
                                          f"least {SIZED_CROP_SCALE:.0%} of its side (its captions name classes)")
    if noise is None:
        noise = SIZED_IMAGE_TOKEN_NOISE if repeats else 0.0
        if repeats:
            added["--image-token-noise 0"] = (f"{100 * SIZED_IMAGE_TOKEN_NOISE:.0f}% of the codes of each picture "
                                              "being drawn are replaced by random codes in its input")
    if added:
        log.info("the image-caption pairs would be seen about %.0f times: %s", passes,
                 ", and ".join(f"{what} ({flag} turns it off)" for flag, what in added.items()))
    return data, noise
