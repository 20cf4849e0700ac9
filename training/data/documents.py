"""Documents: records -> token id arrays, built through the Vocabulary, and ``prepare`` that reads them all.

  * a pair becomes, per draw, ``<s> <boi> codes <eoi> caption </s>`` (reading, ``reading_ratio`` of
    the time) or ``<s> caption <boi> codes <eoi> </s>`` (drawing), the caption dropped for
    ``cond_dropout`` of drawing examples (``<s> <boi> codes <eoi> </s>``: the unconditional case that
    classifier-free guidance needs). A pair without caption is always the unconditional document.
    Pairs are therefore kept as (codes, caption ids) and assembled per draw (``pair_document``).
  * with augmentation (``--augment-views K``) a pair keeps the K code grids of its image
    (``Part.views``) and each draw names the one it uses.
  * interleaved records keep their order (consecutive texts joined by a blank line, as the paragraphs
    they are); text records are ``<s> text </s>``. Both are assembled once, here.

Image spans come from the vocabulary's span grammar (``Vocabulary.image_span`` with each image's own grid), and
so does every image length (``span_length``, ``max_span``): with grid tokens an image states its grid and ends
each row.

Too long for the context (T = ``context_len``): a pair's caption is cut to T - (``max_span`` + 2) tokens (both
orders then fit, whatever grid the image has); with ``fit_captions`` (the trainer) a caption that does not fit
is an error instead (``ContextTooShort``), raised before any image is encoded. Other documents: if ``<s>`` plus their
image spans alone exceed T the record is skipped ("too_long"); otherwise text is cut from the end of each text segment in order, keeping room
for every image that follows, and the document ends without ``</s>``. Truncations are counted
(``PreparedData.truncated``); under ``strict`` they are errors.

Text is tokenised at load (fast; depends on the vocabulary); image codes come from the cache (``codes``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.tokenizer.vocab import check_vocab_matches

from .augment import NO_AUGMENT, Augment
from .codes import (
    ImageTable,
    augment_key,
    cache_key,
    encode_images,
    grid_codes,
    grid_key,
    local_image_table,
    resolve_cache_dir,
    table_from,
)
from .chat_template import conversation_document
from .config import DataConfig
from .conversations import conversation_records, picture_order
from .records import SkipReport, interleaved_records, pair_records, text_records
from .sources import Kind, PartSpec, load_hub, resolve_sources

READ, DRAW, UNCOND = 0, 1, 2  # the three documents a pair can become


def pair_overhead(vocab, grid: tuple[int, int] | None = None) -> int:
    """Tokens of a pair document besides its caption: ``<s>``, the image span of ``grid`` (default: the largest),
    ``</s>``."""
    return vocab.span_length(grid) + 2


def span_words(vocab) -> str:
    """The largest image span in words, for messages: ``<boi> 16 codes <eoi>``."""
    return vocab.grammar.words()


class ContextTooShort(UserError):
    """A pair's caption and its image do not fit in the context (``prepare(fit_captions=True)``).

    ``need`` is the shortest context that holds the longest pair document, ``where`` names its record.
    """

    def __init__(self, need: int, context_len: int, where: str, caption_tokens: int, image: str):
        self.need, self.context_len, self.where = need, context_len, where
        self.caption_tokens, self.image = caption_tokens, image
        super().__init__(f"context of {context_len} tokens cannot hold one image with its caption: {where} has a caption "
                         f"of {caption_tokens} tokens, and <s> {image} caption </s> needs "
                         f"{need}; raise --context-len to {need} or shorten the caption")


@dataclass
class Part:
    """One part of the mixture, ready to sample: pairs (codes + caption ids) or whole documents."""

    kind: Kind
    name: str
    weight: float
    codes: np.ndarray | None = None  # pairs: (N, L) int32, the images as they are (``ImageTable.codes`` rows)
    captions: list[np.ndarray] = field(default_factory=list)  # pairs: caption text ids (may be empty)
    docs: list[np.ndarray] = field(default_factory=list)  # interleaved/text/conversations: document ids (int32)
    trained: list[np.ndarray] | None = None  # conversations: per document, which tokens are targets with loss
    views: np.ndarray | None = None  # pairs with augmentation: (N, K-1, L) int32, the augmented views
    mirror_captions: list[np.ndarray] | None = None  # pairs with mirrored views whose captions change: their captions
    mirrored: tuple[bool, ...] = ()  # with mirror_captions: whether each view (0..K-1) is mirrored
    grids: np.ndarray | None = None  # (rows, columns) int32: pairs (N, 2), each image's; interleaved and
    # conversations (M, 2), every image's in the documents
    order: Counter = field(default_factory=Counter)  # conversations: ``picture_order`` of the questions kept

    def __len__(self) -> int:
        return len(self.codes) if self.kind == "pairs" else len(self.docs)

    @property
    def n_views(self) -> int:
        """Code grids per pair: 1, or K with augmentation."""
        return 1 if self.views is None else 1 + self.views.shape[1]

    def grid(self, item: int) -> tuple[int, int]:
        """(rows, columns) of a pair's image (every view has it)."""
        return tuple(int(x) for x in self.grids[item])

    def image(self, item: int, view: int = 0) -> np.ndarray:
        """The (h, w) code grid of a pair's image: view 0 as it is, 1..K-1 augmented."""
        return grid_codes(self.codes[item] if view == 0 else self.views[item, view - 1], self.grids[item])

    def caption(self, item: int, view: int = 0) -> np.ndarray:
        """The caption ids a pair's image shows with view ``view``: the mirrored caption for a mirrored view."""
        if self.mirror_captions is not None and self.mirrored[view]:
            return self.mirror_captions[item]
        return self.captions[item]

    def tokens(self, vocab) -> int:
        """Tokens of one pass over the part (every pair once, with its caption)."""
        if self.kind == "pairs":
            grids, counts = np.unique(self.grids.reshape(-1, 2), axis=0, return_counts=True)
            return sum(len(c) for c in self.captions) + sum(int(n) * pair_overhead(vocab, tuple(g))
                                                            for g, n in zip(grids.tolist(), counts))
        return sum(len(d) for d in self.docs)


