"""The decoder (model/decoder.py): shapes, causality, packed documents, KV cache, variants, config."""

from __future__ import annotations

import json

import pytest
import torch

from earlyfusion.model.decoder import DECODER_PRESETS, Decoder, DecoderConfig, KVCache, image_ordinals, image_places
from earlyfusion.core.errors import UserError

V = 97


def make(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig.from_preset("tiny", V, **overrides)).eval()
    with torch.no_grad():  # move norms off 1/0 so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model() -> Decoder:
    return make(n_kv_heads=2)  # grouped-query attention on


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- forward


@torch.no_grad()
def test_shapes_and_fp32_logits(model):
    x = tokens(3, 11)
    logits, hidden = model(x, return_hidden=True)
    assert logits.shape == (3, 11, V) and logits.dtype == torch.float32
    assert hidden.shape == (3, 11, model.config.dim)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        model(x[0])  # 1-D tokens
    with pytest.raises(ValueError):
        model(tokens(1, model.config.max_seq_len + 1))


@torch.no_grad()
def test_causal(model):
    x = tokens(2, 16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % V
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@torch.no_grad()
def test_packed_documents_are_isolated(model):
    d1, d2, d3 = tokens(1, 5, seed=2), tokens(1, 7, seed=3), tokens(1, 4, seed=4)
    packed = torch.cat([d1, d2, d3], dim=1)  # (1, 16)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    out = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, 5:12], model(d2), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 12:], model(d3), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, :5], model(d1), rtol=0, atol=1e-5)
    # without doc_ids the second document sees the first: the mask is what isolates them
    assert (model(packed, positions=positions)[:, 5:12] - model(d2)).abs().max() > 1e-3


@torch.no_grad()
def test_explicit_positions_equal_default(model):
    x = tokens(2, 9)
    torch.testing.assert_close(model(x, positions=torch.arange(9).expand(2, 9)), model(x), rtol=0, atol=1e-6)


def test_backward_through_packed_mask(model):
    m = make(seed=3)
    m.train()
    x = tokens(2, 12)
    doc_ids = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    positions = torch.tensor([list(range(6)) * 2, list(range(12))])
    m(x, positions=positions, doc_ids=doc_ids).logsumexp(-1).mean().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- KV cache


@torch.no_grad()
def test_cache_step_by_step_equals_full(model):
    x = tokens(2, 20)
    full = model(x)
    cache = model.new_cache(2, max_len=24)
    k_ptr, v_ptr, valid_ptr = cache.k.data_ptr(), cache.v.data_ptr(), cache.valid.data_ptr()
    steps = torch.cat([model(x[:, t:t + 1], cache=cache) for t in range(20)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    assert cache.length == 20
    # preallocated once, written in place
    assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.valid.data_ptr()) == (k_ptr, v_ptr, valid_ptr)
    assert cache.k.shape == (model.config.n_layers, 2, model.config.n_kv_heads, 24, model.config.head_dim)


@torch.no_grad()
def test_cache_chunked_prefill_and_reset(model):
    x = tokens(2, 20)
    full = model(x)
    cache = model.new_cache(2)
    assert cache.max_len == model.config.max_seq_len
    parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(model(x, cache=cache), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(model):
    rows = [tokens(1, 9, seed=5)[0], tokens(1, 3, seed=6)[0], tokens(1, 1, seed=7)[0]]
    new = tokens(3, 6, seed=8)  # continuation fed step by step
    T = max(len(r) for r in rows)
    batch = torch.zeros(3, T, dtype=torch.long)
    valid = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        batch[i, T - len(r):] = r
        valid[i, T - len(r):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache(3, max_len=T + 6)
    first = model(batch, positions=positions, valid=valid, cache=cache)[:, -1]  # (3, V)
    lengths = valid.sum(1)
    later = []
    for t in range(6):
        later.append(model(new[:, t:t + 1], positions=(lengths + t)[:, None], cache=cache)[:, 0])
    assert torch.isfinite(first).all()
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, new[i]])[None])[0]  # (len + 6, V)
        torch.testing.assert_close(first[i], alone[len(r) - 1], rtol=0, atol=1e-5)
        for t in range(6):
            torch.testing.assert_close(later[t][i], alone[len(r) + t], rtol=0, atol=1e-5)


@torch.no_grad()
def test_invalid_steps_are_never_attended(model):
    """A row that feeds padding (valid=False) mid-sequence continues as if the padding was not there."""
    x = tokens(1, 10, seed=9)
    cache = model.new_cache(1, max_len=12)
    model(x[:, :5], cache=cache)
    junk = model(torch.tensor([[3]]), positions=torch.tensor([[5]]), valid=torch.tensor([[False]]), cache=cache)
    assert torch.isfinite(junk).all()
    out = [model(x[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache) for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(out, 1), model(x)[:, 5:], rtol=0, atol=1e-5)


@torch.no_grad()
def test_valid_mask_without_cache(model):
    x = tokens(1, 8, seed=10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    valid = torch.tensor([[False] * 3 + [True] * 8])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    out = model(padded, positions=positions, valid=valid)
    torch.testing.assert_close(out[:, 3:], model(x), rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_cache_misuse_raises(model):
    cache = model.new_cache(2, max_len=4)
    assert isinstance(cache, KVCache) and cache.batch == 2
    with pytest.raises(ValueError):
        model(tokens(1, 2), cache=cache)  # wrong batch
    with pytest.raises(ValueError):
        model(tokens(2, 5), cache=cache)  # overflow
    with pytest.raises(ValueError):
        model(tokens(2, 2), doc_ids=torch.zeros(2, 2, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------- compiled decode steps (row-wise products)


def _recording_backend(graphs: list[set[str]]):
    """A torch.compile backend that appends the call targets of every FX graph it is given to ``graphs`` and runs
    the graph as it is (no inductor involved)."""

    def record(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")})
        return gm.forward

    return record


def _graph_ops(fn, *args) -> set[str]:
    """The call targets of the FX graph torch.compile traces for ``fn(*args)``."""
    graphs: list[set[str]] = []
    torch._dynamo.reset()
    torch.compile(fn, backend=_recording_backend(graphs), dynamic=False)(*args)
    return set().union(*graphs)


def _products(ops: set[str]) -> bool:
    """Whether a graph's call targets include a library product (nn.Linear's F.linear, or a matmul)."""
    return any("linear" in t or "matmul" in t for t in ops)


def _rowwise(linear: torch.nn.Linear):
    from earlyfusion.model.compile import RowwiseLinear
    from earlyfusion.model.swap import sharing

    return sharing(RowwiseLinear, linear)


def test_rowwise_products_only_for_compiled_inference_of_few_rows():
    from earlyfusion.model.compile import ROWWISE_MAX_ROWS

    plain = torch.nn.Linear(16, 24, bias=False)
    lin = _rowwise(plain)
    assert lin.weight is plain.weight and set(lin.state_dict()) == {"weight"}  # the same Parameter, nothing added
    few, many = torch.randn(1, ROWWISE_MAX_ROWS, 16), torch.randn(1, ROWWISE_MAX_ROWS + 1, 16)
    with torch.no_grad():
        assert "sum" in _graph_ops(lin, few) and not _products(_graph_ops(lin, few))
        assert _products(_graph_ops(lin, many))
        torch.testing.assert_close(torch.compile(lin, backend="eager")(few), plain(few))
        torch.testing.assert_close(lin(few), plain(few), rtol=0, atol=0)  # eager: nn.Linear's own product
    # with gradients (training) the library product, so the weight gets its gradient
    assert _products(_graph_ops(lin, few))
    x = few.clone().requires_grad_()
    torch._dynamo.reset()
    torch.compile(lin, backend="eager")(x).sum().backward()
    assert plain.weight.grad is not None and plain.weight.grad.abs().sum() > 0


def test_swapped_products_share_the_weight_and_follow_in_place_changes_and_moves():
    """A swapped-in projection holds the original's Parameter: an in-place change (an optimizer step,
    load_state_dict) or a move is the original's, and there is never a copy to refresh."""
    from earlyfusion.model.decode_plan import RowLinear
    from earlyfusion.model.swap import sharing

    plain = torch.nn.Linear(8, 4, bias=False)
    for lin in (_rowwise(plain), sharing(RowLinear, plain)):
        with torch.no_grad():
            plain.weight.mul_(3.0)
        assert lin.weight is plain.weight
        x = torch.randn(3, 1, 8)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), plain(x), rtol=0, atol=1e-6)
    model = torch.nn.Sequential(plain)
    model[0] = _rowwise(plain)
    model.double()
    assert plain.weight.dtype == torch.float64 and model[0].weight is plain.weight


def test_models_with_and_without_rowwise_products_get_their_own_graphs():
    """Dynamo keys its graphs on the projections' classes: a model without RowwiseLinears, compiled in the same
    process as one with them, never runs the other's graph (the Decoder's forward code is shared)."""
    from earlyfusion.model.swap import swap_modules

    graphs: list[set[str]] = []
    backend = _recording_backend(graphs)  # one backend for every call: dynamo keeps its graphs per backend
    torch._dynamo.reset()
    plain, rowwise = make(5), make(6)
    swap_modules(rowwise, lambda m: isinstance(m, torch.nn.Linear), _rowwise)
    with torch.no_grad():
        for m in (plain, rowwise, plain, rowwise):
            cache = m.new_cache(1, max_len=8)
            m(tokens(1, 3), cache=cache)
            torch.compile(m, backend=backend, dynamic=True)(tokens(1, 1), cache=cache)
    assert [_products(g) for g in graphs] == [True, False]  # two graphs (products, then reductions), each reused


@pytest.mark.parametrize("mode", ["compiled-rowwise", "compiled-library"])
def test_compiled_decode_steps_equal_eager_and_follow_new_weights(mode):
    """A compiled decode plan's steps through inductor give the eager logits, at 1 and 3 rows, and after the weights
    change (load_state_dict) the same compiled steps give the new ones; the decoder's own nn.Linears are back
    after each use and the state dict never changes."""
    from earlyfusion.model.compile import RowwiseLinear
    from earlyfusion.model.decode_plan import DecodePlan

    torch._dynamo.reset()
    model, other = make(3), make(4)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    x = tokens(3, 9)
    plan = DecodePlan(mode, torch.get_num_threads())

    @torch.no_grad()
    def steps(rows: int, compiled: bool) -> torch.Tensor:
        cache = model.new_cache(rows, max_len=9)
        model(x[:rows, :4], cache=cache)  # eager prefill, as the sampler does
        if not compiled:
            return torch.cat([model(x[:rows, t:t + 1], cache=cache) for t in range(4, 9)], dim=1)
        with plan.stepping(model) as fn:
            kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
            assert kinds == ({RowwiseLinear} if mode == "compiled-rowwise" else {torch.nn.Linear})
            return torch.cat([fn(x[:rows, t:t + 1], cache=cache) for t in range(4, 9)], dim=1)

    for rows in (1, 3):
        torch.testing.assert_close(steps(rows, True), steps(rows, False), rtol=0, atol=1e-5)
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears  # put back
    before = steps(1, False)
    model.load_state_dict(other.state_dict())
    after = steps(1, False)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(steps(1, True), after, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(other.state_dict())


# ---------------------------------------------------------------- variants


@torch.no_grad()
@pytest.mark.parametrize("overrides", [dict(swin_norm=True), dict(tie_embeddings=True), dict(qk_norm=False),
                                       dict(image_positions=5, boi_id=3, eoi_id=4),
                                       dict(image_positions=3, image_ordinals=2, boi_id=3, eoi_id=4)])
def test_variants_run_and_cache(overrides):
    m = make(**overrides)
    x = tokens(2, 10)
    full = m(x)
    assert full.shape == (2, 10, V) and torch.isfinite(full).all()
    cache = m.new_cache(2, 10)
    steps = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(10)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    names = set(m.state_dict())
    assert ("output.weight" in names) != m.config.tie_embeddings
    assert any("qk_norm" in n for n in names) == m.config.qk_norm
    assert sum(p.numel() for p in m.parameters()) == m.config.num_params()


BOI, EOI, BOS = 3, 4, 0


def test_image_places_count_from_each_boi_and_stop_at_its_eoi():
    """Places start at 1 on <boi> and end before <eoi>; text between spans is at 0; a document start (packed rows)
    closes a span its cut document left open; a cache's carried place continues the count."""
    x = torch.tensor([[BOS, 50, BOI, 10, 11, 12, EOI, 60, BOI, 10, 11, EOI, BOS]])
    assert image_places(x, BOI, EOI).tolist() == [[0, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 0, 0]]
    cut = torch.tensor([[BOS, BOI, 10, 11, BOS, 50, 51]])  # the first document ends inside its picture
    starts = torch.tensor([[True, False, False, False, True, False, False]])
    assert image_places(cut, BOI, EOI, starts=starts).tolist() == [[0, 1, 2, 3, 0, 0, 0]]
    assert image_places(cut, BOI, EOI).tolist() == [[0, 1, 2, 3, 4, 5, 6]]  # without the start it would run on
    for split in range(1, x.shape[1]):  # any split, carrying the last place, gives the same places
        head = image_places(x[:, :split], BOI, EOI)
        tail = image_places(x[:, split:], BOI, EOI, before=head[:, -1])
        assert torch.cat([head, tail], 1).tolist() == image_places(x, BOI, EOI).tolist()


def test_image_ordinals_count_the_pictures_of_each_document():
    """The k-th picture of a document is k from its <boi> on; a document start (packed rows) restarts the count; a
    cache's carried count continues it."""
    x = torch.tensor([[BOS, 50, BOI, 10, EOI, 60, BOI, 10, 11, EOI, 70, BOI, 12]])
    assert image_ordinals(x, BOI).tolist() == [[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3]]
    packed = torch.tensor([[BOS, BOI, 10, EOI, BOS, BOI, 11, EOI, BOI, 12]])
    starts = packed == BOS
    assert image_ordinals(packed, BOI, starts=starts).tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 2, 2]]
    starts_at_boi = torch.tensor([[True, False, False, True, False, False]])  # documents that open with a picture
    assert image_ordinals(torch.tensor([[BOI, 10, EOI, BOI, 11, EOI]]), BOI, starts=starts_at_boi).tolist() == \
        [[1, 1, 1, 1, 1, 1]]
    for split in range(1, x.shape[1]):
        head = image_ordinals(x[:, :split], BOI)
        tail = image_ordinals(x[:, split:], BOI, before=head[:, -1])
        assert torch.cat([head, tail], 1).tolist() == image_ordinals(x, BOI).tolist()


@torch.no_grad()
def test_image_ordinals_tell_the_first_picture_from_the_second():
    """With two tables, the same code at the same place gets another embedding in a document's second picture than
    in its first, and the third shares the second's; with one table all pictures are alike."""
    x = torch.tensor([[BOS, BOI, 10, EOI, BOI, 10, EOI, BOI, 10, EOI]])
    two = Decoder._image_place_embedding(make(image_positions=2, image_ordinals=2, boi_id=BOI, eoi_id=EOI), x, None, None)
    assert not torch.allclose(two[0, 2], two[0, 5]) and torch.equal(two[0, 5], two[0, 8])
    one = Decoder._image_place_embedding(make(image_positions=2, boi_id=BOI, eoi_id=EOI), x, None, None)
    assert torch.equal(one[0, 2], one[0, 5])


@torch.no_grad()
def test_image_place_embeddings_tell_where_a_code_lies():
    """With place embeddings, the same code after the same text gets other logits at another place in its picture
    even where RoPE sees the same distances (the tokens before it differ only inside the span); without them the
    decoder's input embeddings of the span are the token embeddings alone. Past the table, no place is added."""
    m = make(image_positions=3, boi_id=BOI, eoi_id=EOI)
    x = torch.tensor([[BOS, BOI, 10, 20, 20]])
    assert Decoder._image_place_embedding(m, x, None, None)[0, 0].abs().sum() == 0  # text: nothing added
    with_places = m(x)
    m.image_pos.weight.zero_()
    assert not torch.allclose(with_places, m(x), atol=1e-4)
    emb = Decoder._image_place_embedding(make(image_positions=2, boi_id=BOI, eoi_id=EOI), x, None, None)
    assert emb[0, 3:].abs().sum() == 0 and emb[0, 1:3].abs().sum() > 0  # places 3 and 4 are past a table of 2


def test_image_place_decoders_cannot_be_exported_to_transformers():
    pytest.importorskip("transformers")
    from earlyfusion.model.chameleon_hf import to_hf_config

    with pytest.raises(ValueError, match="image place embeddings"):
        to_hf_config(make(image_positions=3, boi_id=BOI, eoi_id=EOI).config)


def test_dropout_only_in_training():
    m = make(dropout=0.5)
    x = tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.equal(m(x), m(x))
        m.eval()
        assert torch.equal(m(x), m(x))


def test_init_scales():
    m = make()  # norms perturbed by make(); check the linear layers
    cfg = m.config
    proj_std = m.layers[0].attn.proj.weight.std().item()
    qkv_std = m.layers[0].attn.qkv.weight.std().item()
    assert abs(qkv_std - 0.02) < 0.003
    assert abs(proj_std - 0.02 / (2 * cfg.n_layers) ** 0.5) < 0.003
    fresh = Decoder(cfg)
    assert torch.equal(fresh.layers[0].attn.qk_norm.weight, torch.ones(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim))
    assert torch.equal(fresh.layers[0].attn.qk_norm.bias, torch.zeros(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim))


# ---------------------------------------------------------------- config and presets


def test_presets():
    assert set(DECODER_PRESETS) >= {"tiny", "small", "base", "chameleon-7b"}
    base = DecoderConfig.from_preset("base", 9000)
    assert 90e6 < base.num_params() < 110e6
    tiny = DecoderConfig.from_preset("tiny", V, max_seq_len=48)
    assert tiny.max_seq_len == 48 and tiny.vocab_size == V
    with pytest.raises(ValueError):
        DecoderConfig.from_preset("huge", V)
    with pytest.raises(ValueError):
        DecoderConfig.from_preset("tiny", V, n_head=3)  # misspelled field
    with pytest.raises(ValueError):
        DecoderConfig.from_preset("tiny")  # no vocabulary size


def test_chameleon_7b_parameter_count():
    """Published size: 7B. Analytic count: 7,013,666,816 (untied 65536x4096 embedding + head,
    32 x (attention 4·4096² + QK-norm 4·4096 + SwiGLU 3·4096·11008 + 2 norms) + final norm);
    checked on the meta device (nothing allocated) and within 1 % of 7.0e9."""
    cfg = DecoderConfig.from_preset("chameleon-7b")
    assert cfg.vocab_size == 65536 and cfg.hidden_dim == 11008 and cfg.max_seq_len == 4096
    assert cfg.num_params() == 7_013_666_816
    with torch.device("meta"):
        meta = Decoder(cfg)
    assert sum(p.numel() for p in meta.parameters()) == 7_013_666_816
    assert abs(cfg.num_params() - 7.0e9) / 7.0e9 < 0.01


@pytest.mark.parametrize("bad", [dict(dim=66), dict(n_kv_heads=3), dict(dim=36, n_heads=4), dict(n_layers=0),
                                 dict(vocab_size=-1), dict(dropout=1.0), dict(max_seq_len=0), dict(image_positions=-1),
                                 dict(image_positions=4), dict(image_ordinals=0), dict(image_ordinals=True), dict(image_positions=4, boi_id=3, eoi_id=V)])
def test_config_validation(bad):
    kwargs = {**DECODER_PRESETS["tiny"], "vocab_size": V, **bad}
    with pytest.raises(ValueError):
        DecoderConfig(**kwargs)


def test_config_json_round_trip():
    cfg = DecoderConfig.from_preset("small", 1234, swin_norm=True, dropout=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DecoderConfig.from_dict(d) == cfg and d == cfg.to_dict()
    assert d["n_kv_heads"] == cfg.n_heads and d["hidden_dim"] == cfg.hidden_dim
    with pytest.raises(UserError):
        DecoderConfig.from_dict({**d, "n_head": 4})
    with pytest.raises(UserError):
        DecoderConfig.from_dict({**d, "dim": 255})


@pytest.mark.parametrize("compile", [False, True])
def test_embedding_gradient_sums_the_rows_of_repeated_tokens(compile):
    """``embed``'s backward (an index_add, opaque to torch.compile) gives F.embedding's gradient, repeated tokens
    summed, eager and compiled."""
    import torch.nn.functional as F

    from earlyfusion.model.kernels import embed

    weight = torch.randn(11, 6, dtype=torch.float64)
    tokens = torch.tensor([[1, 3, 3, 0], [10, 3, 1, 1]])
    upstream = torch.randn(2, 4, 6, dtype=torch.float64)
    fn = torch.compile(embed, dynamic=False) if compile else embed
    w = weight.clone().requires_grad_()
    out = fn(w, tokens)
    (out * upstream).sum().backward()
    ref = weight.clone().requires_grad_()
    (F.embedding(tokens, ref) * upstream).sum().backward()
    assert torch.equal(out.detach(), F.embedding(tokens, weight))
    assert torch.allclose(w.grad, ref.grad, atol=1e-12)
    assert torch.allclose(w.grad[3], upstream[0, 1] + upstream[0, 2] + upstream[1, 1], atol=1e-12)
    assert torch.all(w.grad[[2, 4, 5, 6, 7, 8, 9]] == 0)
