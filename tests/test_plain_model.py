"""The decoder as a plain torch model: nn.Linear projections in torch's layout, checkpoints of the earlier
(in, out) layout converted on load (model/upgrade.py, training/data/runs.py), accelerations applied by module swaps
from outside (model/swap.py), and PEFT's LoRA on the projections with no adapter code of ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from earlyfusion.core.checkpoint import CheckpointError, atomic_dir, save_json, save_weights, step_dir
from earlyfusion.core.rundir import CHECKPOINTS_DIR, CONFIG, IMAGE_TOKENIZER_DIR, VOCAB_DIR, WEIGHTS, write_decoder
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.model.upgrade import upgrade_optimizer_state, upgrade_state_dict
from earlyfusion.training.data.runs import load_decoder_weights, load_run

V = 53
# every projection of a layer, by our names (q/k/v fused, output, gate/up fused, down) and its (out, in) shape
PROJECTIONS = {"attn.qkv": lambda c: ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim),
               "attn.proj": lambda c: (c.dim, c.n_heads * c.head_dim),
               "mlp.gate_up": lambda c: (2 * c.hidden_dim, c.dim),
               "mlp.down": lambda c: (c.dim, c.hidden_dim)}


def make(seed: int = 0, vocab_size: int = V, **overrides) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig.from_preset("tiny", vocab_size, n_kv_heads=2, **overrides)).eval()
    with torch.no_grad():  # move norms off 1/0 so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(B: int, T: int, vocab_size: int = V, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as decoders stored it before the projections became nn.Linears: (in, out) weights. Spelled out
    by name here, independently of model/upgrade.py."""
    def projection(name: str) -> bool:
        return name == "output.weight" or any(name.endswith(f".{p}.weight") for p in PROJECTIONS)

    return {k: v.t().contiguous() if projection(k) else v for k, v in state.items()}


# ---------------------------------------------------------------- plain modules


def test_projections_are_plain_linears_in_torchs_layout():
    model = make()
    c = model.config
    for block in model.layers:
        for name, shape in PROJECTIONS.items():
            lin = block.get_submodule(name)
            assert type(lin) is nn.Linear and lin.bias is None and tuple(lin.weight.shape) == shape(c), name
    assert type(model.output) is nn.Linear and tuple(model.output.weight.shape) == (V, c.dim)
    assert type(model.tok_emb) is nn.Embedding
    x = torch.randn(2, 3, c.dim)
    lin = model.layers[0].attn.qkv
    torch.testing.assert_close(lin(x), x @ lin.weight.t())
    assert model.config.to_dict()["weight_layout"] == "out_in"


def test_legacy_state_dict_needs_the_layout_key_not_the_shapes():
    """The square attention output projection reads the same in both layouts: only the config's key tells them
    apart. A config with the key is taken as it is; an unknown layout is refused."""
    model = make()
    state = model.state_dict()
    assert state["layers.0.attn.proj.weight"].shape[0] == state["layers.0.attn.proj.weight"].shape[1]
    current = model.config.to_dict()
    old = {k: v for k, v in current.items() if k != "weight_layout"}
    assert DecoderConfig.from_dict(old) == model.config  # an old config still describes the same shape
    upgraded = upgrade_state_dict(legacy(state), old)
    assert set(upgraded) == set(state) and all(torch.equal(upgraded[k], state[k]) for k in state)
    same = upgrade_state_dict(state, current)
    assert all(same[k] is state[k] for k in state)
    one = upgrade_state_dict({"layers.1.mlp.down.weight": legacy(state)["layers.1.mlp.down.weight"]}, old)  # streaming
    assert torch.equal(one["layers.1.mlp.down.weight"], state["layers.1.mlp.down.weight"])
    with pytest.raises(CheckpointError, match="weight_layout"):
        upgrade_state_dict(state, {**current, "weight_layout": "columns"})
    with pytest.raises(CheckpointError, match="weight_layout"):
        DecoderConfig.from_dict({**current, "weight_layout": "in_out"})


# ---------------------------------------------------------------- checkpoints of the earlier layout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A run directory (tiny image tokenizer, vocabulary) to put decoder checkpoints in."""
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.tokenizer.vq_checkpoint import save_vqvae, vq_fingerprint
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE

    lm = tmp_path_factory.mktemp("plain") / "lm"
    torch.manual_seed(0)
    vq = VQVAE(VQ_PRESETS["tiny"]).eval()
    save_vqvae(vq, lm / IMAGE_TOKENIZER_DIR)
    texts = ["a red circle at the top left", "two blue squares", "a small green triangle in the centre"] * 20
    vocab = Vocabulary.build(texts, codebook_size=vq.codebook_size, grid=vq.grid_size, text_vocab_size=300,
                             image_tokenizer_fingerprint=vq_fingerprint(lm / IMAGE_TOKENIZER_DIR))
    vocab.save(lm / VOCAB_DIR)
    return SimpleNamespace(lm=lm, vocab_size=vocab.vocab_size)


