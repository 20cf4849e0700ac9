"""Decoding rules, the sampling loop, CFG and KV-cache parity (sampling/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from earlyfusion.sampling.generate import sample_tokens
from earlyfusion.tokenizer.image_span import SpanGrammar
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.sampling.processors import (BanIds, ImageFits, ImageOnly, ImageSpan, Rules, RowState, SamplerParams,
                                 Situation, TextOnly, allowed_ids, rules_for, sample_next)

# A small id layout: 5 specials, 15 text ids, 8 image codes, 2x2 images.
L = SimpleNamespace(bos=0, eos=1, pad=2, boi=3, eoi=4, image_start=20, codebook_size=8, tokens_per_image=4, grid=(2, 2))
V = 28
IMAGE = range(L.image_start, L.image_start + L.codebook_size)
GREEDY = SamplerParams(temperature=0.0)
FREE = SamplerParams(temperature=1.0)


@pytest.fixture(autouse=True)
def _eager_steps(monkeypatch):
    """Sampling here runs eager steps on every thread unless a test pins or times another plan: no timing steps
    mix into the calls the fake decoders record."""
    from earlyfusion.model.decode_plan import PIN_ENV

    monkeypatch.setenv(PIN_ENV, "eager")


def _row(in_image=False, codes=0, first=False, room=100):
    return Situation(in_image, min(codes, L.tokens_per_image), first, min(room, L.tokens_per_image + 2))


def _allowed_set(rules, row):
    return set(allowed_ids(rules, row, V).nonzero()[:, 0].tolist())


def _allowed(logits):
    return [set(torch.isfinite(row).nonzero()[:, 0].tolist()) for row in logits]


# ---------------------------------------------------------------- rules


def test_image_span_allows_only_codes_then_forces_end_image():
    span = [ImageSpan(L)]
    assert _allowed_set(span, _row(True, 2)) == set(IMAGE)
    assert _allowed_set(span, _row(True, 4)) == {L.eoi}
    outside = _allowed_set(span, _row(False))
    assert not outside & (set(IMAGE) | {L.eoi}) and L.boi in outside


def test_image_fits_bans_begin_image_without_room():
    need = L.tokens_per_image + 2
    # remaining = min(context - length, max_new - step)
    st = RowState(in_image=[False] * 3, codes=[0] * 3, length=[64 - need, 64 - need + 1, 10], finished=[False] * 3,
                  step=0, max_new_tokens=100, context=64)
    allowed = [_allowed_set([ImageFits(L)], st.situation(i, L)) for i in range(3)]
    assert L.boi in allowed[0] and L.boi not in allowed[1] and L.boi in allowed[2]
    st = RowState(in_image=[False], codes=[0], length=[10], finished=[False], step=100 - need + 1,
                  max_new_tokens=100, context=64)
    assert L.boi not in _allowed_set([ImageFits(L)], st.situation(0, L))


def test_text_only_and_image_only():
    assert not _allowed_set([TextOnly(L)], _row(first=True)) & (set(IMAGE) | {L.boi, L.eoi})
    assert _allowed_set([ImageOnly(L)], _row(first=True)) == {L.boi}
    assert len(_allowed_set([ImageOnly(L)], _row(first=False))) == V


def test_row_state_tracks_spans_and_lengths():
    st = RowState.from_prompts([[L.bos, 5], [L.bos, L.boi, 21]], L, max_new_tokens=10, context=64)
    assert st.in_image == [False, True] and st.codes == [0, 1] and st.length == [2, 3]
    st.update([L.boi, 22], L)
    st.finished[0] = True
    st.update([20, 23], L)  # row 0 finished: unchanged
    assert st.in_image == [True, True] and st.codes == [0, 3] and st.length == [3, 5] and st.step == 2
    st.update([L.pad, L.eoi], L)
    assert st.in_image[1] is False and st.codes[1] == 0 and st.remaining(1) == 7


def test_forced_token_survives_minus_inf_logit():
    logits = torch.zeros(1, V)
    logits[0, L.eoi] = float("-inf")
    out = Rules([ImageSpan(L)], V).apply(logits, [_row(True, 4)])
    for t in (0.3, 1.0, 0.0):
        p = SamplerParams(temperature=t, top_k=3, top_p=0.5)
        assert sample_next(out, [False], p, p, torch.Generator().manual_seed(0)).item() == L.eoi


@pytest.mark.parametrize("modality", ["text", "image", "auto"])
def test_cached_masks_equal_the_rules_applied_row_by_row(modality):
    """Rules.apply (one cached mask per situation) allows exactly what the rules allow, row by row,
    in batches that mix situations, including forced rows whose model logit is -inf."""
    rules = rules_for(modality, L)
    cached = Rules(rules, V)
    g = torch.Generator().manual_seed(0)
    every = [_row(i, c, f, r) for i in (False, True) for c in (0, 2, 4) for f in (False, True) for r in (0, 5, 6, 9)
             if i or c == 0]
    for _ in range(30):
        rows = [every[int(j)] for j in torch.randint(len(every), (5,), generator=g)]
        rows = [r for r in rows if _allowed_set(rules, r)]  # contradictory situations never occur in the loop
        if not rows:
            continue
        logits = torch.randn(len(rows), V, generator=g)
        logits[:, L.eoi] = float("-inf")
        got = _allowed(cached.apply(logits, rows))
        for r, a in zip(rows, got):
            want = _allowed_set(rules, r)
            assert a == (want if len(want) == 1 else want - {L.eoi}), r
    assert cached.apply(torch.zeros(3, V), [every[0]] * 3).shape == (3, V)  # one situation: the mask broadcasts


def test_contradictory_rules_raise():
    with pytest.raises(RuntimeError, match="contradict"):
        Rules([BanIds(range(V))], V).apply(torch.zeros(1, V), [_row()])


# ---------------------------------------------------------------- sampler


def test_sampler_greedy_topk_topp():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)
    best = logits.argmax(-1)
    no = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(sample_next(logits, no, GREEDY, FREE, g), best)
    assert torch.equal(sample_next(logits, no, SamplerParams(1.0, top_k=1), FREE, g), best)
    assert torch.equal(sample_next(logits, no, SamplerParams(1.0, top_p=1e-6), FREE, g), best)
    # top-k 3: every draw is among the 3 best
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(50):
        t = sample_next(logits, no, SamplerParams(5.0, top_k=3), FREE, g)
        assert (top3 == t[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.full((64, V), float("-inf"))
    logits[:, 6:10] = probs.log()
    g = torch.Generator().manual_seed(3)
    no = torch.zeros(64, dtype=torch.bool)
    for top_p, kept in ((0.5, {6}), (0.79, {6, 7}), (0.81, {6, 7, 8}), (1.0, {6, 7, 8, 9})):
        seen = set()
        for _ in range(10):
            seen |= set(sample_next(logits, no, SamplerParams(1.0, top_p=top_p), FREE, g).tolist())
        assert seen == kept, top_p


def test_sampler_uses_image_settings_on_image_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, V, generator=g)
    rows = torch.tensor([False, True])
    draws = torch.stack([sample_next(logits, rows, GREEDY, SamplerParams(10.0), g) for _ in range(40)])
    assert (draws[:, 0] == logits[0].argmax()).all()  # text row: greedy
    assert len(set(draws[:, 1].tolist())) > 1  # image row: hot sampling


def test_sampler_never_draws_masked_ids():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, V, generator=g) * 5
    logits[:, :10] = float("-inf")
    for _ in range(30):
        assert (sample_next(logits, torch.zeros(8, dtype=torch.bool), SamplerParams(3.0, 0, 1.0), FREE, g) >= 10).all()


def test_sampler_rejects_bad_settings():
    for kw in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplerParams(**kw)


# ---------------------------------------------------------------- the loop, on a fake decoder


class FakeDecoder(nn.Module):
    """Deterministic logits from (previous token, position); follows the Decoder/KVCache contract and records calls."""

    def __init__(self, context=64, seed=0, image_bias=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(torch.randn(V, V, generator=g) * 2)
        self.pos = nn.Parameter(torch.randn(context, V, generator=g))
        self.tok.data[:, L.image_start:L.image_start + L.codebook_size] += image_bias
        self.tok.data[:, L.boi] += image_bias
        self.config = SimpleNamespace(max_seq_len=context, dim=8)
        self.calls: list[tuple[int, int]] = []
        self.fed: list[torch.Tensor] = []

    def new_cache(self, batch_size, max_len=None):
        return SimpleNamespace(length=0, max_len=max_len, batch=batch_size)

    def forward(self, tokens, *, positions=None, doc_ids=None, valid=None, cache=None):
        B, T = tokens.shape
        self.calls.append((B, T))
        self.fed.append(tokens.clone())
        assert cache is not None and cache.batch == B and cache.length + T <= cache.max_len
        assert positions is not None and int(positions.max()) < self.config.max_seq_len
        cache.length += T
        return self.tok[tokens] + self.pos[positions]  # (B, T, V)


def _spans_ok(ids, allow_unfinished=False):
    """Every begin-image is followed by exactly tokens_per_image codes and an end-image; no stray codes."""
    i = 0
    while i < len(ids):
        t = ids[i]
        if t == L.boi:
            body = ids[i + 1:i + 1 + L.tokens_per_image]
            assert all(b in IMAGE for b in body), ids
            if len(body) < L.tokens_per_image or i + 1 + L.tokens_per_image >= len(ids):
                assert allow_unfinished, ids
                return
            assert ids[i + 1 + L.tokens_per_image] == L.eoi, ids
            i += L.tokens_per_image + 2
        else:
            assert t not in IMAGE and t != L.eoi, ids
            i += 1


def _run(dec, prompts, modality="auto", max_new=40, seed=0, text=FREE, image=FREE, **kw):
    return sample_tokens(dec, L, prompts, modality=modality, max_new_tokens=max_new, text=text, image=image,
                         generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("seed", range(6))
def test_auto_mode_images_are_complete_and_never_cut_off(seed):
    dec = FakeDecoder(context=40, seed=seed, image_bias=3.0)  # opens images eagerly
    prompts = [[L.bos, 5, 6], [L.bos, 7], [L.bos] + [8] * 20]
    out, reasons = _run(dec, prompts, max_new=30, seed=seed)
    for p, ids, r in zip(prompts, out, reasons):
        _spans_ok(ids)
        assert len(p) + len(ids) <= 40 and len(ids) <= 30
        assert r in ("eos", "length") and (r != "eos" or ids[-1] == L.eos)
        assert L.pad not in ids and L.bos not in ids
    assert any(L.boi in ids for ids in out)


def test_text_mode_never_emits_image_ids():
    dec = FakeDecoder(seed=3, image_bias=5.0)
    out, _ = _run(dec, [[L.bos, 5]] * 4, modality="text", max_new=30)
    assert all(t not in IMAGE and t not in (L.boi, L.eoi) for ids in out for t in ids)


def test_image_mode_exactly_one_complete_image():
    dec = FakeDecoder(seed=4)
    out, reasons = _run(dec, [[L.bos, 5, 6], [L.bos]], modality="image", max_new=50)
    for ids in out:
        assert ids[0] == L.boi and ids[-1] == L.eoi and len(ids) == L.tokens_per_image + 2
        _spans_ok(ids)
    assert reasons == ["image", "image"]


def test_one_prefill_then_one_token_per_step():
    dec = FakeDecoder(seed=5)
    out, _ = _run(dec, [[L.bos, 5, 6], [L.bos]], modality="text", max_new=10)
    assert dec.calls[0] == (2, 3)
    assert all(c == (2, 1) for c in dec.calls[1:])
    assert len(dec.calls) == max(len(o) for o in out)  # the last token is never fed


def test_seed_reproducibility():
    dec = FakeDecoder(seed=6, image_bias=2.0)
    a = _run(dec, [[L.bos, 5]] * 3, seed=11)
    b = _run(dec, [[L.bos, 5]] * 3, seed=11)
    c = _run(dec, [[L.bos, 5]] * 3, seed=12)
    assert a == b and a != c


def test_cfg_uses_2n_rows_and_shares_tokens():
    dec = FakeDecoder(seed=7)
    prompts = [[L.bos, 5, 6, 7]] * 3
    out, _ = _run(dec, prompts, modality="image", guidance=4.0, uncond=[[L.bos]] * 3)
    assert all(b == 6 for b, _ in dec.calls)  # 2N rows in every forward
    for fed in dec.fed[1:]:
        assert torch.equal(fed[:3], fed[3:])  # each pair got the same token
    for ids in out:
        _spans_ok(ids)


def test_cfg_scale_one_equals_unguided():
    dec = FakeDecoder(seed=8)
    prompts = [[L.bos, 5, 6, 7], [L.bos, 9]]
    guided = _run(dec, prompts, modality="auto", guidance=1.0, uncond=[[L.bos]] * 2, seed=3)
    plain = _run(dec, prompts, modality="auto", seed=3)
    assert guided == plain


def test_cfg_changes_images():
    dec = FakeDecoder(seed=9)
    prompts = [[L.bos, 5, 6, 7]] * 4
    plain, _ = _run(dec, prompts, modality="image", seed=3)
    guided, _ = _run(dec, prompts, modality="image", guidance=5.0, uncond=[[L.bos]] * 4, seed=3)
    assert plain != guided


# ---------------------------------------------------------------- generate(), on a fake vocabulary


class FakeVocab(SimpleNamespace):
    """Characters map onto the 15 text ids; enough of the Vocabulary contract for generate()."""

    decode_document = Vocabulary.decode_document  # the real rules for reading generated ids back

    def __init__(self):
        layout = SimpleNamespace(**vars(L), vocab_size=V, text_start=5, text_end=L.image_start,
                                 image_end=L.image_start + L.codebook_size, grid_tokens=False,
                                 special_ids={"bos": L.bos, "eos": L.eos, "pad": L.pad, "boi": L.boi, "eoi": L.eoi})
        super().__init__(**vars(L), vocab_size=V, layout=layout, grammar=SpanGrammar.of(L))

    def encode_document(self, segments, bos=True, eos=True):
        ids = [self.bos] if bos else []
        for s in segments:
            if isinstance(s, str):
                ids += [5 + ord(c) % 15 for c in s]
            else:
                ids += [self.boi] + [self.image_start + int(c) for c in s.flatten()] + [self.eoi]
        return ids + ([self.eos] if eos else [])

    def decode_text(self, ids):
        return "".join(chr(ord("a") + i - 5) for i in ids)

    def ids_to_codes(self, ids):
        return [i - self.image_start for i in ids]


def test_generate_cfg_rows_and_results():
    from earlyfusion.sampling.generate import SamplingConfig, generate

    dec = FakeDecoder(seed=10)
    cfg = SamplingConfig(modality="image", num_samples=3, cfg=4.0, seed=1)
    samples = generate(dec, FakeVocab(), ["abc", "de"], cfg)
    assert [s.prompt for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(b == 12 for b, _ in dec.calls)  # 2 prompts x 3 samples x [cond; uncond]
    for s in samples:
        (grid,) = s.segments
        assert grid.shape == L.grid and s.stop == "image" and s.text == "[image 1]"
    dec.calls.clear()
    generate(dec, FakeVocab(), ["abc"], SamplingConfig(modality="image", num_samples=2, cfg=1.0))
    assert all(b == 2 for b, _ in dec.calls)  # scale 1: no unconditional rows at all


def test_generate_streams_the_text_it_returns():
    from earlyfusion.sampling.generate import SamplingConfig, generate

    dec = FakeDecoder(seed=11, image_bias=1.5)
    pieces = []
    (s,) = generate(dec, FakeVocab(), ["ab"], SamplingConfig(modality="auto", max_new_tokens=40, seed=2),
                    stream=lambda i, p: pieces.append(p))
    assert "".join(pieces) == s.text and len(pieces) > 1


def test_generate_errors():
    from earlyfusion.core.errors import UserError
    from earlyfusion.sampling.generate import SamplingConfig, generate

    dec = FakeDecoder(context=16)
    with pytest.raises(UserError, match="context"):
        generate(dec, FakeVocab(), ["x" * 20], SamplingConfig())
    with pytest.raises(UserError, match="context"):
        generate(dec, FakeVocab(), ["x" * 10], SamplingConfig(modality="image"))  # 11 + 6 > 16
    with pytest.raises(UserError, match="max-new-tokens"):
        generate(dec, FakeVocab(), ["x"], SamplingConfig(modality="image", max_new_tokens=5))
    for bad in ({"cfg": 2.0}, {"num_samples": 0}, {"modality": "image", "cfg": -1.0}, {"max_new_tokens": 0},
                {"temperature": -0.5}, {"image_top_p": 0.0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# ---------------------------------------------------------------- the real decoder: KV cache and padding parity


@pytest.fixture(scope="module")
def decoder():
    from earlyfusion.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    return Decoder(DecoderConfig.from_preset("tiny", V, max_seq_len=48)).double().eval()


@torch.no_grad()
def _naive_greedy(dec, prompt, modality, max_new):
    """Recompute the whole sequence every step (no cache), same rules, argmax."""
    ids = list(prompt)
    state = RowState.from_prompts([prompt], L, max_new, dec.config.max_seq_len)
    rules = rules_for(modality, L)
    out = []
    for _ in range(max_new):
        logits = dec(torch.tensor([ids]))[:, -1].float()
        allowed = allowed_ids(rules, state.situation(0, L), logits.shape[-1])
        t = int(logits.masked_fill(~allowed, float("-inf")).argmax(-1))
        out.append(t)
        state.update([t], L)
        ids.append(t)
        if t == L.eos or (modality == "image" and t == L.eoi) or state.remaining(0) <= 0:
            break
    return out


@pytest.mark.parametrize("modality", ["text", "auto", "image"])
def test_kv_cache_equals_full_recompute(decoder, modality):
    prompt = [L.bos, 5, 9, 12, 6]
    (cached,), _ = _run(decoder, [prompt], modality=modality, max_new=20, text=GREEDY, image=GREEDY)
    assert cached == _naive_greedy(decoder, prompt, modality, 20)


def test_left_padded_batch_equals_each_prompt_alone(decoder):
    prompts = [[L.bos, 5, 9, 12, 6, 7, 8, 9], [L.bos], [L.bos, 10, 11]]
    batched, _ = _run(decoder, prompts, modality="auto", max_new=16, text=GREEDY, image=GREEDY)
    for p, b in zip(prompts, batched):
        (alone,), _ = _run(decoder, [p], modality="auto", max_new=16, text=GREEDY, image=GREEDY)
        assert b == alone


def test_cfg_scale_one_equals_unguided_real_decoder(decoder):
    prompts = [[L.bos, 5, 9, 12], [L.bos, 6]]
    plain = _run(decoder, prompts, modality="image", seed=5)
    guided = _run(decoder, prompts, modality="image", seed=5, guidance=1.0, uncond=[[L.bos]] * 2)
    assert plain == guided


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("mode", ["compiled-rowwise", "compiled-library"])
def test_compiled_step_equals_eager(decoder, modality, mode, monkeypatch):
    """--compile (torch.compile of the per-token step, either kind) gives the same greedy tokens, left padding
    included."""
    from torch._dynamo.utils import counters

    from earlyfusion.model import decode_plan as dp
    from earlyfusion.model.compile import RowwiseLinear

    prompts = [[L.bos, 5, 9, 12, 6], [L.bos, 7]]
    eager = _run(decoder, prompts, modality=modality, max_new=12, text=GREEDY, image=GREEDY)
    counters.clear()
    monkeypatch.setenv(dp.PIN_ENV, mode)
    seen = set()  # the decoder's projection classes when its step is compiled
    real_compiled = dp.compiled

    def spy(module, **kw):
        seen.update(type(m) for m in module.modules() if isinstance(m, nn.Linear))
        return real_compiled(module, **kw)

    monkeypatch.setattr(dp, "compiled", spy)
    compiled = _run(decoder, prompts, modality=modality, max_new=12, text=GREEDY, image=GREEDY, compile=True)
    assert compiled == eager
    # one graph per kind of step (padded rows, finished rows), not one per cache length
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert not any("compiled" in k for k in decoder.state_dict())  # the compiled step is not a submodule
    assert seen == ({nn.Linear} if mode.endswith("library") else {RowwiseLinear})  # the plan's projections
    assert all(type(m) is nn.Linear for m in decoder.modules() if isinstance(m, nn.Linear))  # put back afterwards


def test_compile_failure_is_a_clear_error(monkeypatch):
    from earlyfusion.model.decode_plan import PIN_ENV
    from earlyfusion.model.decoder import Decoder, DecoderConfig
    from earlyfusion.core.errors import UserError

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    monkeypatch.delenv(PIN_ENV)  # the plan's timing compiles: the failure surfaces there
    dec = Decoder(DecoderConfig.from_preset("tiny", V, max_seq_len=32)).eval()
    with pytest.raises(UserError, match="--compile failed.*C\\+\\+ compiler"):
        _run(dec, [[L.bos, 5]], modality="text", max_new=4, compile=True)


def _fresh(decoder):
    """The decoder without remembered decode plans (each test times or pins its own)."""
    from earlyfusion.model.decode_plan import forget_plans

    forget_plans(decoder)
    return decoder


def test_decode_plan_keeps_the_fastest_candidate_once(decoder, monkeypatch):
    """The fastest median wins; the choice is remembered per batch size, and compile adds the compiled candidates
    next to eager (so --compile can never be slower than eager beyond the timing's noise)."""
    from earlyfusion.model import decode_plan as dp

    calls = []

    def fake(dec, rows, plans):
        calls.append((rows, [p.mode for p in plans]))
        fast = {1: "eager-1", 3: "eager"}.get(rows, "compiled-library")
        if rows == 5 and len(calls) == 3:  # the pass that compiles: the compiled graphs run slow in it
            return {p.mode: (0.003 if p.mode.startswith("compiled") else 0.002) for p in plans}
        return {p.mode: (0.001 if p.mode == fast else 0.002) for p in plans}

    monkeypatch.setattr(dp, "time_plans", fake)
    monkeypatch.delenv(dp.PIN_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _fresh(decoder)
        assert dp.decode_plan(decoder, 1, compile=False) == dp.DecodePlan("eager-1", 1, {"eager": 2.0, "eager-1": 1.0})
        assert dp.decode_plan(decoder, 1, compile=False).mode == "eager-1" and len(calls) == 1  # remembered
        assert dp.decode_plan(decoder, 3, compile=False).mode == "eager" and len(calls) == 2
        plan = dp.decode_plan(decoder, 5, compile=True)
        assert calls[1] == (3, ["eager", "eager-1", "eager-rows"])  # several rows: products row by row too
        assert calls[2:] == [(5, ["eager", "eager-1", "eager-rows", "compiled-rowwise", "compiled-library"])] * 2
        assert plan.mode == "compiled-library" and plan.threads == 2  # timed twice: each mode's faster median
        assert plan.step_ms["compiled-library"] == 1.0 and plan.step_ms["compiled-rowwise"] == 2.0
        torch.set_num_threads(1)  # one thread: no single-thread candidate to time
        plan = dp.decode_plan(decoder, 1, compile=False)
        assert plan.mode == "eager" and plan.step_ms is None and len(calls) == 4  # a single candidate: nothing timed
    finally:
        torch.set_num_threads(before)
        _fresh(decoder)


def test_decode_plan_times_real_steps(decoder, monkeypatch):
    """Unmocked: every candidate gets a finite positive time and the chosen one is the fastest."""
    from earlyfusion.model import decode_plan as dp

    monkeypatch.delenv(dp.PIN_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = dp.decode_plan(_fresh(decoder), 2, compile=False)
        assert set(plan.step_ms) == {"eager", "eager-1", "eager-rows"} and all(0 < t < 1e4 for t in plan.step_ms.values())
        assert all(type(m) is nn.Linear for m in decoder.modules() if isinstance(m, nn.Linear))  # timing put them back
        assert plan.step_ms[plan.mode] == min(plan.step_ms.values())
        assert "ms per step" in plan.describe()
        from earlyfusion.model.decoder import Decoder, DecoderConfig

        short = Decoder(DecoderConfig.from_preset("tiny", V, max_seq_len=6)).eval()  # fewer positions than timed steps
        # timed all the same (any candidate may win: the assertion is that timing works at all)
        short_plan = dp.decode_plan(short, 3, compile=False)
        assert set(short_plan.step_ms) == {"eager", "eager-1", "eager-rows"}
        assert short_plan.step_ms[short_plan.mode] == min(short_plan.step_ms.values())
    finally:
        torch.set_num_threads(before)
        _fresh(decoder)


def test_each_compiled_candidate_is_timed_with_its_own_kind_of_product(decoder, monkeypatch):
    """The compiled candidates share the decoder: each timed step runs with the projections of its own candidate
    (swapped in right before the step), never with the ones set up last, and the decoder's own come back after."""
    from earlyfusion.model import decode_plan as dp
    from earlyfusion.model.compile import RowwiseLinear

    seen: list[set] = []

    def fake_compiled(module, *, dynamic):
        def step(*args, **kw):
            seen.append({type(m) for m in module.modules() if isinstance(m, nn.Linear)})
            return module(*args, **kw)

        return step

    monkeypatch.setattr(dp, "compiled", fake_compiled)
    plans = [dp.DecodePlan("compiled-rowwise", 1), dp.DecodePlan("compiled-library", 1)]
    medians = dp.time_plans(_fresh(decoder), 2, plans)
    assert set(medians) == {"compiled-rowwise", "compiled-library"}
    rowwise, library = {RowwiseLinear}, {nn.Linear}
    assert seen == [rowwise] * dp.WARMUP_STEPS + [library] * dp.WARMUP_STEPS + [rowwise, library] * dp.TIMED_ROUNDS
    assert all(type(m) is nn.Linear for m in decoder.modules() if isinstance(m, nn.Linear))


def test_row_by_row_products_give_the_same_tokens_and_are_undone_after_sampling(decoder, monkeypatch):
    """The "eager-rows" step computes each one-token row's product on its own: the same numbers as the library's
    few-row product (to rounding), the same greedy tokens, and the decoder's projections are back to their usual
    products once sampling ends; products with gradients or of several tokens per row never take that path."""
    from earlyfusion.model import decode_plan as dp
    from earlyfusion.model.swap import sharing

    library = nn.Linear(8, 5, bias=False)
    torch.nn.init.normal_(library.weight)
    lin = sharing(dp.RowLinear, library)  # the same weight Parameter, products row by row
    x = torch.randn(3, 1, 8)
    with torch.no_grad():
        plain = library(x)
        assert torch.allclose(lin(x), plain, atol=1e-6)
        assert lin(torch.randn(3, 2, 8)).shape == (3, 2, 5)
    y = lin(x.requires_grad_())  # with gradients: the usual product (and its backward)
    y.sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(3, 1, 8))

    prompts = [[L.bos, 5, 9, 12, 6], [L.bos, 7], [L.bos, 3, 3]]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv(dp.PIN_ENV, "eager")
        plain = _run(_fresh(decoder), prompts, modality="auto", max_new=12, text=GREEDY, image=GREEDY)
        monkeypatch.setenv(dp.PIN_ENV, "eager-rows")
        assert _run(_fresh(decoder), prompts, modality="auto", max_new=12, text=GREEDY, image=GREEDY) == plain
        assert all(type(m) is nn.Linear for m in decoder.modules() if isinstance(m, nn.Linear))
    finally:
        torch.set_num_threads(before)
        _fresh(decoder)


def test_steps_run_on_the_planned_threads_and_the_setting_is_restored(decoder, monkeypatch):
    """The per-token steps run on the plan's threads; the caller's thread count comes back afterwards, also when
    sampling fails; the tokens do not depend on the plan."""
    from earlyfusion.model import decode_plan as dp

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real_forward = type(decoder).forward

        def spy(self, tokens, **kw):
            if tokens.shape[1] == 1:
                seen.append(torch.get_num_threads())
            return real_forward(self, tokens, **kw)

        prompts = [[L.bos, 5, 9, 12, 6], [L.bos, 7]]
        monkeypatch.setattr(type(decoder), "forward", spy)
        monkeypatch.setenv(dp.PIN_ENV, "eager-1")
        one_thread = _run(_fresh(decoder), prompts, modality="auto", max_new=12, text=GREEDY, image=GREEDY)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        monkeypatch.setenv(dp.PIN_ENV, "eager")
        seen.clear()
        assert _run(_fresh(decoder), prompts, modality="auto", max_new=12, text=GREEDY, image=GREEDY) == one_thread
        assert set(seen) == {2}

        def fail(self, tokens, **kw):
            if tokens.shape[1] == 1:
                raise RuntimeError("boom")
            return real_forward(self, tokens, **kw)

        monkeypatch.setenv(dp.PIN_ENV, "eager-1")
        monkeypatch.setattr(type(decoder), "forward", fail)
        with pytest.raises(RuntimeError, match="boom"):
            _run(_fresh(decoder), prompts, modality="text", max_new=4)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv(dp.PIN_ENV, "fastest")
        with pytest.raises(ValueError, match="EARLYFUSION_DECODE_STEP"):
            dp.decode_plan(decoder, 1, compile=False)
    finally:
        torch.set_num_threads(before)
        _fresh(decoder)
