"""``earlyfusion vocab build``: a byte-level BPE on the texts of the data, merged with the special tokens and
one token per image code of the image tokenizer (``tokenizer.vocab.Vocabulary.build``), and with ``--grid-tokens``
the tokens that let images keep their aspect ratio (rows, columns, row end).

The BPE is trained only on texts of at most ``records.MAX_TEXT_CHARS`` characters (``sources.iter_texts`` skips and
counts longer ones as "too_long"), so one enormous caption costs nothing. A failure to read the data or to write
the vocabulary (a full disk, a permission) is one line that says so; ``--out`` is then left as it was."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from earlyfusion.core.checkpoint import MANIFEST
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vocab_layout import BYTE_ALPHABET, LAYOUT_FILE, TOKENIZER_FILE
from earlyfusion.tokenizer.vq_checkpoint import read_vq_config, vq_fingerprint
from earlyfusion.tokenizer.vq_config import VQConfig

from .records import SkipReport
from .sources import has_conversations, iter_texts

MAX_TEXT_VOCAB = 262_144  # well above any published text vocabulary; the BPE trainer allocates per id
_OS_ERROR = re.compile(r"\(os error \d+\)")  # how `tokenizers` reports a failed write: a plain Exception


@dataclass
class VocabBuildConfig:
    image_tokenizer: str
    """Image tokenizer run directory (from `earlyfusion tokenizer train`); its config.json gives codebook_size and the code grid."""
    data: list[str]
    """Data to train the text BPE on: built-in data directories, imagefolders (captions), interleaved .jsonl, text .jsonl/.txt, hub names."""
    out: str
    """Vocabulary directory to write (tokenizer.json + layout.json)."""
    text_vocab_size: int = 1024
    """Upper bound on the text BPE ids, 256 byte tokens included (a small corpus stops earlier)."""
    min_frequency: int = 2
    """A pair must occur this often to become a BPE merge."""
    max_texts: int = 1_000_000
    """Train the BPE on at most this many texts (0 = all)."""
    strict: bool = False
    """Fail on the first bad data record instead of skipping and counting it."""
    allow_outside_paths: bool = False
    """Read files that lie outside the data directory (listed by absolute path or '..', or reached through a symbolic
    link out of it, as in a hub download folder whose files link into a shared cache); off, such records are skipped
    and counted as outside_data_dir."""
    grid_tokens: bool = False
    """Let images keep their aspect ratio: add tokens for an image's rows and columns and a row-end token, so that
    every image is resized whole to its own code grid (up to the image tokenizer's) and its span states that grid
    (<boi> <rows_h> <cols_w>, h rows of w codes each ended by <row_end>, <eoi>). The decoder then learns each image's
    shape and can draw any of the grids it was trained on. Use it for data whose images are not square; off, every
    image is centre-cropped to a square and spans are the fixed grid (fewer tokens per image)."""

    chat: bool | None = None
    """Add the conversation markers <user>, <assistant> and <eot> (what a conversation's turns are written with);
    unset = added when --data holds conversations (a conversations.json in a data directory, or a conversations
    file). A vocabulary without them cannot train on conversations."""

    def __post_init__(self):
        if not BYTE_ALPHABET <= self.text_vocab_size <= MAX_TEXT_VOCAB:
            raise ValueError(f"--text-vocab-size must be between {BYTE_ALPHABET} (the byte alphabet) and {MAX_TEXT_VOCAB}, "
                             f"got {self.text_vocab_size}")
        if self.min_frequency < 1 or self.max_texts < 0:
            raise ValueError("--min-frequency must be >= 1 and --max-texts >= 0")
        if not self.data:
            raise ValueError("--data needs at least one source")


def build_cmd(cfg: VocabBuildConfig) -> int:
    """``earlyfusion vocab build``: BPE on the data's text + special tokens + one token per image code."""

    t0 = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / LAYOUT_FILE).is_file())):
        raise UserError(f"--out {out} exists and is not a vocabulary directory; choose a new directory "
                        "(an existing vocabulary there would be replaced)")
    vq_cfg = read_vq_config(cfg.image_tokenizer)
    if cfg.grid_tokens and not isinstance(vq_cfg, VQConfig):
        raise UserError(f"--image-tokenizer {cfg.image_tokenizer} takes only {vq_cfg.image_size}x{vq_cfg.image_size} "
                        "images, so its images cannot keep their aspect ratio; leave out --grid-tokens")
    fingerprint = vq_fingerprint(cfg.image_tokenizer)
    report = SkipReport(strict=cfg.strict)
    texts: list[str] = []
    try:
        for t in iter_texts(cfg.data, report=report, allow_outside=cfg.allow_outside_paths):
            texts.append(t)
            if cfg.max_texts and len(texts) >= cfg.max_texts:
                break
    except OSError as e:  # e.g. an unreadable sub-folder met while listing the data
        where = f" {e.filename}" if e.filename else ""
        raise UserError(f"--data: cannot read{where} ({e.strerror or e}); make it readable (or leave it out) and run "
                        "vocab build again") from None
    if not texts:
        raise UserError(f"--data {' '.join(cfg.data)}: no text found to train the BPE on (captions, interleaved texts, "
                        f"text lines); {report.summary()}")
    vocab = Vocabulary.build(texts, codebook_size=vq_cfg.codebook_size, grid=vq_cfg.grid_size,
                             image_tokenizer_fingerprint=fingerprint, text_vocab_size=cfg.text_vocab_size,
                             min_frequency=cfg.min_frequency, grid_tokens=cfg.grid_tokens,
                             chat=cfg.chat if cfg.chat is not None else has_conversations(cfg.data))
    try:
        vocab.save(out)
    except OSError as e:
        raise _write_error(out, e.strerror or str(e), e.filename) from None
    except Exception as e:
        if not _OS_ERROR.search(str(e)):
            raise
        raise _write_error(out, str(e), None) from None
    L = vocab.layout
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(ids) for ids in vocab.encode_texts(texts[:10000]))
    n_chars_sample = sum(len(t) for t in texts[:10000])
    print(f"vocabulary: {len(L.special_ids)} special [0, {L.text_start}) + {L.text_vocab_size} text BPE "
          f"[{L.text_start}, {L.text_end}) + {L.codebook_size} image codes [{L.image_start}, {L.image_end})"
          + (f" + {L.grid_token_count} grid tokens [{L.image_end}, {L.vocab_size})" if L.grid_tokens else "")
          + f" = {L.vocab_size} ids" + (" (with the conversation markers <user> <assistant> <eot>)" if vocab.chat else ""))
    if L.grid_tokens:
        print(f"image: any grid from 1x1 to {L.grid[0]}x{L.grid[1]} codes (rows x columns), the aspect ratio kept; "
              f"the largest image is {vocab.max_span} tokens (<boi> <rows> <cols>, a <row_end> after each row, <eoi>), "
              f"image tokenizer {fingerprint[:12]}")
    else:
        print(f"image: {L.grid[0]}x{L.grid[1]} codes per image ({L.tokens_per_image} tokens + <boi>/<eoi>), "
              f"image tokenizer {fingerprint[:12]}")
    print(f"text: BPE trained on {len(texts)} texts ({n_chars} characters), "
          f"{n_chars_sample / max(n_tokens, 1):.2f} characters per token; {report.summary()}")
    print(f"wrote {out / TOKENIZER_FILE}, {out / LAYOUT_FILE} and their checksums ({MANIFEST}, which every load checks) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def _write_error(out: Path, what: str, filename) -> UserError:
    """The one line for a vocabulary that could not be written (the CLI's own disk-full line speaks of training
    checkpoints and --resume, which vocab build does not have)."""
    where = f" (writing {filename})" if filename else ""
    return UserError(f"--out {out}: cannot write the vocabulary: {what}{where}; free space (or fix permissions) and "
                     f"run vocab build again (--out is left as it was)")