def _write_legacy(lm, step: int, decoder: Decoder, dtype: torch.dtype = torch.float32):
    """A checkpoint as earlier versions wrote it: (in, out) projection weights, no weight_layout in its config."""
    config = {k: v for k, v in decoder.config.to_dict().items() if k != "weight_layout"}
    with atomic_dir(step_dir(lm / CHECKPOINTS_DIR, step)) as tmp:
        save_weights(tmp / WEIGHTS, {k: v.to(dtype) for k, v in legacy(decoder.state_dict()).items()})
        save_json(tmp / CONFIG, {"decoder": config, "step": step})
    return step_dir(lm / CHECKPOINTS_DIR, step)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}])
def test_a_checkpoint_of_the_earlier_layout_loads_to_the_same_logits(run, overrides):
    decoder = make(3, run.vocab_size, **overrides)
    x = tokens(2, 12, run.vocab_size)
    with torch.no_grad():
        want = decoder(x)
    ckpt = _write_legacy(run.lm, 10 + len(overrides), decoder)
    loaded = load_run(ckpt)
    assert "weight_layout" not in loaded.config["decoder"]
    with torch.no_grad():
        assert torch.equal(loaded.decoder(x), want)
    for k, v in decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[k], v), k
    # written again (as training does), the checkpoint is in the current layout and loads the same
    with atomic_dir(step_dir(run.lm / CHECKPOINTS_DIR, 20 + len(overrides))) as tmp:
        write_decoder(tmp, loaded.decoder, {"decoder": loaded.decoder.config.to_dict(), "step": 1})
    again = load_run(step_dir(run.lm / CHECKPOINTS_DIR, 20 + len(overrides)))
    assert again.config["decoder"]["weight_layout"] == "out_in"
    with torch.no_grad():
        assert torch.equal(again.decoder(x), want)


