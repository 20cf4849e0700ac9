"""The grammar of an image inside a token sequence, in one place: ``SpanGrammar``.

An image span is ``<boi>``, the image's codes in raster order, then ``<eoi>``. Without grid tokens (Chameleon's
layout) every image is the layout's one grid of h·w codes::

    <boi> c c … c <eoi>

With grid tokens an image of any grid up to the layout's states its grid and ends every row::

    <boi> <rows_h> <cols_w> (c … c <row_end>) × h <eoi>        (w codes a row, 1 ≤ h ≤ H, 1 ≤ w ≤ W)

The grid tokens follow the image codes in the id space: ``<row_end>``, ``<rows_1..H>``, ``<cols_1..W>``
(``vocab_layout``). ``SpanGrammar`` writes a span (``build``), reads spans back (``read`` one, ``parse`` all of a
sequence: each a ``Span`` with where it starts and ends, its grid and its codes; ``SpanError`` says where a
malformed one broke), and follows a sequence token by token (``SpanCursor``, ``advance``, ``expects``,
``next_ids``): what a sampler needs to know which token may come next and how many codes are left. The
vocabulary, the sampler's rules and its text streamer, and the validation losses go through it, so the grammar
is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from earlyfusion.tokenizer.vocab_layout import ROW_END_TOKEN, cols_token, rows_token

Expect = Literal["rows", "cols", "code", "row_end", "eoi"]
"""What an open span wants next: a rows token, a columns token, an image code, ``<row_end>`` or ``<eoi>``."""
ROWS: Expect = "rows"
COLS: Expect = "cols"
CODE: Expect = "code"
ROW_END: Expect = "row_end"
EOI: Expect = "eoi"
DRAWN: tuple[Expect, ...] = (ROWS, COLS, CODE)
"""What the image chooses (its grid and its codes); the rest the grammar forces."""


class SpanError(ValueError):
    """A malformed image span, or an id that only belongs inside one found outside any."""

    def __init__(self, why: str, at: int, start: int | None = None):
        # at: the position of the id that broke it; start: that of the span's <boi> (None: a stray id)
        self.why, self.at, self.start = why, at, start
        super().__init__(why if start is None else f"image span opened at {start} {why}")


@dataclass(frozen=True)
class Span:
    """One well-formed image span of a sequence."""

    start: int
    """Position of its ``<boi>``."""
    end: int
    """Position just after its ``<eoi>``."""
    grid: tuple[int, int]
    """(rows, columns) of its code grid."""
    codes: tuple[int, ...]
    """Its h·w image codes (0 .. codebook_size - 1) in raster order."""


@dataclass(frozen=True)
class SpanCursor:
    """Where a sequence stands in image spans after the tokens read so far (hashable: samplers cache per state)."""

    open: bool = False
    """A span is open: ``<boi>`` read, ``<eoi>`` not yet."""
    codes: int = 0
    """Codes read in the open span; with grid tokens, in its current row."""
    rows: int = 0
    """Grid tokens: the rows the open span stated (0: not yet)."""
    cols: int = 0
    """Grid tokens: the columns the open span stated (0: not yet)."""
    done_rows: int = 0
    """Grid tokens: rows of the open span ended by ``<row_end>``."""


OUTSIDE = SpanCursor()
OPENED = SpanCursor(open=True)


@dataclass(frozen=True)
class SpanGrammar:
    """The image-span grammar of one id layout."""

    boi: int
    eoi: int
    image_start: int
    """Id of image code 0."""
    codebook_size: int
    grid: tuple[int, int]
    """The one grid of every image, or with grid tokens the largest (rows, columns)."""
    grid_tokens: bool = False

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(x) for x in self.grid))
        if len(self.grid) != 2 or min(self.grid) < 1 or self.codebook_size < 1:
            raise ValueError(f"a span grammar needs a grid of two positive sizes and a codebook, got grid {self.grid} "
                             f"and codebook_size {self.codebook_size}")

    @classmethod
    def of(cls, ids) -> SpanGrammar:
        """The grammar of a vocabulary-like object: a grammar itself, one's ``grammar`` attribute (``Vocabulary``),
        or one made from its ``boi``, ``eoi``, ``image_start``, ``codebook_size``, ``grid`` and ``grid_tokens``
        (absent: a fixed grid), as a ``VocabLayout`` has them."""
        if isinstance(ids, SpanGrammar):
            return ids
        own = getattr(ids, "grammar", None)
        if isinstance(own, SpanGrammar):
            return own
        return cls(int(ids.boi), int(ids.eoi), int(ids.image_start), int(ids.codebook_size), tuple(ids.grid),
                   bool(getattr(ids, "grid_tokens", False)))

    # ------------------------------------------------------------ ids
    @property
    def image_end(self) -> int:
        return self.image_start + self.codebook_size

    @cached_property  # cached: read for every token while sampling
    def code_ids(self) -> range:
        return range(self.image_start, self.image_end)

    @cached_property
    def grid_ids(self) -> range:
        """Row end, rows 1..H, columns 1..W (empty without grid tokens)."""
        H, W = self.grid
        return range(self.image_end, self.image_end + (1 + H + W if self.grid_tokens else 0))

    @cached_property
    def interior(self) -> range:
        """Every id that stands only between a span's ``<boi>`` and ``<eoi>``: the codes and the grid tokens."""
        return range(self.image_start, self.grid_ids.stop)

    @cached_property
    def row_end(self) -> int | None:
        return self.image_end if self.grid_tokens else None

    @cached_property
    def rows_ids(self) -> range:
        """``<rows_1>`` .. ``<rows_H>`` (empty without grid tokens)."""
        return range(self.image_end + 1, self.image_end + 1 + self.grid[0]) if self.grid_tokens else range(0)

    @cached_property
    def cols_ids(self) -> range:
        """``<cols_1>`` .. ``<cols_W>`` (empty without grid tokens)."""
        return range(self.rows_ids.stop, self.rows_ids.stop + self.grid[1]) if self.grid_tokens else range(0)

    def size_ids(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``<rows_h>`` and ``<cols_w>`` ids that state ``grid``."""
        h, w = self.check_grid(grid)
        if not self.grid_tokens:
            raise ValueError("this vocabulary has no grid tokens: its spans do not state their grid")
        return self.rows_ids[h - 1], self.cols_ids[w - 1]

    def stray(self, t: int) -> str | None:
        """Why id ``t`` cannot stand outside an image span (None where it can)."""
        if t == self.eoi:
            return "<eoi> without an open image span"
        if t in self.code_ids:
            return f"image id {t} outside an image span"
        if t in self.grid_ids:
            return f"grid token {t} outside an image span"
        return None

    # ------------------------------------------------------------ grids and lengths
    @property
    def tokens_per_image(self) -> int:
        """Codes in the largest image."""
        return self.grid[0] * self.grid[1]

    def span_length(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens of a span of ``grid`` (default: the largest), ``<boi>`` and ``<eoi>`` included."""
        h, w = grid or self.grid
        return h * (w + 1) + 4 if self.grid_tokens else h * w + 2

    @property
    def max_span(self) -> int:
        """Tokens of the longest span."""
        return self.span_length()

    def check_grid(self, grid) -> tuple[int, int]:
        """``grid`` as (rows, columns) if a span can hold it; ValueError saying which grids can otherwise."""
        H, W = self.grid
        try:
            h, w = (int(x) for x in grid)
        except (TypeError, ValueError):
            raise ValueError(f"a code grid is two sizes (rows, columns), got {grid!r}") from None
        if self.grid_tokens:
            if not (1 <= h <= H and 1 <= w <= W):
                raise ValueError(f"this vocabulary holds code grids of 1..{H} rows and 1..{W} columns, got {h}x{w}")
        elif (h, w) != (H, W):
            raise ValueError(f"an image must be a code grid of shape ({H}, {W}) for this vocabulary, got {(h, w)}")
        return h, w

    def grids(self) -> list[tuple[int, int]]:
        """Every grid a span can hold, rows first."""
        if not self.grid_tokens:
            return [self.grid]
        H, W = self.grid
        return [(h, w) for h in range(1, H + 1) for w in range(1, W + 1)]

    def words(self) -> str:
        """The longest span in words, for messages: ``<boi> 16 codes <eoi>``."""
        if not self.grid_tokens:
            return f"<boi> {self.tokens_per_image} codes <eoi>"
        h, w = self.grid
        return f"<boi> {rows_token(h)} {cols_token(w)} {h}x{w} codes with {h} {ROW_END_TOKEN} <eoi>"

    # ------------------------------------------------------------ writing and reading
    def build(self, grid: tuple[int, int], ids: Sequence[int]) -> list[int]:
        """The span of an image of ``grid`` whose codes have the token ids ``ids`` (raster order)."""
        h, w = self.check_grid(grid)
        ids = [int(i) for i in ids]
        if len(ids) != h * w:
            raise ValueError(f"a {h}x{w} image has {h * w} codes, got {len(ids)} ids")
        if ids and (min(ids) < self.image_start or max(ids) >= self.image_end):
            raise ValueError(f"image code ids must be in [{self.image_start}, {self.image_end})")
        if not self.grid_tokens:
            return [self.boi, *ids, self.eoi]
        span = [self.boi, *self.size_ids((h, w))]
        for r in range(h):
            span += ids[r * w:(r + 1) * w]
            span.append(self.row_end)
        span.append(self.eoi)
        return span

    def read(self, seq: Sequence[int], start: int) -> Span:
        """The span whose ``<boi>`` is at ``start``; SpanError at the first id that breaks it (a span cut short by a
        wrong id or by the end of ``seq``, a row too long or too short, a missing ``<eoi>``)."""
        n = len(seq)

        def broke(j: int, expected: str) -> SpanError:
            got = "where the ids end" if j >= n else f"got id {seq[j]}"
            return SpanError(f"wants {expected} at {j}, {got}", j, start)

        if start >= n or seq[start] != self.boi:
            raise broke(start, "<boi>")
        j = start + 1
        if self.grid_tokens:
            if j >= n or seq[j] not in self.rows_ids:
                raise broke(j, "a rows token")
            if j + 1 >= n or seq[j + 1] not in self.cols_ids:
                raise broke(j + 1, "a columns token")
            h, w = seq[j] - self.rows_ids.start + 1, seq[j + 1] - self.cols_ids.start + 1
            j += 2
        else:
            h, w = self.grid
        codes: list[int] = []
        for r in range(h):
            for _ in range(w):
                if j >= n or seq[j] not in self.code_ids:
                    raise broke(j, f"image code {len(codes) + 1} of {h * w}")
                codes.append(seq[j] - self.image_start)
                j += 1
            if self.grid_tokens:
                if j >= n or seq[j] != self.row_end:
                    raise broke(j, f"<row_end> after row {r + 1} of {h}")
                j += 1
        if j >= n or seq[j] != self.eoi:
            raise broke(j, f"<eoi> after {h * w} codes")
        return Span(start, j + 1, (h, w), tuple(codes))

    def parse(self, seq: Sequence[int], strict: bool = True) -> list[Span]:
        """Every image span of ``seq`` in order. ``strict``: SpanError for a malformed span or an id that belongs only
        inside a span found outside one; otherwise those are passed over (reading goes on at the id that broke a
        span, as if no span were open)."""
        seq = [int(t) for t in seq]
        spans, i = [], 0
        while i < len(seq):
            t = seq[i]
            if t != self.boi:
                why = self.stray(t)
                if why is not None and strict:
                    raise SpanError(why, i)
                i += 1
                continue
            try:
                spans.append(self.read(seq, i))
                i = spans[-1].end
            except SpanError as e:
                if strict:
                    raise
                i = e.at
        return spans

    # ------------------------------------------------------------ token by token
    def advance(self, cur: SpanCursor, t: int) -> SpanCursor:
        """The cursor after token ``t``. ``<boi>`` opens a fresh span and ``<eoi>`` closes it wherever they come; in an
        open span a code counts, ``<row_end>`` ends the current row and a rows or columns token states the grid; any
        other id changes nothing (a sampler's rules keep them out)."""
        if t == self.boi:
            return OPENED
        if t == self.eoi:
            return OUTSIDE
        if not cur.open:
            return cur
        if t in self.code_ids:
            return SpanCursor(True, cur.codes + 1, cur.rows, cur.cols, cur.done_rows)
        if t == self.row_end:
            return SpanCursor(True, 0, cur.rows, cur.cols, cur.done_rows + 1)
        if t in self.rows_ids:
            return SpanCursor(True, cur.codes, t - self.rows_ids.start + 1, cur.cols, cur.done_rows)
        if t in self.cols_ids:
            return SpanCursor(True, cur.codes, cur.rows, t - self.cols_ids.start + 1, cur.done_rows)
        return cur

    def expects(self, cur: SpanCursor) -> Expect | None:
        """What the open span wants next (None outside a span, where anything but its interior and ``<eoi>`` may come)."""
        if not cur.open:
            return None
        if not self.grid_tokens:
            return EOI if cur.codes >= self.tokens_per_image else CODE
        if cur.rows == 0:
            return ROWS
        if cur.cols == 0:
            return COLS
        if cur.done_rows >= cur.rows:
            return EOI
        return ROW_END if cur.codes >= cur.cols else CODE

    def codes_left(self, cur: SpanCursor) -> int | None:
        """Codes the open span still needs (None outside a span, or before it states its grid)."""
        if not cur.open:
            return None
        if not self.grid_tokens:
            return max(0, self.tokens_per_image - cur.codes)
        if cur.rows == 0 or cur.cols == 0:
            return None
        return max(0, (cur.rows - cur.done_rows) * cur.cols - cur.codes)

    def next_ids(self, cur: SpanCursor, grids: Sequence[tuple[int, int]] | None = None) -> Sequence[int]:
        """The ids the open span allows next; ``grids``: the (rows, columns) it may state (default: any it holds)."""
        kind = self.expects(cur)
        if kind is None:
            raise ValueError("no image span is open")
        if kind == CODE:
            return self.code_ids
        if kind == ROW_END:
            return [self.row_end]
        if kind == EOI:
            return [self.eoi]
        grids = self.grids() if grids is None else grids
        if kind == ROWS:
            return [self.rows_ids[h - 1] for h in sorted({h for h, _ in grids})]
        return [self.cols_ids[w - 1] for w in sorted({w for h, w in grids if h == cur.rows})]
