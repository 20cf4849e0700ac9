"""Decoding rules with grid tokens: every drawn image states a grid, has exactly that many rows of exactly that
many codes each ended by a row end, then end-image; ``grids`` restricts the choice (one grid: forced); text
never holds grid tokens; a span is never opened without room for the longest allowed grid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from earlyfusion.sampling.generate import SamplingConfig, generate, sample_tokens
from earlyfusion.sampling.processors import RowState, Rules, SamplerParams, Situation, allowed_grids, rules_for
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_config import VQConfig

FREE = SamplerParams(temperature=1.0)


@pytest.fixture(autouse=True)
def _eager_steps(monkeypatch):
    from earlyfusion.model.decode_plan import PIN_ENV

    monkeypatch.setenv(PIN_ENV, "eager")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(["a wide picture: a red circle.", "a tall picture: a blue square."] * 10, codebook_size=6,
                            grid=(3, 4), image_tokenizer_fingerprint="d" * 64, text_vocab_size=260, grid_tokens=True)


class FakeDecoder(nn.Module):
    """Deterministic logits from (previous token, position), biased towards image and grid ids."""

    def __init__(self, V: int, context: int = 96, seed: int = 0, bias_ids=()):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(V, V, generator=g) * 2)
        self.pos = nn.Parameter(torch.randn(context, V, generator=g))
        self.tok.data[:, list(bias_ids)] += 3.0
        self.config = SimpleNamespace(max_seq_len=context, dim=8)

    def new_cache(self, batch_size, max_len=None):
        return SimpleNamespace(length=0, max_len=max_len, batch=batch_size)

    def forward(self, tokens, *, positions=None, doc_ids=None, valid=None, cache=None):
        cache.length += tokens.shape[1]
        return self.tok[tokens] + self.pos[positions]


def _decoder(vocab, seed=0, context=96):
    return FakeDecoder(vocab.vocab_size, context, seed, [vocab.boi, *vocab.image_range])


def _images(vocab, ids):
    """The grids of a generated continuation (strict: any malformed span fails the test)."""
    return [s for s in vocab.decode_document(ids) if isinstance(s, torch.Tensor)]


def _run(vocab, dec, prompts, modality="image", max_new=None, seed=0, **kw):
    max_new = max_new or vocab.max_span
    return sample_tokens(dec, vocab, prompts, modality=modality, max_new_tokens=max_new, text=FREE, image=FREE,
                         generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("seed", range(4))
def test_image_mode_draws_well_formed_grids_of_any_size(vocab, seed):
    out, reasons = _run(vocab, _decoder(vocab, seed), [[vocab.bos]] * 6, seed=seed)
    shapes = set()
    for ids in out:
        grids = _images(vocab, ids)
        assert len(grids) == 1 and ids[0] == vocab.boi and ids[-1] == vocab.eoi
        assert len(ids) == vocab.span_length(tuple(grids[0].shape))
        shapes.add(tuple(grids[0].shape))
    assert reasons == ["image"] * 6
    assert all(1 <= h <= 3 and 1 <= w <= 4 for h, w in shapes)


def test_one_grid_is_forced_and_a_set_is_respected(vocab):
    dec = _decoder(vocab, 1)
    out, _ = _run(vocab, dec, [[vocab.bos]] * 5, grids=[(2, 3)])
    assert all(tuple(_images(vocab, ids)[0].shape) == (2, 3) for ids in out)
    allowed = {(1, 4), (3, 1)}
    seen = set()
    for seed in range(6):
        out, _ = _run(vocab, _decoder(vocab, seed), [[vocab.bos]] * 4, seed=seed, grids=sorted(allowed))
        seen |= {tuple(_images(vocab, ids)[0].shape) for ids in out}
    assert seen <= allowed and len(seen) == 2


def test_auto_mode_spans_complete_and_text_mode_has_no_grid_tokens(vocab):
    grid_ids = {vocab.row_end, *vocab.rows_ids, *vocab.cols_ids}
    for seed in range(4):
        out, _ = _run(vocab, _decoder(vocab, seed, context=48), [[vocab.bos, *vocab.encode_text("a wide")]],
                      modality="auto", max_new=40, seed=seed)
        vocab.decode_document(out[0])  # strict: no malformed span, none cut off
        text, _ = _run(vocab, _decoder(vocab, seed), [[vocab.bos]], modality="text", max_new=30, seed=seed)
        assert not grid_ids & set(text[0]) and vocab.boi not in text[0]


def test_no_span_opens_without_room_for_the_longest_allowed_grid(vocab):
    # 3 free tokens after the prompt: even a 1x1 image (1·2 + 4 = 6 tokens) does not fit
    prompt = [vocab.bos] + vocab.encode_text("a") * 5
    out, _ = _run(vocab, _decoder(vocab, 2, context=len(prompt) + 3), [prompt], modality="auto", max_new=3)
    assert vocab.boi not in out[0]
    with pytest.raises(ValueError, match="within 3x4"):
        allowed_grids(vocab, [(4, 4)])


def test_prompt_ending_inside_a_span_is_continued(vocab):
    code = vocab.image_start
    prompt = [vocab.bos, vocab.boi, vocab.rows_ids[1], vocab.cols_ids[1], code, code, vocab.row_end, code]
    state = RowState.from_prompts([prompt], vocab, 10, 96)
    assert state.situation(0, vocab).rows == 2 and state.situation(0, vocab).done_rows == 1
    out, _ = _run(vocab, _decoder(vocab, 3), [prompt], modality="image", max_new=3)
    assert out[0] == [out[0][0], vocab.row_end, vocab.eoi] and out[0][0] in vocab.image_range


def test_generate_with_guidance_and_stream(vocab):
    pieces = []
    cfg = SamplingConfig(modality="image", num_samples=3, cfg=2.0, seed=5)
    samples = generate(_decoder(vocab, 4), vocab, ["a tall picture"], cfg, grids=[(3, 2)],
                       stream=lambda i, p: pieces.append(p))
    assert [tuple(s.segments[0].shape) for s in samples] == [(3, 2)] * 3
    assert pieces.count("[image 1]") == 3


def test_rule_masks_are_shared_across_code_positions(vocab):
    """A 32x32-code image must not grow one mask row per code position (1024 rows of the vocabulary)."""
    big = SimpleNamespace(bos=0, eos=1, pad=2, boi=3, eoi=4, image_start=10, codebook_size=50, tokens_per_image=1024,
                          grid=(32, 32))
    rules = Rules(rules_for("image", big), 60)
    rows = [Situation(True, c, False, 1026) for c in range(1025)] + [Situation(False, 0, True, 1026)]
    for r in rows:
        rules.apply(torch.zeros(1, 60), [r])
    assert rules._table.shape[0] == 3  # codes, forced end-image, forced begin-image
    gridded = Rules(rules_for("image", vocab), vocab.vocab_size)
    state = RowState.from_prompts([[vocab.bos]], vocab, vocab.max_span, 96)
    for t in vocab.image_span(torch.zeros(3, 4, dtype=torch.long)):
        gridded.apply(torch.zeros(1, vocab.vocab_size), state.situations(vocab))
        state.update([t], vocab)
    assert gridded._table.shape[0] <= 6  # begin, rows, columns for 3 rows, codes, row end, end-image


def _run_like(vocab, grids=None):
    config = {} if grids is None else {"image_grids": [list(g) for g in grids]}
    return SimpleNamespace(vocab=vocab, vq=SimpleNamespace(cfg=VQConfig(downsample=8)), config=config,
                           path=Path("run"))


def test_size_option_maps_to_a_trained_grid(vocab):
    from earlyfusion.core.errors import UserError
    from earlyfusion.sampling.cli import drawing_grids, parse_size

    assert parse_size("48x32", "--size") == (48, 32) and parse_size("32X48", "--size") == (32, 48)
    for bad in ("48", "48x", "x32", "0x32", "4.5x3", "48x32x2", "-8x8"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(bad, "--size")
    run = _run_like(vocab, [(3, 4), (2, 4)])  # grid up to 3x4, 8 px per code
    assert drawing_grids(run, "") == [(2, 4), (3, 4)]
    assert drawing_grids(run, "32x24") == [(3, 4)] and drawing_grids(run, "64x32") == [(2, 4)]
    with pytest.raises(UserError, match="not trained on; it was trained on 32x16, 32x24"):
        drawing_grids(run, "32x32")
    with pytest.raises(UserError, match="extreme aspect"):
        drawing_grids(run, "400x8")
    assert drawing_grids(_run_like(vocab), "") is None  # no record: any grid the vocabulary holds
    assert drawing_grids(_run_like(vocab), "8x24") == [(3, 1)]


def test_size_option_on_a_fixed_grid_vocabulary():
    from earlyfusion.core.errors import UserError
    from earlyfusion.sampling.cli import drawing_grids

    fixed = Vocabulary.build(["a"] * 5, codebook_size=6, grid=(4, 4), image_tokenizer_fingerprint="d" * 64,
                             text_vocab_size=260)
    assert drawing_grids(_run_like(fixed), "") is None and drawing_grids(_run_like(fixed), "32x32") is None
    with pytest.raises(UserError, match="no grid tokens"):
        drawing_grids(_run_like(fixed), "48x32")