@dataclass
class PreparedData:
    parts: list[Part]
    report: SkipReport
    truncated: Counter
    """Documents cut to the context, by part kind."""
    images_cached: int = 0
    images_encoded: int = 0
    seconds: float = 0.0
    longest_pair: int = 0
    """Tokens of the longest pair document before any cut (its caption in full, the largest image); 0 without pairs."""
    grids: list[tuple[int, int]] = field(default_factory=list)
    """The distinct code grids (rows, columns) of the images in the parts, sorted."""

    @property
    def question_first(self) -> bool | None:
        """Whether the conversations mostly put a question's pictures after its text (None: no question holds both),
        the order a question to the trained model is then written in."""
        order = sum((p.order for p in self.parts), Counter())
        if not order:
            return None
        return order["question first"] >= order["pictures first"]

    def summary(self) -> str:
        parts = ", ".join(f"{len(p)} {p.kind} ({p.weight:.2f})" for p in self.parts)
        trunc = sum(self.truncated.values())
        return (f"data: {parts}; images {self.images_cached} cached + {self.images_encoded} encoded; "
                f"{self.report.summary()}" + (f"; {trunc} truncated to the context" if trunc else "")
                + f"; {self.seconds:.1f}s")


# ---------------------------------------------------------------- ids


def image_ids(vocab, codes: np.ndarray) -> np.ndarray:
    """One image's span (int64) for its (h, w) code grid, as the vocabulary writes it."""
    return np.asarray(vocab.image_span(codes), np.int64)


def pair_document(vocab, codes: np.ndarray, caption: np.ndarray, variant: int) -> np.ndarray:
    """The ids (int64) of one draw of a pair: READ image->caption, DRAW caption->image, UNCOND image alone."""
    v = vocab
    img = image_ids(v, codes)
    if variant == READ:
        seq = [[v.bos], img, caption, [v.eos]]
    elif variant == DRAW:
        seq = [[v.bos], caption, img, [v.eos]]
    else:
        seq = [[v.bos], img, [v.eos]]
    return np.concatenate([np.asarray(s, np.int64) for s in seq])


