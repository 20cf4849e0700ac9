"""Decoding rules as small composable processors, and the text/image sampler.

A rule is a callable ``(allowed (V,) bool, row: Situation) -> allowed`` that narrows the ids one row may
produce next. Rules see a row only through its ``Situation``, a small hashable summary (inside an image
span? how many codes so far? first generated token? how much room is left?), so a batch has only a
handful of distinct situations at any step. ``Rules`` composes the rules of a modality and caches, per
situation, the additive mask they produce (0 allowed, -inf forbidden; situations with the same mask, such as
every code position of an image, share one row of the table): applying every rule to a batch costs one
lookup and one add per step, whatever the number of rules or codes per image. Masks are added to the raw (or
CFG-mixed) logits *before* temperature, top-k and top-p, so a forbidden id can never be drawn whatever
the sampling settings, and a forced id is drawn even if the model gave it -inf.

The rules:

* ``BanIds``: ids that are never generated (pad, bos).
* ``ImageSpan``: inside an image span only what the span grammar (``tokenizer.image_span.SpanGrammar``)
  allows next: image codes, and after exactly h·w codes the forced end-image; outside a span neither image
  codes, grid tokens nor end-image can appear. With grid tokens (images that keep their aspect ratio) the
  rows and columns tokens are drawn from the allowed grids (one grid: forced), then each row's codes, the
  row end and the end-image are forced at their places, so every span decodes to the grid it stated.
* ``ImageFits``: begin-image is banned where the longest allowed span (begin, codes, end) no longer fits
  in the row's remaining budget (the model's context and max-new-tokens).
* ``TextOnly``: no begin-image at all (so no image ids either, with ``ImageSpan``).
* ``ImageOnly``: the first generated token is begin-image (then ``ImageSpan`` drives the span).

``RowState`` tracks, per row and in plain Python (the loop reads every sampled token anyway), where it
stands in image spans: the grammar's ``SpanCursor`` (open span, stated grid, codes emitted), advanced by
``SpanGrammar.advance``. The ids come from a vocabulary-like object (``tokenizer.vocab.Vocabulary``, or a
``VocabLayout``): bos, eos, pad, and what ``SpanGrammar.of`` reads; no id is a literal here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from earlyfusion.tokenizer.image_span import CODE, DRAWN, SpanCursor, SpanGrammar

NEG_INF = float("-inf")
Modality = Literal["text", "image", "auto"]


class IdLayout(Protocol):
    """What the rules need to know about the vocabulary (``tokenizer.vocab.Vocabulary`` and ``VocabLayout`` satisfy
    it): the special ids, and the image span grammar (``SpanGrammar.of``: a ``grammar``, or boi, eoi, image_start,
    codebook_size, grid and optionally grid_tokens)."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image_start: int
    codebook_size: int
    grid: tuple[int, int]


# ---------------------------------------------------------------- per-row state


@dataclass(frozen=True)
class Situation:
    """All a rule may know about a row (hashable: masks are cached per situation)."""

    in_image: bool
    """An image span is open."""
    codes: int
    """Image codes emitted in the open span, capped at tokens_per_image (more never happen)."""
    first: bool
    """The next token is the first one generated."""
    room: int
    """Tokens the row may still append, capped at the longest span (what ``ImageFits`` compares)."""
    rows: int = 0
    """Grid tokens: the rows the open span stated (0: not yet)."""
    cols: int = 0
    """Grid tokens: the columns the open span stated (0: not yet)."""
    done_rows: int = 0
    """Grid tokens: rows of the open span ended by a row end; ``codes`` then counts the current row's codes."""

    def cursor(self) -> SpanCursor:
        """Where the row stands in its image span, as the grammar reads it."""
        return SpanCursor(self.in_image, self.codes, self.rows, self.cols, self.done_rows)

    def drawing(self, layout: IdLayout | SpanGrammar) -> bool:
        """The next token is chosen by the image (a code, or the grid a span states): sampled with the image
        settings and guided."""
        return SpanGrammar.of(layout).expects(self.cursor()) in DRAWN


