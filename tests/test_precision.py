"""--mixed-precision: auto picks bf16 autocast exactly where bf16 products are fast; weights and losses stay fp32."""

from __future__ import annotations

import json

import pytest
import torch

from earlyfusion.core.runtime import FAST_BF16_ENV, cpu_has_fast_bf16, mixed_precision

from conftest import run_cli, tiny_train_argv


@pytest.mark.parametrize("forced, expected", [("1", "bf16"), ("0", "no")])
def test_auto_follows_the_cpu_capability(monkeypatch, forced, expected):
    monkeypatch.setenv(FAST_BF16_ENV, forced)
    assert cpu_has_fast_bf16() is (forced == "1")
    mode, why = mixed_precision("auto", "cpu")
    assert mode == expected
    assert ("bf16" in why) if expected == "bf16" else why.startswith("fp32")


def test_explicit_choice_wins(monkeypatch):
    monkeypatch.setenv(FAST_BF16_ENV, "1")
    assert mixed_precision("no", "cpu")[0] == "no"
    monkeypatch.setenv(FAST_BF16_ENV, "0")
    assert mixed_precision("bf16", "cpu")[0] == "bf16"
    with pytest.raises(ValueError):
        mixed_precision("fp16", "cpu")


def test_detection_reads_the_cpu(monkeypatch):
    """Without the override the answer is the CPU's AMX / AVX512-BF16 flags, as torch reports them."""
    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    caps = torch.cpu.get_capabilities()
    assert cpu_has_fast_bf16() is bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


@pytest.mark.parametrize("forced", ["1", "0"])
def test_training_runs_in_the_chosen_precision(tiny_pipeline, tmp_path, monkeypatch, caplog, forced):
    """Both branches train, log their choice once, keep fp32 master weights and lower the loss."""
    monkeypatch.setenv(FAST_BF16_ENV, forced)
    out = tmp_path / "lm"
    with caplog.at_level("INFO", logger="earlyfusion"):
        run_cli(*tiny_train_argv(tiny_pipeline, out, 12))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(lines) == 1 and (("bf16 autocast" in lines[0]) is (forced == "1")), lines
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert len(chosen) == 1 and ("library" in chosen[0] or "blocked" in chosen[0]), chosen
    from safetensors.torch import load_file

    from earlyfusion.core.checkpoint import latest_good

    weights = load_file(str(latest_good(out / "checkpoints") / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("forced", ["1", "0"])
def test_sampling_runs_in_the_chosen_precision(tiny_pipeline, monkeypatch, capsys, caplog, forced):
    """`sample` logs its precision once and samples in either; the decoder's weights are left as they were."""
    monkeypatch.setenv(FAST_BF16_ENV, forced)
    seen = []
    from earlyfusion.model.decoder import Decoder

    real = Decoder.forward

    def spy(self, tokens, **kw):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(self, tokens, **kw)

    monkeypatch.setattr(Decoder, "forward", spy)
    with caplog.at_level("INFO", logger="earlyfusion"):
        run_cli("sample", "--checkpoint", tiny_pipeline.lm, "--prompt", "a", "--max-new-tokens", 4, "--seed", 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert len(lines) == 1 and (("bf16 autocast" in lines[0]) is (forced == "1"))
    assert seen and set(seen) == ({torch.bfloat16} if forced == "1" else {False})
