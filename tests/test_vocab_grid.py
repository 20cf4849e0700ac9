"""Grid tokens: image spans that state their grid and break their rows, so images keep their aspect ratio.
Round trips for every grid up to the largest, the span's exact layout, malformed spans, save/load, and
that a fixed-grid vocabulary is unchanged (no grid tokens, layout.json without the key)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyfusion.core.checkpoint import CheckpointError, write_manifest
from earlyfusion.tokenizer.vocab_layout import LAYOUT_FILE, TOKENIZER_FILE, VocabLayout
from earlyfusion.tokenizer.vocab import Vocabulary

CORPUS = ["a red circle at the top left.", "a wide blue square.", "<rows_3> <row_end> spelled in text"] * 20
FP = "e" * 64


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(CORPUS, codebook_size=40, grid=(3, 5), image_tokenizer_fingerprint=FP,
                            text_vocab_size=300, grid_tokens=True)


def test_grid_tokens_follow_the_image_range(vocab):
    L = vocab.layout
    assert vocab.grid_tokens and L.grid_token_count == 1 + 3 + 5
    assert vocab.row_end == L.image_end
    assert vocab.rows_ids == list(range(L.image_end + 1, L.image_end + 4))
    assert vocab.cols_ids == list(range(L.image_end + 4, L.image_end + 9))
    assert vocab.vocab_size == L.image_end + 9 == vocab.tokenizer.get_vocab_size()
    assert vocab.tokenizer.id_to_token(vocab.row_end) == "<row_end>"
    assert vocab.tokenizer.id_to_token(vocab.rows_ids[2]) == "<rows_3>"
    assert vocab.tokenizer.id_to_token(vocab.cols_ids[0]) == "<cols_1>"
    assert VocabLayout.from_dict(json.loads(json.dumps(L.to_dict()))) == L


def test_span_states_grid_and_breaks_rows(vocab):
    g = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    span = vocab.image_span(g)
    ids = [vocab.image_start + c for c in range(8)]
    assert span == [vocab.boi, vocab.rows_ids[1], vocab.cols_ids[3], *ids[:4], vocab.row_end, *ids[4:],
                    vocab.row_end, vocab.eoi]
    assert len(span) == vocab.span_length((2, 4)) == 2 * 5 + 4
    assert vocab.max_span == vocab.span_length((3, 5)) == 3 * 6 + 4


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 3), w=st.integers(1, 5), seed=st.integers(0, 10_000), text=st.text(max_size=20))
def test_every_grid_round_trips(vocab, h, w, seed, text):
    g = torch.from_numpy(np.random.default_rng(seed).integers(0, 40, (h, w)))
    ids = vocab.encode_document([text, g, text])
    back = vocab.decode_document(ids)
    grids = [s for s in back if isinstance(s, torch.Tensor)]
    assert len(grids) == 1 and grids[0].shape == (h, w) and torch.equal(grids[0], g.long())
    assert "".join(s for s in back if isinstance(s, str)) == text + text


def test_text_spelling_grid_tokens_stays_text(vocab):
    ids = vocab.encode_text("<rows_3><cols_1><row_end>")
    assert all(i in vocab.text_range for i in ids)
    assert vocab.decode_text(ids) == "<rows_3><cols_1><row_end>"


def test_grids_outside_the_largest_are_refused(vocab):
    for shape in [(4, 5), (3, 6), (0, 2)]:
        with pytest.raises(ValueError, match="rows"):
            vocab.image_span(np.zeros(shape, np.int64))
    with pytest.raises(ValueError, match="2-d"):
        vocab.image_span(np.zeros(6, np.int64))
    assert vocab.check_grid((1, 5)) == (1, 5)


def test_malformed_grid_spans(vocab):
    code = vocab.image_start
    B, E, bo, eo, re_ = vocab.bos, vocab.eos, vocab.boi, vocab.eoi, vocab.row_end
    r2, c2 = vocab.rows_ids[1], vocab.cols_ids[1]
    text = vocab.encode_text("ok")
    cases = {
        "no_size": [B, *text, bo, code, code, re_, eo],
        "cols_first": [B, *text, bo, c2, r2, code, eo],
        "short_row": [B, *text, bo, r2, c2, code, re_, code, code, re_, eo],
        "long_row": [B, *text, bo, r2, c2, code, code, code, re_, eo],
        "missing_row": [B, *text, bo, r2, c2, code, code, re_, eo],
        "no_eoi": [B, *text, bo, r2, c2, code, code, re_, code, code, re_, E],
        "stray_row_end": [B, *text, re_],
        "stray_size": [B, *text, r2],
    }
    for name, ids in cases.items():
        with pytest.raises(ValueError, match="malformed"):
            vocab.decode_document(ids)
        got = vocab.decode_document(ids, strict=False)
        assert got and got[0].startswith("ok") and not any(isinstance(s, torch.Tensor) for s in got), (name, got)
    good = [B, bo, r2, c2, code, code + 1, re_, code + 2, code + 3, re_, eo, E]
    assert torch.equal(vocab.decode_document(good)[0], torch.tensor([[0, 1], [2, 3]]))


def test_save_load_and_disagreement(vocab, tmp_path):
    vocab.save(tmp_path / "v")
    back = Vocabulary.load(tmp_path / "v")
    assert back.layout == vocab.layout and back.rows_ids == vocab.rows_ids
    # a layout.json that forgot the grid tokens no longer matches the tokenizer.json
    d = json.loads((tmp_path / "v" / LAYOUT_FILE).read_text())
    del d["grid_tokens"]
    d["vocab_size"] = vocab.layout.image_end
    (tmp_path / "v" / LAYOUT_FILE).write_text(json.dumps(d))
    write_manifest(tmp_path / "v")
    with pytest.raises(CheckpointError, match="disagree"):
        Vocabulary.load(tmp_path / "v")
    assert (tmp_path / "v" / TOKENIZER_FILE).is_file()


def test_fixed_grid_vocabulary_is_unchanged():
    v = Vocabulary.build(CORPUS, codebook_size=40, grid=(3, 5), image_tokenizer_fingerprint=FP, text_vocab_size=300)
    assert not v.grid_tokens and v.row_end is None and v.rows_ids == [] == v.cols_ids
    assert v.vocab_size == v.layout.image_end
    assert "grid_tokens" not in v.layout.to_dict()
    assert v.span_length() == v.max_span == 15 + 2
    with pytest.raises(ValueError, match="shape"):
        v.image_span(np.zeros((2, 5), np.int64))
