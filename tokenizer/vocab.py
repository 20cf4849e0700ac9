"""The merged vocabulary: special tokens, byte-level BPE text tokens and one token per image code.

Layout of the ids (every range is read from ``layout.json``; none is written in code; see
``vocab_layout``)::

    [ special tokens | text BPE tokens | image codes | grid tokens (optional) ]
      bos eos pad boi eoi   (text_vocab_size)   id = image_start + code   <row_end> <rows_n> <cols_n>

A vocabulary directory holds

* ``tokenizer.json``: ONE ``tokenizers`` tokenizer with everything in it (byte-level BPE model, the
  special tokens and the image tokens ``<img_00042>`` as added special tokens). ``tokenizers.Tokenizer.
  from_file`` and transformers' ``PreTrainedTokenizerFast(tokenizer_file=...)`` load it as is;
* ``layout.json``: the ``VocabLayout`` (named special ids, text and image ranges, code grid, the image
  tokenizer's fingerprint); ``Vocabulary.load`` checks that the two files agree;
* ``tokenizer_config.json``: the special-token roles for ``transformers.AutoTokenizer``;
* ``MANIFEST.json``: the size and sha256 of each file. ``Vocabulary.load`` checks them on every load and refuses a
  directory without one: an edited tokenizer.json can still agree with layout.json and parse (two ids swapped),
  and would then silently train and sample with the wrong tokens.

Special-token injection: ``tokenizers`` matches added tokens anywhere in the input, so user text that
spells ``<boi>`` would become the begin-image id. ``encode_text`` therefore uses a text-only tokenizer
derived from the same JSON with the added tokens removed: text is always encoded byte by byte through
the BPE model, and the BPE model cannot produce a special or image token (the byte-level pre-tokenizer
splits ``<``, letters, digits and ``>`` apart, so no merge can ever join them; checked at build and load).

Documents: ``encode_document([text | codes (h, w), ...])`` gives
``<s> text… <boi> id×(h·w) <eoi> text… </s>``; ``decode_document`` inverts it (adjacent text segments
come back joined, empty ones vanish; see its docstring for malformed spans). ``image_span(codes)`` is
one image's ``<boi> ids <eoi>`` (with grid tokens ``<boi> <rows_h> <cols_w> (w ids <row_end>)×h <eoi>``,
for any grid up to the layout's). Both go through ``grammar``, the layout's ``image_span.SpanGrammar``, which
the sampler's rules and the training code read spans with too.

``check_vocab_matches`` says whether a vocabulary belongs to an image tokenizer (its image range was
built from that tokenizer's codebook and grid). The ``vocab build`` command lives in the data package
(``earlyfusion.training.data.vocab_build``), which reads the texts.

Ids are Python ints, int64 tensors or int64 numpy arrays; never a 16-bit type (vocabularies pass 65 535).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from earlyfusion.core.checkpoint import CheckpointError, atomic_dir, load_json
from earlyfusion.core.errors import UserError
from earlyfusion.core.rundir import verify_manifest
from earlyfusion.tokenizer.image_span import SpanError, SpanGrammar
from earlyfusion.tokenizer.vocab_layout import (
    BYTE_ALPHABET,
    HF_CONFIG_FILE,
    IMAGE_TOKEN_PREFIX,
    LAYOUT_FILE,
    MIN_IMAGE_TOKEN_DIGITS,
    CHAT_TOKENS,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    VocabLayout,
    image_token,
)
from earlyfusion.tokenizer.vq_checkpoint import read_vq_config, vq_fingerprint

REBUILD = "rebuild the vocabulary: run `earlyfusion vocab build` again (for a run's own vocab/, copy the whole run again)"
"""What to do about a vocabulary directory whose files cannot be trusted."""

# ---------------------------------------------------------------- the vocabulary


def _is_int_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and x.dtype != torch.bool and not x.is_complex()


class Vocabulary:
    """Owns the merged vocabulary: text and image conversions, whole documents, save/load."""

    def __init__(self, tokenizer, layout: VocabLayout, where: str = "vocabulary"):
        """``tokenizer``: the full ``tokenizers.Tokenizer`` (as in tokenizer.json); checked against ``layout``."""
        self.tokenizer = tokenizer
        self.layout = layout
        _check_agreement(tokenizer, layout, where)
        self._text_tokenizer = _text_only(tokenizer)
        self.bos, self.eos, self.pad, self.boi, self.eoi = layout.bos, layout.eos, layout.pad, layout.boi, layout.eoi
        self.grammar = SpanGrammar.of(layout)
        # grid tokens (None / empty without them): row end, then rows 1..H, then columns 1..W
        self.row_end = self.grammar.row_end
        self.rows_ids = list(self.grammar.rows_ids)
        self.cols_ids = list(self.grammar.cols_ids)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def image_start(self) -> int:
        return self.layout.image_start

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    @property
    def tokens_per_image(self) -> int:
        """Codes in the largest image."""
        return self.layout.tokens_per_image

    @property
    def grid_tokens(self) -> bool:
        """Image spans state their grid and break their rows, so images keep their aspect ratio."""
        return self.layout.grid_tokens

    def span_length(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens of one image span, ``<boi>`` and ``<eoi>`` included, for ``grid`` (default: the largest)."""
        return self.grammar.span_length(grid)

    @property
    def max_span(self) -> int:
        """Tokens of the longest image span (what a document must have room for)."""
        return self.grammar.max_span

    def check_grid(self, grid) -> tuple[int, int]:
        """``grid`` as (rows, columns) if an image span can hold it; ValueError saying which grids can otherwise."""
        return self.grammar.check_grid(grid)

    @property
    def text_start(self) -> int:
        return self.layout.text_start

    @property
    def text_vocab_size(self) -> int:
        return self.layout.text_vocab_size

    @property
    def text_range(self) -> range:
        return range(self.layout.text_start, self.layout.text_end)

    @property
    def image_range(self) -> range:
        return range(self.layout.image_start, self.layout.image_end)

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.layout.special_ids)

    @property
    def chat(self) -> bool:
        """Whether the vocabulary can write conversations: ours with ``<user>``, ``<assistant>`` and ``<eot>``, or an
        imported Chameleon's with its end-of-turn token only."""
        return self.layout.chat

    def chat_id(self, role: str) -> int | None:
        """The id of a conversation marker ("user", "assistant", "eot"): None for a role marker the vocabulary's
        template does without (an imported Chameleon's); UserError for a vocabulary that cannot write conversations."""
        if role not in CHAT_TOKENS:
            raise KeyError(f"no conversation marker {role!r} (one of {', '.join(CHAT_TOKENS)})")
        if not self.chat:
            if self.layout.special_tokens.get("boi") == "<racm3:break>":
                raise UserError("this vocabulary, imported from Chameleon before conversations were supported, has no "
                                "end-of-turn token; import the checkpoint again with `earlyfusion import chameleon`")
            raise UserError("this vocabulary has no conversation markers; build one for conversation data with "
                            "`earlyfusion vocab build` (it adds them when --data holds conversations)")
        return self.layout.special_ids.get(role)

    def __repr__(self) -> str:
        L = self.layout
        return (f"Vocabulary({len(L.special_ids)} special + {L.text_vocab_size} text + {L.codebook_size} image "
                f"{f' + {L.grid_token_count} grid' if L.grid_tokens else ''} = {L.vocab_size} ids, "
                f"grid {'up to ' if L.grid_tokens else ''}{L.grid[0]}x{L.grid[1]})")

    # ------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        """Text -> text ids. Never emits a special or image id, even for text that spells one."""
        return self.encode_texts([text])[0]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched ``encode_text`` (parallel inside ``tokenizers``)."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_text expects str, got {type(t).__name__}")
        try:
            encs = self._text_tokenizer.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            bad = next((t for t in texts if _has_surrogates(t)), None)
            if bad is not None:
                raise ValueError(f"text contains unpaired surrogate characters (not valid Unicode): {bad[:60]!r}") from None
            raise
        out = [e.ids for e in encs]
        lo, hi = self.layout.text_start, self.layout.text_end
        for ids in out:
            if ids and (min(ids) < lo or max(ids) >= hi):  # impossible by construction; never let it pass silently
                raise RuntimeError(f"text tokenizer produced an id outside the text range [{lo}, {hi})")
        return out

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text ids -> text (exact inverse of ``encode_text``). ValueError for any non-text id."""
        ids = [int(i) for i in _as_list(ids)]
        lo, hi = self.layout.text_start, self.layout.text_end
        bad = [i for i in ids if not lo <= i < hi]
        if bad:
            raise ValueError(f"decode_text got non-text id(s) {bad[:5]} (text ids are [{lo}, {hi})); "
                             "use decode_document for sequences with special or image ids")
        return self._text_tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    # ------------------------------------------------------------ image codes
    def codes_to_ids(self, codes):
        """Image codes (int, list, int tensor or numpy array of any shape) -> token ids of the same shape.

        Tensors come back int64, numpy arrays int64, lists/ints as Python ints."""
        n = self.layout.codebook_size
        if isinstance(codes, torch.Tensor):
            if not _is_int_tensor(codes):
                raise ValueError(f"image codes must be integers, got {codes.dtype}")
            c = codes.long()
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n):
                raise ValueError(f"image codes must be in [0, {n}), got [{int(c.min())}, {int(c.max())}]")
            return c + self.layout.image_start
        if isinstance(codes, np.ndarray):
            if codes.dtype.kind not in "iu":
                raise ValueError(f"image codes must be integers, got {codes.dtype}")
            c = codes.astype(np.int64)
            if c.size and (int(c.min()) < 0 or int(c.max()) >= n):
                raise ValueError(f"image codes must be in [0, {n}), got [{int(c.min())}, {int(c.max())}]")
            return c + self.layout.image_start
        if isinstance(codes, (int, np.integer)) and not isinstance(codes, bool):
            if not 0 <= int(codes) < n:
                raise ValueError(f"image code {int(codes)} not in [0, {n})")
            return int(codes) + self.layout.image_start
        return [self.codes_to_ids(c) for c in codes]

    def is_image_id(self, ids):
        """Bool (tensor/array/list/bool) of whether each id is an image code id."""
        lo, hi = self.layout.image_start, self.layout.image_end
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            return (ids >= lo) & (ids < hi)
        if isinstance(ids, (int, np.integer)):
            return bool(lo <= int(ids) < hi)
        return [self.is_image_id(i) for i in ids]

    def is_image_part(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor: the ids an image span holds after its ``<boi>`` (codes, grid tokens, ``<eoi>``), the targets
        that the image loss counts."""
        return ((ids >= self.layout.image_start) & (ids < self.layout.vocab_size)) | (ids == self.eoi)

    def ids_to_codes(self, ids):
        """Inverse of ``codes_to_ids``; ValueError if any id is not an image id."""
        lo, hi = self.layout.image_start, self.layout.image_end
        if isinstance(ids, torch.Tensor):
            t = ids.long()
            if t.numel() and (int(t.min()) < lo or int(t.max()) >= hi):
                raise ValueError(f"not image ids: values outside [{lo}, {hi})")
            return t - lo
        if isinstance(ids, np.ndarray):
            a = ids.astype(np.int64)
            if a.size and (int(a.min()) < lo or int(a.max()) >= hi):
                raise ValueError(f"not image ids: values outside [{lo}, {hi})")
            return a - lo
        if isinstance(ids, (int, np.integer)):
            if not lo <= int(ids) < hi:
                raise ValueError(f"id {int(ids)} is not an image id ([{lo}, {hi}))")
            return int(ids) - lo
        return [self.ids_to_codes(i) for i in ids]

    def image_span(self, codes) -> list[int]:
        """One image's span for its code grid (h, w): ``[boi, ids in raster order, eoi]``, or with grid tokens
        ``[boi, rows_h, cols_w, (w ids, row_end) × h, eoi]``."""
        shape = tuple(codes.shape) if isinstance(codes, (torch.Tensor, np.ndarray)) else tuple(np.shape(codes))
        if len(shape) != 2:
            raise ValueError(f"an image must be a 2-d code grid (rows, columns), got shape {shape}")
        grid = self.check_grid(shape)
        if not isinstance(codes, (torch.Tensor, np.ndarray)):
            codes = np.asarray(codes)
            if codes.dtype.kind not in "iu":
                raise ValueError(f"image codes must be integers, got {codes.dtype}")
        return self.grammar.build(grid, self.codes_to_ids(codes.reshape(-1)).tolist())

    # ------------------------------------------------------------ documents
    def encode_document(self, segments: Sequence, bos: bool = True, eos: bool = True) -> list[int]:
        """Interleaved document -> ids: ``[<s>] text… <boi> codes <eoi> text… [</s>]``.

        ``segments``: str (text, may be empty) or a code grid (h, w) (int tensor, numpy array or nested lists).
        """
        ids: list[int] = [self.bos] if bos else []
        for seg in segments:
            if isinstance(seg, str):
                ids += self.encode_text(seg)
            else:
                ids += self.image_span(seg)
        if eos:
            ids.append(self.eos)
        return ids

    def decode_document(self, ids: Iterable[int], strict: bool = True) -> list:
        """Ids -> segments: str (adjacent text joined) and LongTensor (h, w) per image.

        Rules: ``<s>`` and ``<pad>`` are dropped wherever they are; decoding stops at the first ``</s>`` (or a
        conversation's ``<eot>``, where ``<user>`` and ``<assistant>`` are dropped).
        A well-formed image span is ``<boi>``, exactly h*w image ids, ``<eoi>`` (with grid tokens:
        ``<boi> <rows_h> <cols_w>``, h rows of w image ids each ended by ``<row_end>``, ``<eoi>``), as
        ``grammar.read`` reads it. Anything else is malformed: a span cut short (by ``</s>``, a non-image id or the
        end of the ids), a span with more codes than its grid, an ``<eoi>`` without ``<boi>``, image or grid ids
        outside a span. ``strict=True`` raises ValueError naming the position; ``strict=False`` drops the
        malformed span (or stray ids) and goes on, reading the id that broke the span as if no span were open.
        """
        seq = [int(i) for i in _as_list(ids)]
        L, grammar = self.layout, self.grammar
        specials = L.special_ids
        markers = {specials[r] for r in CHAT_TOKENS if r in specials}  # a turn's start or end
        out: list = []
        text: list[int] = []

        def flush_text():
            if text:
                s = self.decode_text(text)
                if out and isinstance(out[-1], str):
                    out[-1] += s
                else:
                    out.append(s)
                text.clear()

        def bad(msg: str, pos: int):
            if strict:
                raise ValueError(f"malformed document at position {pos}: {msg} "
                                 "(decode_document(ids, strict=False) drops malformed image spans)")

        i, n = 0, len(seq)
        while i < n:
            t = seq[i]
            if t in (self.bos, self.pad):
                i += 1
            elif t == self.eos or (t in markers and t == specials["eot"]):
                break
            elif t in markers:
                i += 1
            elif t == self.boi:
                try:
                    span = grammar.read(seq, i)
                except SpanError as e:
                    bad(str(e), i)
                    i = e.at  # drop the span; read the breaking id normally
                    continue
                flush_text()
                out.append(torch.tensor(span.codes, dtype=torch.long).reshape(span.grid))
                i = span.end
            elif (why := grammar.stray(t)) is not None:
                bad(why, i)
                i += 1
            elif L.text_start <= t < L.text_end:
                text.append(t)
                i += 1
            else:
                raise ValueError(f"id {t} at position {i} is not in the vocabulary (size {L.vocab_size})")
        flush_text()
        return out

    # ------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + layout.json + tokenizer_config.json crash-safely (replaces ``directory``)."""
        with atomic_dir(directory) as tmp:
            self.tokenizer.save(str(tmp / TOKENIZER_FILE))
            (tmp / LAYOUT_FILE).write_text(json.dumps(self.layout.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            hf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
                  **{f"{role}_token": self.layout.special_tokens[role] for role in ("bos", "eos", "pad")},
                  "additional_special_tokens": [self.layout.special_tokens[r] for r in ("boi", "eoi", *CHAT_TOKENS)
                                                if r in self.layout.special_tokens]}
            (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Vocabulary:
        """Verify the directory against its MANIFEST.json, then load and cross-check ``tokenizer.json`` and
        ``layout.json`` (CheckpointError naming the file, or both on a mismatch)."""

        directory = Path(directory)
        tok_path, layout_path = directory / TOKENIZER_FILE, directory / LAYOUT_FILE
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: vocabulary directory not found; create it with `earlyfusion vocab build`")
        for p in (tok_path, layout_path):
            if not p.is_file():
                raise CheckpointError(f"{p}: file not found; a vocabulary directory holds {TOKENIZER_FILE} and {LAYOUT_FILE} "
                                      "(from `earlyfusion vocab build`)")
        verify_manifest(directory, (TOKENIZER_FILE, LAYOUT_FILE), REBUILD)
        layout = VocabLayout.from_dict(load_json(layout_path), str(layout_path))
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
            raise CheckpointError(f"{tok_path}: cannot be loaded by tokenizers ({' '.join(str(e).split())[:200]}); "
                                  f"the file is corrupted; {REBUILD}") from None
        return cls(tok, layout, where=f"{tok_path} and {layout_path}")

    @classmethod
    def build(cls, texts: Iterable[str], *, codebook_size: int, grid: tuple[int, int], image_tokenizer_fingerprint: str,
              text_vocab_size: int = 1024, min_frequency: int = 2, grid_tokens: bool = False,
              chat: bool = False) -> Vocabulary:
        """Train a byte-level BPE on ``texts`` and merge it with the special and image tokens.

        ``text_vocab_size`` is an upper bound on the text ids (the 256 byte tokens included); a small
        corpus stops with fewer merges, and the layout records the actual number. ``grid_tokens``: add the
        rows, columns and row-end tokens so that images of any grid up to ``grid`` keep their aspect ratio.
        ``chat``: add the conversation markers (``CHAT_TOKENS``) after the special tokens.
        """

        if text_vocab_size < BYTE_ALPHABET:
            raise ValueError(f"text_vocab_size must be at least {BYTE_ALPHABET} (the byte alphabet), got {text_vocab_size}")
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        roles = {**SPECIAL_TOKENS, **(CHAT_TOKENS if chat else {})}
        specials = list(roles.values())
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=len(specials) + text_vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_valid_texts(texts), trainer=trainer)
        special_ids = {role: tok.token_to_id(text) for role, text in roles.items()}
        n_model = tok.get_vocab_size(with_added_tokens=False)  # specials + text
        digits = max(MIN_IMAGE_TOKEN_DIGITS, len(str(codebook_size - 1)))
        tok.add_special_tokens([AddedToken(image_token(c, digits), special=True, normalized=False) for c in range(codebook_size)])
        layout = VocabLayout(
            special_tokens=roles, special_ids=special_ids, text_start=len(specials),
            text_vocab_size=n_model - len(specials), image_start=n_model, codebook_size=codebook_size,
            grid=tuple(grid), image_tokenizer_fingerprint=image_tokenizer_fingerprint, image_token_digits=digits,
            grid_tokens=bool(grid_tokens),
        )
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in layout.grid_token_names()])
        return cls(tok, layout, where="the newly built vocabulary")