class DocumentBuilder:
    """Turns records into id arrays with the truncation rules of the module docstring."""

    def __init__(self, vocab, context_len: int, strict: bool):
        self.v = vocab
        self.T = context_len
        self.strict = strict
        self.truncated: Counter = Counter()

    def note_truncated(self, kind: str, where: str, detail: str) -> None:
        if self.strict:
            raise UserError(f"{where}: {detail} (longer than --context-len {self.T}); shorten it, raise the context "
                            "length, or run without --strict to truncate and count")
        self.truncated[kind] += 1

    def caption(self, ids: list[int], where: str) -> np.ndarray:
        cap = self.T - pair_overhead(self.v)
        if len(ids) > cap:
            self.note_truncated("pairs", where, f"caption of {len(ids)} tokens")
            ids = ids[:cap]
        return np.asarray(ids, np.int32)

    def document(self, pieces: list[tuple[str, object]], where: str, kind: str, report: SkipReport) -> np.ndarray | None:
        """pieces: ("t", text ids) | ("i", codes (h, w)) -> document ids, or None if skipped."""
        v = self.v
        n_img = sum(k == "i" for k, _ in pieces)
        img_tokens = sum(v.span_length(x.shape) for k, x in pieces if k == "i")
        n_text = sum(len(x) for k, x in pieces if k == "t")
        budget = None
        if 2 + img_tokens + n_text > self.T:
            need = 1 + img_tokens
            if need > self.T:
                report.add("too_long", where, f"{n_img} image(s) need {need} tokens > --context-len {self.T}")
                return None
            budget = self.T - need
            self.note_truncated(kind, where, f"document of {2 + img_tokens + n_text} tokens")
        out: list[np.ndarray] = [np.asarray([v.bos], np.int32)]
        for k, x in pieces:
            if k == "t":
                if budget is not None:
                    x = x[:budget]
                    budget -= len(x)
                out.append(np.asarray(x, np.int32))
            else:
                out.append(image_ids(v, x).astype(np.int32))
        if budget is None:
            out.append(np.asarray([v.eos], np.int32))
        return np.concatenate(out)

    def texts(self, recs: list[tuple[str, str]], kind: str, report: SkipReport) -> list[np.ndarray]:
        """``<s> text </s>`` for each (where, text); documents skipped as too long are left out."""
        ids = self.v.encode_texts([t for _, t in recs])
        docs = [self.document([("t", x)], where, kind, report) for (where, _), x in zip(recs, ids)]
        return [d for d in docs if d is not None]


# ---------------------------------------------------------------- parts


def _caption_ids(vocab, recs) -> list[list[int]]:
    """The text ids of every pair record's caption (empty for a record without one)."""
    return vocab.encode_texts([t if t and t.strip() else "" for _, _, t in recs])


def _longest_pair(vocab, recs, ids: list[list[int]]) -> tuple[int, str, int]:
    """(tokens, record, caption tokens) of the longest pair document of ``recs``; (0, "", 0) if none."""
    if not ids:
        return 0, "", 0
    k = max(range(len(ids)), key=lambda i: len(ids[i]))
    return len(ids[k]) + pair_overhead(vocab), recs[k][0], len(ids[k])


def _check_fit(longest: tuple[int, str, int], context_len: int, vocab) -> None:
    need, where, caption = longest
    if need > context_len:
        raise ContextTooShort(need, context_len, where, caption, span_words(vocab))