def test_a_bf16_checkpoint_of_the_earlier_layout_loads_in_bf16(run):
    decoder = make(4, run.vocab_size)
    ckpt = _write_legacy(run.lm, 30, decoder, torch.bfloat16)
    loaded = load_run(ckpt).decoder
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    for k, v in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    into_fp32 = make(5, run.vocab_size)  # what `train --init-from` does: fp32 master weights
    load_decoder_weights(ckpt, into_fp32)
    for k, v in decoder.state_dict().items():
        assert torch.equal(into_fp32.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_a_legacy_checkpoint_of_another_shape_is_a_clear_error(run):
    ckpt = _write_legacy(run.lm, 40, make(6, run.vocab_size))
    other = Decoder(DecoderConfig.from_preset("tiny", run.vocab_size, n_kv_heads=2, hidden_dim=128))
    with pytest.raises(CheckpointError, match="do not match"):
        load_decoder_weights(ckpt, other)


def test_optimizer_state_of_the_earlier_layout_is_transposed_with_its_weights():
    """Resuming a run of the earlier layout: AdamW's moments of each projection follow its weight; after
    ``upgrade_optimizer_state`` the next step is the one an uninterrupted run in the current layout takes."""
    model = make(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(tokens(2, 8)).logsumexp(-1).mean().backward()
    opt.step()
    saved = opt.state_dict()
    config = {k: v for k, v in model.config.to_dict().items() if k != "weight_layout"}
    names = [n for n, _ in model.named_parameters()]
    old = {**saved, "state": {i: {k: legacy({names[i]: v})[names[i]] if v.dim() == 2 else v for k, v in s.items()}
                              for i, s in saved["state"].items()}}
    down = names.index("layers.0.mlp.down.weight")
    assert old["state"][down]["exp_avg"].shape == saved["state"][down]["exp_avg"].shape[::-1]
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(upgrade_optimizer_state(old, resumed, model, config))
    for i, s in saved["state"].items():
        for k, v in s.items():
            assert torch.equal(resumed.state_dict()["state"][i][k], v), (names[i], k)
    assert upgrade_optimizer_state(saved, resumed, model, model.config.to_dict()) is saved


# ---------------------------------------------------------------- accelerations by module swaps


def test_swapped_modules_come_back_also_after_an_error():
    from earlyfusion.model.decode_plan import RowLinear
    from earlyfusion.model.swap import applied, sharing, swaps

    model = make()
    before, state = dict(model.named_modules()), model.state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        with applied(swaps(model, lambda m: isinstance(m, nn.Linear), lambda m: sharing(RowLinear, m))) as made:
            assert len(made) == 4 * model.config.n_layers + 1
            assert all(type(s.new) is RowLinear and s.new.weight is s.old.weight for s in made)
            during = model.state_dict()
            assert set(during) == set(state) and all(during[k].data_ptr() == v.data_ptr() for k, v in state.items())
            raise RuntimeError("boom")
    assert dict(model.named_modules()) == before


@pytest.mark.parametrize("mode", ["eager", "eager-rows"])
@pytest.mark.parametrize("copies", [True, False])
def test_eager_decode_products_equal_the_library_products_and_are_put_back(mode, copies):
    """The eager steps' projections (with (in, out) weight copies, or row by row on the weights themselves) give
    nn.Linear's numbers, hold the decoder's own Parameters, and the decoder's nn.Linears are back afterwards."""
    from earlyfusion.model.decode_plan import DecodePlan, RowLinear, TransposedLinear

    model = make(8)
    state = model.state_dict()
    x = tokens(3, 6)
    want = {"eager": TransposedLinear, "eager-rows": TransposedLinear if copies else RowLinear}[mode]
    if mode == "eager" and not copies:
        want = nn.Linear
    originals = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        cache = model.new_cache(3, max_len=8)
        model(x[:, :5], cache=cache)
        expected = model(x[:, 5:], cache=cache)
        cache.length = 5
        with DecodePlan(mode, torch.get_num_threads(), copies=copies).stepping(model) as step:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            assert {type(m) for m in linears} == {want}
            assert all(m.weight is o.weight for m, o in zip(linears, originals))
            got = step(x[:, 5:], cache=cache)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_each_sampling_call_copies_the_weights_as_they_are_then():
    """The (in, out) copies are made when a plan's steps start: after the weights change (training between sample
    sheets, load_state_dict), the next steps compute with the new ones."""
    from earlyfusion.model.decode_plan import DecodePlan

    model, other = make(11), make(12)
    plan = DecodePlan("eager", torch.get_num_threads())
    x = tokens(2, 6)

    @torch.no_grad()
    def last_step(stepping: bool) -> torch.Tensor:
        cache = model.new_cache(2, max_len=6)
        model(x[:, :5], cache=cache)
        if not stepping:
            return model(x[:, 5:], cache=cache)
        with plan.stepping(model) as step:
            return step(x[:, 5:], cache=cache)

    torch.testing.assert_close(last_step(True), last_step(False), rtol=0, atol=1e-5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(last_step(True), last_step(False), rtol=0, atol=1e-5)


def test_transposed_copies_only_where_they_fit(monkeypatch):
    """The planner gives the eager steps (in, out) weight copies only where twice their size is available."""
    from earlyfusion.model import decode_plan as dp

    model = make(9)
    assert dp.copies_fit(model)  # a tiny model fits anywhere /proc/meminfo can be read
    monkeypatch.setenv(dp.PIN_ENV, "eager")
    assert dp.decode_plan(model, 1, compile=False).copies
    monkeypatch.setattr(dp, "copies_fit", lambda decoder: False)
    plan = dp.decode_plan(model, 1, compile=False)
    assert not plan.copies and "copies" not in plan.describe() and plan.products(model) == []


def test_compiling_gives_the_embedding_its_index_add_backward_and_keeps_the_state_dict():
    from earlyfusion.model.compile import compiled
    from earlyfusion.model.kernels import IndexAddEmbedding

    model = make(9)
    weight, keys = model.tok_emb.weight, set(model.state_dict())
    compiled(model, dynamic=False)  # compiles lazily: nothing runs here
    assert type(model.tok_emb) is IndexAddEmbedding and model.tok_emb.weight is weight
    assert set(model.state_dict()) == keys


# ---------------------------------------------------------------- PEFT


def test_lora_from_peft_wraps_the_projections():
    """peft's LoRA finds the projections by name (they are nn.Linears): the forward works, only the adapters train,
    and merging them into the weights gives the logits of base + adapters."""
    peft = pytest.importorskip("peft")

    base = make(10)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    x = tokens(2, 10)
    with torch.no_grad():
        before = base(x)
    targets = ["qkv", "proj", "gate_up", "down"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(targets) * base.config.n_layers
    with torch.no_grad():
        adapted = model(x)
    assert adapted.shape == before.shape and not torch.allclose(adapted, before, atol=1e-4)

    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x, positions=torch.arange(10).expand(2, 10)).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    for n, p in model.named_parameters():
        if n in adapters:
            assert not torch.equal(p, adapters[n]), n
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), k

    with torch.no_grad():
        adapted = model(x)
        merged = model.merge_and_unload()
        assert type(merged) is Decoder
        assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-5)
    assert set(merged.state_dict()) == set(frozen)