# ---------------------------------------------------------------- helpers


def _as_list(ids) -> list:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.reshape(-1).tolist()
    return list(ids)


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _valid_texts(texts: Iterable[str]):
    for t in texts:
        if isinstance(t, str) and t and not _has_surrogates(t):
            yield t


_IMAGE_TOKEN_RE = re.compile(re.escape(IMAGE_TOKEN_PREFIX) + r"\d+>")


def _text_only(tokenizer):
    """The same tokenizer without added tokens: input text is never matched against special/image tokens."""

    d = json.loads(tokenizer.to_str())
    d["added_tokens"] = []
    d["post_processor"] = None
    return Tokenizer.from_str(json.dumps(d))


def _check_agreement(tok, layout: VocabLayout, where: str) -> None:
    """tokenizer.json must hold exactly the ids layout.json describes."""

    def fail(msg: str):
        raise CheckpointError(f"{where} disagree: {msg}; they must come from the same `earlyfusion vocab build` "
                              "(copy both files together, or rebuild the vocabulary)")

    total = tok.get_vocab_size(with_added_tokens=True)
    if total != layout.vocab_size:
        fail(f"the tokenizer has {total} ids, the layout {layout.vocab_size}")
    n_model = tok.get_vocab_size(with_added_tokens=False)
    if n_model != layout.image_start:
        fail(f"the BPE model has {n_model} ids but the layout puts the image range at {layout.image_start}")
    for role, text in layout.special_tokens.items():
        got = tok.token_to_id(text)
        if got != layout.special_ids[role]:
            fail(f"special token {role} {text!r} has id {got} in the tokenizer, {layout.special_ids[role]} in the layout")
    for code in sorted({0, layout.codebook_size // 2, layout.codebook_size - 1}):
        name = layout.image_token(code)
        got = tok.token_to_id(name)
        if got != layout.image_start + code:
            fail(f"image token {name!r} has id {got} in the tokenizer, {layout.image_start + code} in the layout")
    for k, name in enumerate(layout.grid_token_names()):
        got = tok.token_to_id(name)
        if got != layout.image_end + k:
            fail(f"grid token {name!r} has id {got} in the tokenizer, {layout.image_end + k} in the layout")
    if tok.id_to_token(layout.vocab_size) is not None:
        fail(f"the tokenizer has an id {layout.vocab_size} past the layout's end")
    # no BPE token may spell a special or image token (the text-only tokenizer could then emit it)
    vocab = tok.get_vocab(with_added_tokens=False)
    id_of = {t: layout.special_ids[r] for r, t in layout.special_tokens.items()}
    id_of.update({t: layout.image_end + k for k, t in enumerate(layout.grid_token_names())})
    for text, i in vocab.items():
        if id_of.get(text, i) != i or _IMAGE_TOKEN_RE.fullmatch(text):
            fail(f"BPE token {i} spells the reserved token {text!r}")


# ---------------------------------------------------------------- the image tokenizer it belongs to


def check_vocab_matches(vocab: Vocabulary, vq_dir: str | Path, where: str) -> str:
    """The vocabulary's image range must come from this very image tokenizer (fingerprint, codebook size and code
    grid); CheckpointError starting with ``where`` otherwise. Returns the image tokenizer's fingerprint."""

    fp = vq_fingerprint(vq_dir)
    built_for = vocab.layout.image_tokenizer_fingerprint
    if built_for != fp:
        raise CheckpointError(f"{where}: the vocabulary was built for image tokenizer {built_for[:12]} but {vq_dir} is "
                              f"{fp[:12]}; rebuild the vocabulary with `earlyfusion vocab build --image-tokenizer {vq_dir}`")
    cfg = read_vq_config(vq_dir)
    if vocab.codebook_size != cfg.codebook_size:
        raise CheckpointError(f"{where}: vocabulary codebook size {vocab.codebook_size} != {cfg.codebook_size} of the "
                              f"image tokenizer in {vq_dir}")
    if tuple(cfg.grid_size) != tuple(vocab.grid):
        raise CheckpointError(f"{where}: {vq_dir} has code grid {tuple(cfg.grid_size)} but the vocabulary "
                              f"{tuple(vocab.grid)}; rebuild the vocabulary with `earlyfusion vocab build`")
    return fp
