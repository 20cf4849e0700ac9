"""The data options (``DataConfig``, nested by the trainer) and the constants the data package shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from earlyfusion.core.options import check_not_file, check_number

from .augment import NO_AUGMENT, Augment, parse_swap

PIPELINE_VERSION = 1  # part of every image-code cache key and of the resume signature
TEXT, IMAGE, NO_TARGET = 0, 1, -1  # modality of a target token: text; image code, <eoi> or grid token; no target
IGNORE = -100  # the target of a position that gets no loss
MAX_AUGMENT_VIEWS = 64  # code grids per image: the cache grows with it
DEFAULT_AUGMENT_SCALE = 0.8
DEFAULT_READING_RATIO = 0.3
SIZED_READING_RATIO = 0.5
SIZED_CROP_VIEWS = 4
SIZED_CROP_SCALE = 0.9
"""The views an unset --augment-views adds to data whose captions name a class (``DataConfig.sized``): the image and
three crops of at least this share of its side, each resampled to the full size. A crop this large keeps the whole
object of a class picture (a digit, a photographed thing) while its code grid differs from the image's."""
MANY_PASSES = 20
"""More passes than this over a part of the data is worth a warning: a small data set seen this often is usually
memorised (held-out loss turns up) before the run ends. Image-caption pairs repeated more often than this get mirrored
views and noisy image inputs where those options are unset (``training.sizing``)."""