@dataclass
class RowState:
    """Where each row of a sampling batch stands; every field is a list with one entry per row."""

    in_image: list[bool]
    """An image span is open (begin-image emitted, end-image not yet)."""
    codes: list[int]
    """Image codes emitted in the currently open span (with grid tokens: in its current row)."""
    length: list[int]
    """Tokens in the row so far (prompt + generated, padding excluded)."""
    finished: list[bool]
    """The row stopped (end of sequence, end of its image in image mode, or out of budget)."""
    step: int
    """Tokens generated so far (the same for every row)."""
    max_new_tokens: int
    context: int
    """The model's maximum sequence length."""
    grid: list[list[int]] | None = None
    """Grid tokens: per row [rows stated, columns stated, rows ended] of the open span (None without them)."""
    room_cap: int | None = None
    """What ``situation`` caps the room at: the longest span (None: worked out from the layout)."""
    grammar: SpanGrammar | None = None
    """The layout's span grammar (None: taken from the layout at first use)."""

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int]], layout: IdLayout | SpanGrammar, max_new_tokens: int,
                     context: int) -> RowState:
        """State after reading each prompt; a prompt may end inside an open image span (continuation)."""
        n = len(prompts)
        grammar = SpanGrammar.of(layout)
        state = cls(in_image=[False] * n, codes=[0] * n, length=[len(p) for p in prompts], finished=[False] * n,
                    step=0, max_new_tokens=max_new_tokens, context=context,
                    grid=[[0, 0, 0] for _ in range(n)] if grammar.grid_tokens else None, grammar=grammar)
        for i, ids in enumerate(prompts):
            for t in ids:
                state._read(i, int(t), grammar)
        return state

    def _grammar(self, layout: IdLayout) -> SpanGrammar:
        if self.grammar is None:
            self.grammar = SpanGrammar.of(layout)
        return self.grammar

    def cursor(self, i: int) -> SpanCursor:
        """Where row ``i`` stands in its image span."""
        rows, cols, done = self.grid[i] if self.grid is not None else (0, 0, 0)
        return SpanCursor(self.in_image[i], self.codes[i], rows, cols, done)

    def _read(self, i: int, t: int, grammar: SpanGrammar) -> None:
        """Account for token ``t`` appended to row ``i`` (span bookkeeping only)."""
        cur = grammar.advance(self.cursor(i), t)
        self.in_image[i], self.codes[i] = cur.open, cur.codes
        if self.grid is not None:
            self.grid[i] = [cur.rows, cur.cols, cur.done_rows]

    def remaining(self, i: int) -> int:
        """How many more tokens row ``i`` may still append."""
        return min(self.context - self.length[i], self.max_new_tokens - self.step)

    def situation(self, i: int, layout: IdLayout) -> Situation:
        grammar = self._grammar(layout)
        if self.room_cap is None:
            self.room_cap = grammar.max_span
        room = max(0, min(self.remaining(i), self.room_cap))
        cur = self.cursor(i)
        codes = cur.codes if self.grid is not None else min(cur.codes, grammar.tokens_per_image)
        return Situation(cur.open, codes, self.step == 0, room, cur.rows, cur.cols, cur.done_rows)

    def situations(self, layout: IdLayout) -> list[Situation]:
        return [self.situation(i, layout) for i in range(len(self.length))]

    def update(self, tokens: Sequence[int], layout: IdLayout) -> None:
        """Record the token just appended to each unfinished row (finished rows are left as they are)."""
        grammar = self._grammar(layout)
        for i, t in enumerate(tokens):
            if self.finished[i]:
                continue
            self._read(i, t, grammar)
            self.length[i] += 1
        self.step += 1


# ---------------------------------------------------------------- the rules

Rule = Callable[[Tensor, Situation], Tensor]


