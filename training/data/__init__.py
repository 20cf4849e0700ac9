"""Training data for the unified decoder: sources -> cached image codes -> documents -> packed batches.

This package owns reading data sources and turning them into token batches (and the ``vocab build``
command, which reads the same sources); it may import model, tokenizer and the shared modules, never
the trainers, sampling or evaluation.

The modules, in the order the data flows through them:

* ``records``: reading local files (imagefolder metadata, interleaved / text .jsonl, .txt) with bad
  input skipped and counted by reason in a ``SkipReport`` (``strict``: the first one raises);
* ``sources``: what ``--data`` accepts (each entry optionally ``SPEC:WEIGHT``), resolved into the parts
  of the mixture; hub data sets; ``iter_image_text`` for the image tokenizer, ``iter_texts`` for the BPE;
* ``augment``: ``Augment``, random crops / scale / flips of an image before encoding (``--augment-views``);
* ``codes``: image codes computed once with ``datasets.map`` and cached on disk (K grids per image with
  augmentation; with grid tokens each image keeps its aspect ratio and ``ImageTable`` its grid);
* ``documents``: records -> token ids through the Vocabulary (reading / drawing / unconditional pairs,
  interleaved and text documents, the truncation rules, ``ContextTooShort``), and ``prepare`` that does
  all of the above;
* ``packing``: ``PackedBatches``: whole documents packed into rows of the context length, exact resume,
  ``ShardedBatches`` for one process's rows; ``training_batches`` is what the trainer calls;
* ``heldout``: held-out captioned images for validation and evaluation;
* ``vocab_build``: the ``earlyfusion vocab build`` command (it reads the texts of the data);
* ``config``: ``DataConfig`` (the options the trainer nests) and the shared constants TEXT, IMAGE,
  NO_TARGET (modality of a target token) and IGNORE (the target of a position without loss).
"""

from .augment import NO_AUGMENT, Augment
from .codes import PAD_CODE, ImageTable, default_cache_dir, encode_images, local_image_table
from .config import IGNORE, IMAGE, MAX_AUGMENT_VIEWS, NO_TARGET, PIPELINE_VERSION, TEXT, DataConfig
from .documents import (DRAW, READ, UNCOND, ContextTooShort, Part, PreparedData, pair_document, pair_overhead, prepare,
                        span_words)
from .heldout import HeldoutPair, heldout_pairs
from .packing import PackedBatches, ShardedBatches, noisy_image_codes, training_batches
from .records import METADATA_NAMES, SkipReport, split_root, validation_split
from .sources import PartSpec, iter_dataset, iter_image_text, iter_texts, parse_source, resolve_sources

__all__ = [
    "DataConfig", "TEXT", "IMAGE", "NO_TARGET", "IGNORE", "PIPELINE_VERSION", "MAX_AUGMENT_VIEWS",
    "Augment", "NO_AUGMENT",
    "SkipReport", "METADATA_NAMES", "PartSpec", "parse_source", "resolve_sources",
    "iter_texts", "iter_image_text", "iter_dataset",
    "ImageTable", "PAD_CODE", "encode_images", "local_image_table", "default_cache_dir",
    "Part", "PreparedData", "prepare", "pair_document", "pair_overhead", "span_words", "ContextTooShort",
    "READ", "DRAW", "UNCOND",
    "PackedBatches", "ShardedBatches", "training_batches", "noisy_image_codes",
    "HeldoutPair", "heldout_pairs", "validation_split", "split_root",
]