def _pairs_part(spec: PartSpec, recs, ids: list[list[int]], table: ImageTable, vocab, builder: DocumentBuilder,
                report: SkipReport, augment: Augment = NO_AUGMENT) -> Part:
    """recs (where, image source, caption) with their caption ids -> the pairs whose image is good; with mirrored
    views whose captions change (``augment.swap``), each pair's mirrored caption too."""
    good = []
    for i, ((where, path, _), cap) in enumerate(zip(recs, ids)):
        row = table.index[path]
        reason = table.reasons[row]
        if reason:
            report.add(reason, where)
            continue
        good.append((i, row, builder.caption(cap, where)))
    report.ok(len(good))
    rows = [row for _, row, _ in good]
    sel = np.asarray(rows, np.int64)
    codes = table.codes[sel] if rows else np.zeros((0, vocab.tokens_per_image), np.int32)
    views = table.views[sel] if table.views is not None and rows else None
    grids = table.grids[sel] if rows else np.zeros((0, 2), np.int32)
    part = Part("pairs", spec.location, spec.weight, codes=codes, captions=[c for _, _, c in good], views=views,
                grids=grids)
    if views is not None and augment.mirrors_captions:
        texts = [augment.mirror_caption(recs[i][2]) if recs[i][2] and recs[i][2].strip() else "" for i, _, _ in good]
        cap = builder.T - pair_overhead(vocab)  # cut as the caption was (already counted if it was)
        part.mirror_captions = [np.asarray(m[:cap], np.int32) for m in vocab.encode_texts(texts)]
        part.mirrored = tuple(augment.mirrored(v) for v in range(part.n_views))
    return part


def _interleaved_part(spec: PartSpec, recs, table: ImageTable, vocab, builder: DocumentBuilder, report: SkipReport) -> Part:
    good = []
    for where, segs in recs:
        bad = next(((k, table.reasons[table.index[x]]) for k, (kind, x) in enumerate(segs)
                    if kind == "i" and table.reasons[table.index[x]]), None)
        if bad is not None:
            report.add(bad[1], f"{where} (segment {bad[0]}: {segs[bad[0]][1]})")
            continue
        good.append((where, segs))
    flat = [x for _, segs in good for k, x in segs if k == "t"]
    encoded = iter(vocab.encode_texts(flat))
    docs, grids = [], []
    for where, segs in good:
        pieces = [("t", next(encoded)) if k == "t" else ("i", table.image(table.index[x])) for k, x in segs]
        d = builder.document(pieces, where, "interleaved", report)
        if d is not None:
            docs.append(d)
            grids += [x.shape for k, x in pieces if k == "i"]
    report.ok(len(docs))
    return Part("interleaved", spec.location, spec.weight, docs=docs, grids=np.asarray(grids, np.int32).reshape(-1, 2))


def _conversations_part(spec: PartSpec, recs, table: ImageTable, vocab, context_len: int, report: SkipReport) -> Part:
    """The conversations whose images are good and which fit the context whole (a cut answer would teach cut
    answers): ``chat_template`` documents, loss on the assistant's turns."""
    docs, trained, grids, order = [], [], [], Counter()
    texts = iter(vocab.encode_texts([x for _, _, turns in recs for t in turns for k, x in t.segments if k == "t"]))
    for where, _, turns in recs:
        paths = [x for t in turns for k, x in t.segments if k == "i"]
        bad = next((p for p in paths if table.reasons[table.index[p]]), None)
        pieces = [(t.role, [("t", next(texts)) if k == "t" else ("i", x) for k, x in t.segments]) for t in turns]
        if bad is not None:
            report.add(table.reasons[table.index[bad]], f"{where} ({bad})")
            continue
        pieces = [(role, [(k, x if k == "t" else table.image(table.index[x])) for k, x in segs]) for role, segs in pieces]
        ids, mask = conversation_document(vocab, pieces)
        if len(ids) > context_len:
            report.add("too_long", where, f"a conversation of {len(ids)} tokens > --context-len {context_len}")
            continue
        docs.append(ids)
        trained.append(mask)
        grids += [x.shape for _, segs in pieces for k, x in segs if k == "i"]
        order += picture_order(turns)
    report.ok(len(docs))
    return Part("conversations", spec.location, spec.weight, docs=docs, trained=trained,
                grids=np.asarray(grids, np.int32).reshape(-1, 2), order=order)