def allowed_grids(layout: IdLayout | SpanGrammar, grids: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The grids an image span may take: ``grids`` (each checked against the layout), or every one it holds."""
    grammar = SpanGrammar.of(layout)
    if grids is None or not grammar.grid_tokens:
        return grammar.grids()
    H, W = grammar.grid
    out = sorted({(int(h), int(w)) for h, w in grids})
    bad = [g for g in out if not (1 <= g[0] <= H and 1 <= g[1] <= W)]
    if not out or bad:
        raise ValueError(f"grids must be (rows, columns) within {H}x{W}, got {list(grids)}")
    return out


def _only_among(allowed: Tensor, tokens: Sequence[int]) -> Tensor:
    """Only ``tokens`` (forced choices: allowed even if an earlier rule banned them)."""
    out = torch.zeros_like(allowed)
    out[list(tokens)] = True
    return out


class LayoutRule:
    """A rule that reads the vocabulary's id layout."""

    def __init__(self, layout: IdLayout):
        self.layout = layout
        self.grammar = SpanGrammar.of(layout)


class BanIds:
    """These ids are never generated."""

    def __init__(self, ids: Sequence[int]):
        self.ids = sorted(set(int(i) for i in ids))

    def __call__(self, allowed: Tensor, row: Situation) -> Tensor:
        allowed[self.ids] = False
        return allowed


class ImageSpan(LayoutRule):
    """Inside a span: image codes only, then end-image after exactly h·w codes. Outside: no codes, no end-image.

    With grid tokens: after begin-image a rows token, then a columns token, from ``grids`` (the allowed
    (rows, columns); default every grid the layout holds), then each row's codes and its forced row end,
    then the forced end-image. Outside a span no grid token appears."""

    def __init__(self, layout: IdLayout, grids: Sequence[tuple[int, int]] | None = None):
        super().__init__(layout)
        self.grids = allowed_grids(layout, grids)

    def __call__(self, allowed: Tensor, row: Situation) -> Tensor:
        g = self.grammar
        if not row.in_image:
            allowed[g.interior.start:g.interior.stop] = False
            allowed[g.eoi] = False
            return allowed
        cur = row.cursor()
        if g.expects(cur) != CODE:  # a grid token, row end or end-image: forced among the allowed ones
            return _only_among(allowed, g.next_ids(cur, self.grids))
        codes = slice(g.code_ids.start, g.code_ids.stop)
        only_codes = torch.zeros_like(allowed)
        only_codes[codes] = allowed[codes]  # the earlier rules' bans on codes stay
        return only_codes


class ImageFits(LayoutRule):
    """Never open an image span that cannot be completed (the longest allowed span) within the budget."""

    def __init__(self, layout: IdLayout, grids: Sequence[tuple[int, int]] | None = None):
        super().__init__(layout)
        self.span = max(self.grammar.span_length(g) for g in allowed_grids(layout, grids))

    def __call__(self, allowed: Tensor, row: Situation) -> Tensor:
        if not row.in_image and row.room < self.span:
            allowed[self.layout.boi] = False
        return allowed


class TextOnly(LayoutRule):
    """Text mode: begin-image, end-image, image codes and grid tokens are never produced."""

    def __call__(self, allowed: Tensor, row: Situation) -> Tensor:
        g = self.grammar
        allowed[[g.boi, g.eoi]] = False
        allowed[g.interior.start:g.interior.stop] = False
        return allowed


class ImageOnly(LayoutRule):
    """Image mode: the first generated token opens an image span (the loop stops at its end-image)."""

    def __call__(self, allowed: Tensor, row: Situation) -> Tensor:
        if row.first and not row.in_image:
            return _only_among(allowed, [self.layout.boi])
        return allowed


def rules_for(modality: Modality, layout: IdLayout, grids: Sequence[tuple[int, int]] | None = None) -> list[Rule]:
    """The rules for a modality, in the order they are applied; ``grids``: the (rows, columns) an image may
    take where the layout has grid tokens (default: every grid it holds)."""
    rules: list[Rule] = [BanIds([layout.pad, layout.bos])]
    if modality == "text":
        rules.append(TextOnly(layout))
    elif modality == "image":
        rules.append(ImageOnly(layout))
    rules += [ImageSpan(layout, grids), ImageFits(layout, grids)]
    return rules


def allowed_ids(rules: Sequence[Rule], row: Situation, vocab_size: int) -> Tensor:
    """(V,) bool: the ids a row in this situation may produce under every rule (applied in order)."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    for rule in rules:
        allowed = rule(allowed, row)
    return allowed


class Rules:
    """The rules of one modality, applied to a batch through a per-situation cache of masks."""

    def __init__(self, rules: Sequence[Rule], vocab_size: int, device: torch.device | str = "cpu"):
        self.rules, self.vocab_size, self.device = list(rules), vocab_size, device
        self._index: dict[Situation, int] = {}
        self._by_mask: dict[bytes, int] = {}  # distinct masks: every code position of an image shares one
        self._forced: list[bool] = []  # per distinct mask: exactly one id allowed
        self._table = torch.empty(0, vocab_size, device=device)  # (distinct masks, V) of 0 / -inf

    def _row(self, row: Situation) -> int:
        k = self._index.get(row)
        if k is None:
            allowed = allowed_ids(self.rules, row, self.vocab_size)
            n = int(allowed.sum())
            if n == 0:
                raise RuntimeError(f"the decoding rules leave no id to generate in {row}; they contradict each other")
            key = np.packbits(allowed.numpy()).tobytes()
            k = self._by_mask.get(key)
            if k is None:
                mask = torch.zeros(self.vocab_size).masked_fill_(~allowed, NEG_INF).to(self.device)
                self._table = torch.cat([self._table, mask[None]])
                self._forced.append(n == 1)
                k = self._by_mask[key] = len(self._by_mask)
            self._index[row] = k
        return k

    def apply(self, logits: Tensor, rows: Sequence[Situation]) -> Tensor:
        """logits (B, V) -> a new tensor with every forbidden id at -inf. A row with one allowed id gets
        logit 0 there, whatever the model gave it, so it is drawn under any sampling settings."""
        ks = [self._row(r) for r in rows]
        if all(k == ks[0] for k in ks):  # the common case: one (1, V) row broadcasts
            mask = self._table[ks[0]:ks[0] + 1]
            return mask.expand_as(logits).clone() if self._forced[ks[0]] else logits + mask
        index = torch.tensor(ks, device=self.device)
        masks = self._table[index]
        out = logits + masks
        forced = [self._forced[k] for k in ks]
        if any(forced):
            out = torch.where(torch.tensor(forced, device=self.device)[:, None], masks, out)
        return out


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplerParams:
    """How one kind of position (text or image code) is sampled."""

    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely ids; 0 = no limit."""
    top_p: float = 1.0
    """Keep the smallest set of ids whose probability reaches p (nucleus); 1 = no limit."""

    def __post_init__(self):
        check_sampler_settings(self.temperature, self.top_k, self.top_p)


def check_sampler_settings(temperature: float, top_k: int, top_p: float, option: str = "") -> None:
    """ValueError unless temperature is finite and >= 0, top_k an integer >= 0 and top_p in (0, 1].
    ``option`` prefixes the names in the message (``--``, ``--image-``)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{option}temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{option}top-k must be an integer >= 0 (0 = no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"{option}top-p must be in (0, 1] (1 = no limit), got {top_p}")


def _draw(logits: Tensor, p: SamplerParams, generator: torch.Generator | None) -> Tensor:
    """One id per row of masked logits (B, V), every row with the same settings."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    V = logits.shape[-1]
    k = p.top_k if 0 < p.top_k < V else V
    best, order = torch.topk(logits, k, dim=-1)  # (B, k), best first
    probs = torch.softmax(best / p.temperature, dim=-1)
    if p.top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # probability mass of the strictly better ids
        drop = before >= p.top_p
        drop[:, 0] = False  # the best id always stays
        probs = probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into the top-k; needs no normalising
    return order.gather(-1, choice)[:, 0]


def sample_next(logits: Tensor, image_rows: Sequence[bool], text: SamplerParams, image: SamplerParams,
                generator: torch.Generator | None) -> Tensor:
    """Draw one id per row from masked logits (B, V); rows flagged in ``image_rows`` use ``image``, others ``text``."""
    logits = logits.float()
    image_rows = [bool(r) for r in image_rows]
    if all(image_rows) or not any(image_rows):  # one kind of position: one draw for the batch
        return _draw(logits, image if image_rows[0] else text, generator)
    tok = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for flag, params in ((False, text), (True, image)):
        rows = torch.tensor([i for i, r in enumerate(image_rows) if r == flag], device=logits.device)
        tok[rows] = _draw(logits[rows], params, generator)
    return tok
