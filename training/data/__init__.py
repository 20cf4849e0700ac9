"""Training data for the unified decoder: sources -> cached image codes -> documents -> packed batches.

This package owns reading data sources and turning them into token batches (and the ``vocab build``
command, which reads the same sources); it may import model, tokenizer and the shared modules, never
the trainers, sampling or evaluation.

The modules, in the order the data flows through them:

* ``records``: reading local files (imagefolder metadata, interleaved / text .jsonl, .txt) with bad
  input skipped and counted by reason in a ``SkipReport`` (``strict``: the first one raises);
* ``sources``: what ``--data`` accepts (each entry optionally ``SPEC:WEIGHT``), resolved into the parts
  of the mixture; hub data sets; ``iter_image_text`` for the image tokenizer, ``iter_texts`` for the BPE;
* ``tar_shards``: WebDataset tar shards (brace patterns) read as a stream of image-caption records;
  ``shard_cmd``: the ``earlyfusion data shard`` command that writes an imagefolder as tar shards;
* ``code_shards``: the format of a pre-tokenized corpus (safetensors shards + manifest.json) and its checks;
  ``encode``: the ``earlyfusion encode`` command that writes one, over several processes, resumable;
* ``augment``: ``Augment``, random crops / scale / flips of an image before encoding (``--augment-views``);
* ``codes``: image codes computed once with ``datasets.map`` and cached on disk (K grids per image with
  augmentation; with grid tokens each image keeps its aspect ratio and ``ImageTable`` its grid);
* ``documents``: records -> token ids through the Vocabulary (reading / drawing / unconditional pairs,
  interleaved and text documents, the truncation rules, ``ContextTooShort``), and ``prepare`` that does
  all of the above;
* ``rows``: the packing rules both batch streams share (mixture draw, first-fit rows, the batch tensors);
* ``packing``: ``PackedBatches``: whole documents packed into rows of the context length, exact resume,
  ``ShardedBatches`` for one process's rows; ``training_batches`` is what the trainer calls;
* ``stream``: ``StreamedBatches``: the batches of code shards, streamed (memory independent of the corpus), each
  process and DataLoader worker reading its own rows' share, exact mid-epoch resume;
* ``distributed``: rank / world size and the few collectives the data commands and streams need;
* ``files``: files written whole or not at all (tar and code shards);
* ``heldout``: held-out captioned images for validation and evaluation;
* ``vocab_build``: the ``earlyfusion vocab build`` command (it reads the texts of the data);
* ``config``: ``DataConfig`` (the options the trainer nests) and the shared constants TEXT, IMAGE,
  NO_TARGET (modality of a target token) and IGNORE (the target of a position without loss).
"""

from .augment import NO_AUGMENT, Augment
from .code_shards import CodeSet, is_code_dir
from .codes import PAD_CODE, ImageTable, default_cache_dir, encode_images, local_image_table
from .config import IGNORE, IMAGE, MAX_AUGMENT_VIEWS, NO_TARGET, PIPELINE_VERSION, TEXT, DataConfig
from .documents import (DRAW, READ, UNCOND, ContextTooShort, Part, PreparedData, pair_document, pair_overhead, prepare,
                        span_words)
from .heldout import HeldoutPair, check_heldout_split, heldout_pairs
from .packing import PackedBatches, ShardedBatches, noisy_image_codes, training_batches
from .records import METADATA_NAMES, SkipReport, split_root, validation_split
from .sources import PartSpec, iter_dataset, iter_image_text, iter_texts, parse_source, resolve_sources
from .stream import StreamedBatches
from .tar_shards import expand_braces, is_tar_source, tar_records

__all__ = [
    "DataConfig", "TEXT", "IMAGE", "NO_TARGET", "IGNORE", "PIPELINE_VERSION", "MAX_AUGMENT_VIEWS",
    "Augment", "NO_AUGMENT",
    "SkipReport", "METADATA_NAMES", "PartSpec", "parse_source", "resolve_sources",
    "iter_texts", "iter_image_text", "iter_dataset",
    "ImageTable", "PAD_CODE", "encode_images", "local_image_table", "default_cache_dir",
    "Part", "PreparedData", "prepare", "pair_document", "pair_overhead", "span_words", "ContextTooShort",
    "READ", "DRAW", "UNCOND",
    "PackedBatches", "ShardedBatches", "training_batches", "noisy_image_codes", "StreamedBatches",
    "CodeSet", "is_code_dir", "expand_braces", "is_tar_source", "tar_records",
    "HeldoutPair", "heldout_pairs", "check_heldout_split", "validation_split", "split_root",
]