def _hub_part(spec: PartSpec, cfg: DataConfig, vocab, image_tokenizer, vq_fp: str, cache_root: Path,
              builder: DocumentBuilder, report: SkipReport, augment: Augment, fit: bool) -> tuple[Part, int, int, int]:
    """A hub data set: pairs if it has the image column, else text documents from the text column.
    (part, images encoded, images from the cache, longest pair document)."""

    ds = load_hub(spec.location, cfg.split)
    cols = ds.column_names
    texts = [t if isinstance(t, str) else None for t in ds[cfg.text_column]] if cfg.text_column in cols else [None] * len(ds)
    if cfg.image_column not in cols:
        if cfg.text_column not in cols:
            raise UserError(f"{spec.location}: neither image column {cfg.image_column!r} nor text column "
                            f"{cfg.text_column!r} (columns: {', '.join(cols)})")
        recs = [(f"{spec.location}[{i}]", t) for i, t in enumerate(texts)]
        ok = [(w, t) for w, t in recs if t and t.strip()]
        for w, t in recs:
            if not (t and t.strip()):
                report.add("empty", w)
        docs = builder.texts(ok, "text", report)
        report.ok(len(docs))
        return Part("text", spec.location, spec.weight, docs=docs), 0, 0, 0
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    wheres = [f"{spec.location}[{i}]" for i in range(len(ds))]
    srcs = ds.select_columns([cfg.image_column]).rename_column(cfg.image_column, "src").add_column("where", wheres)
    recs = [(w, w, t) for w, t in zip(wheres, texts)]
    ids = _caption_ids(vocab, recs)
    longest = _longest_pair(vocab, recs, ids)
    if fit:
        _check_fit(longest, builder.T, vocab)
    key = cache_key(vq_fp, ds._fingerprint, cfg.image_column, cfg.split, *augment_key(augment),
                    *grid_key(vocab.grid_tokens))
    t0 = time.perf_counter()
    out, hit = encode_images(srcs, key, image_tokenizer, cache_root, cfg.strict, augment=augment,
                             grid_tokens=vocab.grid_tokens)
    table = table_from(out.remove_columns(["src"]), wheres, hit, time.perf_counter() - t0, vocab.grid)
    part = _pairs_part(spec, recs, ids, table, vocab, builder, report, augment)
    return part, 0 if hit else len(ds), len(ds) if hit else 0, longest[0]


def _grids_of(parts: list[Part]) -> list[tuple[int, int]]:
    """The distinct grids of the images the parts use: the pairs' images and those of the interleaved documents."""
    return sorted({(int(h), int(w)) for p in parts if p.grids is not None for h, w in p.grids.tolist()})


