"""Training attention (model/kernels.py ``blocked_attention``, model/attention_plan.py) and the allocator policy
(earlyfusion/core/runtime.py ``keep_freed_memory``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from earlyfusion.model import attention_plan as plan_mod
from earlyfusion.model.attention_plan import PIN_ENV, attention_kernel, attention_plan, use_attention
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.model.masks import causal_mask
from earlyfusion.model.kernels import blocked_attention
from earlyfusion.core.runtime import keep_freed_memory

V = 61


def qkv(B: int, H: int, KV: int, T: int, hd: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, hd, generator=g, dtype=dtype).requires_grad_() for h in (H, KV, KV)]


def doc_mask(B: int, T: int, cuts: tuple[int, ...]) -> torch.Tensor:
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    for c in cuts:
        doc_ids[:, c:] += 1
    return causal_mask(B, T, 0, torch.device("cpu"), doc_ids=doc_ids)


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2)])
@pytest.mark.parametrize("T,block", [(37, 128), (37, 8), (64, 16), (5, 1)])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_attention_equals_the_library_kernel(H, KV, T, block, packed):
    """Outputs and all three gradients equal scaled_dot_product_attention's in fp64, for blocks that divide the
    length and blocks that do not, grouped-query heads, plain causal and packed-document masks."""
    q, k, v = qkv(2, H, KV, T, 8)
    mask = doc_mask(2, T, (T // 3, T // 2)) if packed else None
    ours = blocked_attention(q, k, v, mask, block)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != KV)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_blocked_attention_gradcheck():
    q, k, v = qkv(1, 2, 2, 9, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v, None, 4), (q, k, v))


def test_blocked_attention_under_bf16_autocast_is_close_to_the_library():
    q, k, v = qkv(2, 4, 4, 48, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = blocked_attention(q, k, v, None, 16)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    err, ref_err = ((x.detach().float() - exact).abs().max() for x in (ours, ref))
    assert float(err) < 3 * float(ref_err) + 1e-2
    ours.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def make(kernel: str, **overrides) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_preset("tiny", V, n_kv_heads=2, **overrides))
    use_attention(model, kernel)
    return model


def test_decoder_kernels_agree_on_packed_training_rows():
    """The same decoder with either kernel gives the same logits and weight gradients on packed rows."""
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    doc_ids = (torch.arange(40) >= 17).long().expand(2, 40)
    positions = torch.where(doc_ids == 0, torch.arange(40), torch.arange(40) - 17)
    results = []
    for kernel in ("library", "blocked"):
        model = make(kernel)
        assert attention_kernel(model) == kernel
        logits = model(tokens, positions=positions, doc_ids=doc_ids)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_decoding_with_a_cache_is_unchanged_by_the_kernel():
    """The kernel applies to forwards without a cache; cached decoding gives the full forward's logits."""
    model = make("blocked").eval()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    full = model(x)
    cache = model.new_cache(2, max_len=12)
    steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_use_attention_refuses_unknown_kernels():
    with pytest.raises(ValueError, match="not one of"):
        use_attention(make("library"), "flash")


def test_kernels_are_swapped_modules_that_hold_no_weights():
    """The kernel is a submodule of each block's attention: swapping it changes neither the parameters (the same
    Parameter objects) nor the state dict, and swapping back gives the library module again."""
    from earlyfusion.model.decoder import ScaledDotProduct
    from earlyfusion.model.kernels import BlockedAttention

    model = make("library")
    params = dict(model.named_parameters())
    state = set(model.state_dict())
    use_attention(model, "blocked")
    assert all(isinstance(b.attn.attend, BlockedAttention) for b in model.layers)
    assert dict(model.named_parameters()) == params and set(model.state_dict()) == state
    use_attention(model, "library")
    assert all(type(b.attn.attend) is ScaledDotProduct for b in model.layers)


def test_plan_keeps_the_faster_kernel_and_remembers_it(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs["precision"])
        return {"library": 0.020, "blocked": 0.010} if kwargs["precision"] == "bf16" else {"library": 0.010, "blocked": 0.030}

    monkeypatch.setattr(plan_mod, "time_kernels", fake)
    model = make("library")
    plan = attention_plan(model, 2, 64, precision="bf16", packed=True)
    assert plan.kernel == "blocked" and attention_kernel(model) == "blocked"
    assert plan.ms == {"library": 20.0, "blocked": 10.0} and "blocked 10.0" in plan.describe()
    assert attention_plan(model, 2, 64, precision="no", packed=True).kernel == "library"
    assert attention_kernel(model) == "library"
    attention_plan(model, 2, 64, precision="bf16", packed=True)  # remembered: not timed again
    assert calls == ["bf16", "no"] and attention_kernel(model) == "blocked"


def test_plan_times_compiled_kernels_for_a_compiled_run(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs["compile"])
        return {"library": 0.010, "blocked": 0.020} if kwargs["compile"] else {"library": 0.020, "blocked": 0.010}

    monkeypatch.setattr(plan_mod, "time_kernels", fake)
    model = make("library")
    assert attention_plan(model, 2, 64, precision="bf16", packed=True).kernel == "blocked"
    assert attention_plan(model, 2, 64, precision="bf16", packed=True, compile=True).kernel == "library"
    assert seen == [False, True] and attention_kernel(model) == "library"


def test_plan_real_compiled_timing_runs(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    ms = plan_mod.time_kernels(1, 32, 2, 2, 8, precision="bf16", packed=True, compile=True)
    assert set(ms) == {"library", "blocked"} and all(t > 0 for t in ms.values())


def test_plan_real_timing_runs(monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    plan = attention_plan(make("library"), 2, 32, precision="no", packed=False)
    assert plan.kernel in ("library", "blocked") and set(plan.ms) == {"library", "blocked"}
    assert all(t > 0 for t in plan.ms.values())


def test_plan_pin_long_sequences_and_bad_pin(monkeypatch):
    model = make("library")
    monkeypatch.setenv(PIN_ENV, "blocked")
    assert attention_plan(model, 1, 64, precision="no", packed=False).kernel == "blocked"
    monkeypatch.setenv(PIN_ENV, "fastest")
    with pytest.raises(ValueError, match=PIN_ENV):
        attention_plan(model, 1, 64, precision="no", packed=False)
    monkeypatch.delenv(PIN_ENV)
    monkeypatch.setattr(plan_mod, "time_kernels", lambda *a, **k: pytest.fail("must not time"))
    long = plan_mod.BLOCKED_MAX_LEN + 1
    plan = attention_plan(model, 1, long, precision="bf16", packed=True)
    assert plan.kernel == "library" and plan.ms is None and str(long) in plan.describe()


def test_keep_freed_memory_leaves_a_users_setting_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    for key in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    import ctypes.util

    glibc = ctypes.util.find_library("c") is not None and "glibc" in " ".join(__import__("platform").libc_ver())
    assert keep_freed_memory() is glibc


def test_a_resumed_run_keeps_its_kernel(monkeypatch):
    monkeypatch.setenv(PIN_ENV, "library")
    monkeypatch.setattr(plan_mod, "time_kernels", lambda *a, **k: pytest.fail("must not time"))
    model = make("library")
    plan = attention_plan(model, 2, 64, precision="bf16", packed=True, kernel="blocked")
    assert plan.kernel == "blocked" == attention_kernel(model) and "started with" in plan.describe()
    with pytest.raises(ValueError, match="not one of"):
        attention_plan(model, 2, 64, precision="bf16", packed=True, kernel="flash")