@dataclass
class DataConfig:
    sources: list[str] = field(metadata={"flag": "data"})
    """Training data, one or more: a built-in data directory (`earlyfusion data shapes`), an imagefolder directory, an
    interleaved .jsonl (OBELICS texts/images), a text .jsonl/.txt, a hub data set name, or a directory of code shards
    (`earlyfusion encode`), which is streamed: corpora larger than memory. Append :WEIGHT for the mixture weight
    (e.g. docs.jsonl:0.2)."""
    reading_ratio: float | None = None
    """Fraction of image-caption pairs shown image->caption (reading); the rest caption->image (drawing, the slower
    to learn, hence the larger share). Unset = {DEFAULT_READING_RATIO}, or {SIZED_READING_RATIO} for data whose captions
    name a class when the run would show its pairs more than {MANY_PASSES} times (docs/small-data.md). Raise it when
    captioning matters more than drawing."""
    cond_dropout: float = 0.1
    """Fraction of drawing examples whose caption is dropped: the unconditional case that classifier-free guidance
    needs. 0 disables guidance at sampling time."""
    reading_image_loss: bool = False
    """Also train on the image codes of reading (image -> caption) examples, not only on their captions. Off: those
    codes are unconditional image modelling, which the caption-dropped examples already teach."""
    strict: bool = False
    """Fail on the first bad data record (or document too long for the context) instead of skipping or truncating
    and counting it."""
    cache_dir: str | None = None
    """Where image codes are cached; unset = <first local data source>/.earlyfusion-cache (or ~/.cache/earlyfusion
    when that is not writable)."""
    image_column: str = "image"
    """Image column of hub data sets."""
    text_column: str = "text"
    """Text column of hub data sets and caption field of imagefolder metadata."""
    split: str = "train"
    """Split used for training: DIR/<split> of a data directory, the named split of a hub data set."""
    allow_outside_paths: bool = False
    """Accept image paths in metadata / interleaved files that point outside their data directory (absolute paths,
    '..'); off, such records are skipped and counted, so a data file cannot make the pipeline read elsewhere."""
    augment_views: int | None = None
    """Code grids cached per training image: 1 = the image as it is; K > 1 adds K-1 randomly cropped and rescaled
    versions (encoded once, cached), and training shows each image-caption pair one of its K grids per epoch.
    Unset = sized to the data: when the run would show its image-caption pairs more than {MANY_PASSES} times, 2 for
    the built-in shapes data, whose captions stay true mirrored (each image and its mirror image, --augment-flip at
    --augment-scale 1), and {SIZED_CROP_VIEWS} for data whose captions name a class (a few distinct captions shared by
    many images: the image and crops of it, each at least {SIZED_CROP_SCALE} of its side, never mirrored);
    else 1 (a mirror image changes what most real pictures mean, so other data is mirrored only when asked: 2 views
    with mirroring on). Raise it (4-8) when a small data set is still
    memorised (held-out image loss rising while the training loss falls); 1 turns augmentation off. Interleaved
    documents keep their images unaugmented."""
    augment_scale: float | None = None
    """Smallest crop side of an augmented view, as a fraction of the image's short side (0.1 to 1); unset = {DEFAULT_AUGMENT_SCALE}.
    Keep it near 1 when captions describe sizes or places within the frame."""
    augment_flip: bool = False
    """Mirror half of the augmented views left-right, exchanging the words of --augment-flip-words in their captions.
    For data whose captions stay true of the mirrored picture once those words are exchanged (no text in the
    images, nothing else that a mirror changes)."""
    augment_flip_words: str = "left:right"
    """Word pairs exchanged in the caption of a mirrored view (with --augment-flip), comma-separated: left:right turns
    "a cat on the left" into "a cat on the right". none = captions unchanged."""

    loader_workers: int = 0
    """DataLoader worker processes that build the batches of code shards, each from its own share of the process's
    rows; 0 = the training process itself. The batches are the same whatever the number."""

    def augment(self, seed: int) -> Augment:
        """The augmentation these options ask for, its views a function of ``seed``."""
        if (self.augment_views or 1) == 1:  # unset: the trainer sizes it (``sized``); 1 until then
            return NO_AUGMENT
        scale = DEFAULT_AUGMENT_SCALE if self.augment_scale is None else self.augment_scale
        return Augment(views=self.augment_views, min_scale=scale, flip=self.augment_flip, seed=seed,
                       swap=parse_swap(self.augment_flip_words) if self.augment_flip else ())

    def sized(self, repeats_too_often: bool, mirror_safe: bool, crop_safe: bool = False) -> DataConfig:
        """These options with ``augment_views`` decided when it is unset, for a run that would repeat its image-caption
        pairs too often (the trainer's ``sizing.repeats_too_often``): on data known to mean the same mirrored
        (``mirror_safe``: the built-in shapes data, whose captions exchange left and right) the image and its mirror
        image (two views, whole images, captions' --augment-flip-words exchanged); on data whose captions name a
        class (``crop_safe``, ``sizing.class_captions``) the image and large crops of it (SIZED_CROP_VIEWS views at
        SIZED_CROP_SCALE, never mirrored: a mirror image of text, a digit, a map or a face with a caption naming a
        side is another picture); else none. Set options are kept as they are."""
        if self.augment_views is not None:
            return self
        if repeats_too_often and mirror_safe:
            return replace(self, augment_views=2, augment_scale=1.0, augment_flip=True)
        if repeats_too_often and crop_safe:
            return replace(self, augment_views=SIZED_CROP_VIEWS, augment_scale=SIZED_CROP_SCALE, augment_flip=False)
        return replace(self, augment_views=1)

    @property
    def reading(self) -> float:
        """The reading share in force: --reading-ratio, or DEFAULT_READING_RATIO while it is unset."""
        return DEFAULT_READING_RATIO if self.reading_ratio is None else self.reading_ratio

    def sized_reading(self, repeats_too_often: bool, class_captions: bool) -> DataConfig:
        """These options with an unset ``reading_ratio`` set to SIZED_READING_RATIO for a run that would repeat pairs
        whose captions name classes too often; otherwise unchanged (unset: DEFAULT_READING_RATIO, ``reading``)."""
        if self.reading_ratio is not None or not (repeats_too_often and class_captions):
            return self
        return replace(self, reading_ratio=SIZED_READING_RATIO)

    def sized_as(self, recorded: dict) -> DataConfig:
        """These options with an unset ``augment_views`` taken from a resumed run's record (``recorded``: the "data"
        entry of its identity), so that the run goes on with the views it was sized to. Set options are kept."""
        out = self
        if out.reading_ratio is None and recorded.get("reading_ratio") is not None:
            out = replace(out, reading_ratio=recorded["reading_ratio"])
        if out.augment_views is not None or "augment_views" not in recorded:
            return out
        return replace(out, augment_views=recorded["augment_views"], augment_scale=recorded.get("augment_scale"),
                       augment_flip=bool(recorded.get("augment_flip")))

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if not self.sources or any(not isinstance(s, str) or not s.strip() for s in self.sources):
            raise ValueError("--data needs at least one source: a data directory, a .jsonl/.txt file or a hub name")
        if self.reading_ratio is not None:
            check_number("reading-ratio", self.reading_ratio, 0, 1)
        check_number("cond-dropout", self.cond_dropout, 0, 1, hi_open=True)
        check_not_file("cache-dir", self.cache_dir)
        check_number("loader-workers", self.loader_workers, 0, 64)
        if self.augment_views is not None:
            check_number("augment-views", self.augment_views, 1, MAX_AUGMENT_VIEWS)
        if (self.augment_views or 1) == 1 and (self.augment_scale is not None or self.augment_flip):
            raise ValueError("--augment-scale and --augment-flip shape augmented views; give --augment-views K > 1 too")
        parse_swap(self.augment_flip_words)  # a bad pair fails here, with or without --augment-flip
        if self.augment_scale is not None:
            check_number("augment-scale", self.augment_scale, 0.1, 1)
        for name in ("image_column", "text_column", "split"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} must not be empty")