def prepare(cfg: DataConfig, vocab, image_tokenizer: str | Path, *, context_len: int, seed: int = 0,
            fit_captions: bool = False) -> PreparedData:
    """Read every source, encode (or load cached) image codes, tokenise text: the mixture parts.

    ``seed`` chooses the augmented views (``cfg.augment_views`` > 1); ``fit_captions``: a pair whose caption and
    image do not fit in ``context_len`` raises ContextTooShort (before any image is encoded) instead of being cut.
    """
    t0 = time.perf_counter()
    augment = cfg.augment(seed)
    report = SkipReport(strict=cfg.strict)
    specs = resolve_sources(cfg.sources, cfg.split)
    has_images = any(s.kind in ("pairs", "interleaved", "conversations") for s in specs)
    if any(s.kind == "conversations" for s in specs):
        vocab.chat_id("eot")  # a vocabulary without the conversation markers: one line, before anything is read
    vq_fp = check_vocab_matches(vocab, image_tokenizer, "--data images") if has_images else ""
    if has_images and context_len < pair_overhead(vocab):
        raise UserError(f"--context-len {context_len} cannot hold one image document "
                        f"(<s> {span_words(vocab)} </s> = {pair_overhead(vocab)} tokens)")
    cache_root = resolve_cache_dir(cfg.cache_dir, cfg.sources)
    builder = DocumentBuilder(vocab, context_len, cfg.strict)
    parts: list[Part] = []
    cached = encoded = 0
    longest = (0, "", 0)  # the longest pair document: (tokens, record, caption tokens)

    # records of every part; local images of one --data entry share one cached table
    records: list[tuple[PartSpec, list]] = []
    images_by_source: dict[str, tuple[list[str], list[str]]] = {}
    for spec in specs:
        if spec.hub:
            records.append((spec, []))
            continue
        if spec.kind == "pairs":
            recs = [(w, str(p), t) for w, p, t in pair_records(Path(spec.location), cfg.text_column, report,
                                                                     cfg.allow_outside_paths)]
            ids = _caption_ids(vocab, recs)
            longest = max(longest, _longest_pair(vocab, recs, ids))
            paths, wheres = images_by_source.setdefault(spec.source, ([], []))
            paths += [p for _, p, _ in recs]
            wheres += [w for w, _, _ in recs]
            recs = (recs, ids)
        elif spec.kind == "interleaved":
            recs = list(interleaved_records(Path(spec.location), report, cfg.allow_outside_paths))
            paths, wheres = images_by_source.setdefault(spec.source, ([], []))
            for where, segs in recs:
                for k, x in segs:
                    if k == "i":
                        paths.append(x)
                        wheres.append(where)
        elif spec.kind == "conversations":
            recs = list(conversation_records(Path(spec.location), report, cfg.allow_outside_paths))
            paths, wheres = images_by_source.setdefault(spec.source, ([], []))
            for where, _, turns in recs:
                for t in turns:
                    paths += [x for k, x in t.segments if k == "i"]
                    wheres += [where for k, _ in t.segments if k == "i"]
        else:
            recs = list(text_records(Path(spec.location), report))
        records.append((spec, recs))

    if fit_captions:
        _check_fit(longest, context_len, vocab)  # before any image is encoded
    tables: dict[str, ImageTable] = {}
    for source, (paths, wheres) in images_by_source.items():
        table = local_image_table(paths, wheres, image_tokenizer, vq_fp, cache_root, cfg.strict, augment,
                                  grid_tokens=vocab.grid_tokens)
        tables[source] = table
        cached += len(table.srcs) if table.cache_hit else 0
        encoded += 0 if table.cache_hit else len(table.srcs)
        log.info("%s: %d images %s in %.1fs", source, len(table.srcs),
                 "loaded from the code cache" if table.cache_hit else "encoded", table.seconds)

    for spec, recs in records:
        if spec.hub:
            part, n_new, n_old, n_tokens = _hub_part(spec, cfg, vocab, image_tokenizer, vq_fp, cache_root, builder, report,
                                                     augment, fit_captions)
            encoded += n_new
            cached += n_old
            longest = max(longest, (n_tokens, spec.location, 0))
        elif spec.kind == "pairs":
            part = _pairs_part(spec, *recs, tables[spec.source], vocab, builder, report, augment)
        elif spec.kind == "interleaved":
            part = _interleaved_part(spec, recs, tables[spec.source], vocab, builder, report)
        elif spec.kind == "conversations":
            part = _conversations_part(spec, recs, tables[spec.source], vocab, context_len, report)
        else:
            part = Part("text", spec.location, spec.weight, docs=builder.texts(recs, "text", report))
            report.ok(len(part.docs))
        if len(part) == 0:
            log.warning("%s: no usable records; left out of the mixture", spec.location)
            continue
        parts.append(part)
    if not parts:
        raise UserError(f"--data {' '.join(cfg.sources)}: no usable records at all ({report.summary()})")
    data = PreparedData(parts, report, builder.truncated, cached, encoded, time.perf_counter() - t0, longest[0],
                        _grids_of(parts))
    if report.total:
        for reason, examples in sorted(report.examples.items()):
            log.warning("skipped %d record(s) (%s), e.g. %s", report.counts[reason], reason, examples[0])
    log.info("%s", data.summary())
    return data
