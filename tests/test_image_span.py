"""The image-span grammar (tokenizer/image_span.py) on its own: spans built from a code grid parse back to the same
grid (square and non-square, with and without grid tokens), the token-by-token cursor allows exactly h·w codes with
row ends at their places and forces the end-image, and malformed spans raise where they break."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfusion.tokenizer.image_span import (CODE, COLS, EOI, OUTSIDE, ROW_END, ROWS, SpanCursor, SpanError,
                                              SpanGrammar)
from earlyfusion.tokenizer.vocab_layout import SPECIAL_TOKENS, VocabLayout

# [bos eos pad boi eoi | 10 text ids | 12 codes | row_end rows_1..3 cols_1..5]
TEXT = list(range(5, 15))
FIXED = SpanGrammar(boi=3, eoi=4, image_start=15, codebook_size=12, grid=(2, 3))
GRIDDED = SpanGrammar(boi=3, eoi=4, image_start=15, codebook_size=12, grid=(3, 5), grid_tokens=True)


def code_ids(g: SpanGrammar, h: int, w: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [g.image_start + rng.randrange(g.codebook_size) for _ in range(h * w)]


def walk(g: SpanGrammar, ids, cur: SpanCursor = OUTSIDE) -> SpanCursor:
    for t in ids:
        cur = g.advance(cur, t)
    return cur


# ---------------------------------------------------------------- ids and lengths


def test_ids_follow_the_layout():
    layout = VocabLayout(special_tokens=dict(SPECIAL_TOKENS), special_ids={r: i for i, r in enumerate(SPECIAL_TOKENS)},
                         text_start=5, text_vocab_size=10, image_start=15, codebook_size=12, grid=(3, 5),
                         image_tokenizer_fingerprint="", grid_tokens=True)
    g = SpanGrammar.of(layout)
    assert g == GRIDDED and SpanGrammar.of(g) is g
    assert g.row_end == layout.image_end and g.grid_ids.stop == layout.vocab_size
    assert list(g.rows_ids) == list(range(28, 31)) and list(g.cols_ids) == list(range(31, 36))
    assert g.interior == range(layout.image_start, layout.vocab_size)
    assert FIXED.row_end is None and not FIXED.rows_ids and not FIXED.cols_ids and FIXED.interior == FIXED.code_ids
    assert FIXED.span_length() == FIXED.max_span == 2 * 3 + 2
    assert GRIDDED.span_length((2, 4)) == 2 * 5 + 4 and GRIDDED.max_span == 3 * 6 + 4
    assert FIXED.grids() == [(2, 3)] and len(GRIDDED.grids()) == 15


def test_words():
    assert FIXED.words() == "<boi> 6 codes <eoi>"
    assert GRIDDED.words() == "<boi> <rows_3> <cols_5> 3x5 codes with 3 <row_end> <eoi>"


# ---------------------------------------------------------------- build -> parse


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 3), w=st.integers(1, 5), seed=st.integers(0, 10_000), before=st.integers(0, 3),
       after=st.integers(0, 3))
def test_gridded_spans_round_trip(h, w, seed, before, after):
    g = GRIDDED
    ids = code_ids(g, h, w, seed)
    span = g.build((h, w), ids)
    assert len(span) == g.span_length((h, w))
    seq = TEXT[:before] + span + TEXT[:after]
    (got,) = g.parse(seq)
    assert (got.start, got.end, got.grid) == (before, before + len(span), (h, w))
    assert [c + g.image_start for c in got.codes] == ids
    assert g.read(seq, before) == got


@pytest.mark.parametrize("grid", [(2, 3), (3, 3), (1, 5), (3, 1)])
def test_row_ends_stand_after_each_row(grid):
    h, w = grid
    ids = code_ids(GRIDDED, h, w, seed=h * 10 + w)
    span = GRIDDED.build(grid, ids)
    assert span[:3] == [GRIDDED.boi, *GRIDDED.size_ids(grid)] and span[-1] == GRIDDED.eoi
    rows = span[3:-1]
    assert [rows[k * (w + 1) + w] for k in range(h)] == [GRIDDED.row_end] * h
    assert [t for t in rows if t != GRIDDED.row_end] == ids


def test_fixed_spans_round_trip_and_several_spans_parse_in_order():
    a, b = code_ids(FIXED, 2, 3, 1), code_ids(FIXED, 2, 3, 2)
    seq = [0, *TEXT[:2], *FIXED.build((2, 3), a), TEXT[3], *FIXED.build((2, 3), b), 1]
    spans = FIXED.parse(seq)
    assert [s.grid for s in spans] == [(2, 3), (2, 3)]
    assert [[c + FIXED.image_start for c in s.codes] for s in spans] == [a, b]
    assert spans[0].end == 3 + 8 and spans[1].start == spans[0].end + 1
    assert FIXED.build((2, 3), a) == [FIXED.boi, *a, FIXED.eoi]


def test_build_refuses_what_a_span_cannot_hold():
    with pytest.raises(ValueError, match="shape"):
        FIXED.build((3, 2), code_ids(FIXED, 3, 2, 0))
    with pytest.raises(ValueError, match="rows"):
        GRIDDED.build((4, 1), code_ids(GRIDDED, 4, 1, 0))
    with pytest.raises(ValueError, match="codes"):
        GRIDDED.build((2, 2), code_ids(GRIDDED, 2, 1, 0))
    with pytest.raises(ValueError, match="code ids"):
        GRIDDED.build((1, 2), [TEXT[0], GRIDDED.image_start])


# ---------------------------------------------------------------- malformed spans


def test_malformed_spans_raise_where_they_break():
    g = GRIDDED
    c, re_, r2, c2 = g.image_start, g.row_end, g.rows_ids[1], g.cols_ids[1]
    cases = {  # ids -> position of the id that breaks the span opened at 0
        "no_size": ([g.boi, c, c, re_, g.eoi], 1),
        "cols_first": ([g.boi, c2, r2, c, g.eoi], 1),
        "no_cols": ([g.boi, r2, c, c], 2),
        "short_row": ([g.boi, r2, c2, c, re_, c, c, re_, g.eoi], 4),
        "long_row": ([g.boi, r2, c2, c, c, c, re_, g.eoi], 5),
        "missing_row": ([g.boi, r2, c2, c, c, re_, g.eoi], 6),
        "text_inside": ([g.boi, r2, c2, c, TEXT[0]], 4),
        "cut_off": ([g.boi, r2, c2, c, c, re_, c], 7),
        "no_eoi": ([g.boi, r2, c2, c, c, re_, c, c, re_, 1], 9),
    }
    for name, (ids, at) in cases.items():
        with pytest.raises(SpanError) as e:
            g.read(ids, 0)
        assert (e.value.start, e.value.at) == (0, at), name
        assert str(e.value).startswith("image span opened at 0 wants"), name
        with pytest.raises(SpanError):
            g.parse(ids)
        assert g.parse(ids, strict=False) == [], name
    with pytest.raises(SpanError, match="image code 3 of 6"):
        FIXED.read([FIXED.boi, 15, 15, FIXED.eoi], 0)


def test_ids_of_a_span_outside_one():
    g = GRIDDED
    for t, why in ((g.eoi, "<eoi> without"), (g.image_start, "image id"), (g.row_end, "grid token"),
                   (g.cols_ids[0], "grid token")):
        with pytest.raises(SpanError, match=why) as e:
            g.parse([0, TEXT[0], t])
        assert e.value.at == 2 and e.value.start is None
    assert g.stray(TEXT[0]) is None and g.stray(g.boi) is None


def test_lenient_parse_reads_on_after_a_broken_span():
    g = GRIDDED
    good = g.build((1, 2), code_ids(g, 1, 2, 5))
    seq = [g.boi, g.rows_ids[0], g.cols_ids[0], g.image_start, *good]  # cut short by the next <boi>
    (span,) = g.parse(seq, strict=False)
    assert span.start == 4 and span.grid == (1, 2)


# ---------------------------------------------------------------- token by token


@pytest.mark.parametrize("grammar,grid", [(FIXED, (2, 3)), (GRIDDED, (2, 4)), (GRIDDED, (3, 3)), (GRIDDED, (1, 1))])
def test_cursor_follows_a_span_and_allows_exactly_its_tokens(grammar, grid):
    g, (h, w) = grammar, grid
    span = g.build(grid, code_ids(g, h, w, seed=7))
    cur = g.advance(OUTSIDE, span[0])
    kinds, codes_left = [], []
    for t in span[1:]:
        kind = g.expects(cur)
        kinds.append(kind)
        codes_left.append(g.codes_left(cur))
        allowed = g.next_ids(cur, [grid])
        assert t in allowed
        if kind != CODE:
            assert list(allowed) == [t]  # a grid token, row end or end-image is forced
        cur = g.advance(cur, t)
    assert cur == OUTSIDE and g.expects(cur) is None
    if g.grid_tokens:
        assert kinds[:2] == [ROWS, COLS]
        kinds, codes_left = kinds[2:], codes_left[2:]
        assert kinds == ([CODE] * w + [ROW_END]) * h + [EOI]
    else:
        assert kinds == [CODE] * (h * w) + [EOI]
    assert kinds.count(CODE) == h * w
    assert [n for n, k in zip(codes_left, kinds) if k == CODE] == list(range(h * w, 0, -1))
    assert codes_left[-1] == 0


def test_cursor_before_the_grid_and_with_restricted_grids():
    g = GRIDDED
    cur = g.advance(OUTSIDE, g.boi)
    assert g.expects(cur) == ROWS and g.codes_left(cur) is None
    assert list(g.next_ids(cur)) == list(g.rows_ids)
    assert g.next_ids(cur, [(1, 4), (3, 1), (3, 2)]) == [g.rows_ids[0], g.rows_ids[2]]
    cur = g.advance(cur, g.rows_ids[2])
    assert g.expects(cur) == COLS and g.next_ids(cur, [(1, 4), (3, 1), (3, 2)]) == [g.cols_ids[0], g.cols_ids[1]]
    cur = g.advance(cur, g.cols_ids[1])
    assert (cur.rows, cur.cols, g.codes_left(cur)) == (3, 2, 6)
    with pytest.raises(ValueError, match="no image span"):
        g.next_ids(OUTSIDE)


def test_cursor_opens_and_closes_wherever_boi_and_eoi_come():
    g = GRIDDED
    cur = walk(g, [g.boi, g.rows_ids[1], g.cols_ids[1], g.image_start])
    assert cur == SpanCursor(open=True, codes=1, rows=2, cols=2)
    assert g.advance(cur, g.boi) == SpanCursor(open=True)  # a new span starts afresh
    assert g.advance(cur, g.eoi) == OUTSIDE
    assert g.advance(cur, TEXT[0]) == cur  # not the grammar's: the sampler's rules keep it out
    assert walk(g, [g.image_start, g.row_end, TEXT[0]]) == OUTSIDE  # nothing counts outside a span


def test_fixed_cursor_forces_eoi_after_h_times_w_codes():
    g = FIXED
    cur = walk(g, [g.boi, *code_ids(g, 2, 3, 0)])
    assert g.expects(cur) == EOI and g.next_ids(cur) == [g.eoi] and g.codes_left(cur) == 0
