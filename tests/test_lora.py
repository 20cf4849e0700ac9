"""train --trainable lora: peft's LoRA on a trained run's projections; only the adapters train and are saved (with a
pointer to the base run); sample/eval/--init-from load base + adapters merged; export writes the merged weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TinyPipeline, assert_one_line_error, cli_status, run_cli
from earlyfusion.core.checkpoint import latest_good, read_weights
from earlyfusion.core.rundir import ADAPTERS, WEIGHTS, resolve_checkpoint
from earlyfusion.training.data.runs import load_run

pytest.importorskip("peft")


def _lora_argv(p: TinyPipeline, out, steps: int, *extra) -> list:
    return ["train", "--data", p.data, "--init-from", p.lm, "--trainable", "lora", "--lora-rank", 4, "--out", out,
            "--steps", steps, "--batch-size", 4, "--warmup-steps", 1, "--eval-every", 0, "--checkpoint-every", 4,
            "--lr", 1e-2, *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline: TinyPipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    run_cli(*_lora_argv(tiny_pipeline, out, 8))
    return out


def test_only_adapters_are_saved_and_they_changed(tiny_pipeline: TinyPipeline, lora_run):
    ckpt = latest_good(lora_run / "checkpoints")
    assert not (ckpt / WEIGHTS).exists() and (ckpt / ADAPTERS).is_file()
    adapters = read_weights(ckpt / ADAPTERS)
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if ".lora_B." in k)  # B starts at zero
    lora = json.loads((ckpt / "config.json").read_text())["lora"]
    assert lora["rank"] == 4 and lora["base"] == str(resolve_checkpoint(tiny_pipeline.lm)[1].resolve())


def test_merged_run_differs_from_base_only_in_the_adapted_projections(tiny_pipeline: TinyPipeline, lora_run):
    base, tuned = load_run(tiny_pipeline.lm), load_run(lora_run)
    b, t = base.decoder.state_dict(), tuned.decoder.state_dict()
    assert set(b) == set(t)
    for k in b:
        adapted = any(f".{name}.weight" in k for name in ("qkv", "proj", "gate_up", "down"))
        assert torch.equal(b[k], t[k]) != adapted, k
    assert all(type(m) is torch.nn.Linear for m in tuned.decoder.modules() if isinstance(m, torch.nn.Linear))


def test_sample_and_export_use_the_merged_weights(tiny_pipeline: TinyPipeline, lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_cli("sample", "--checkpoint", lora_run, "--prompt", "a red circle", "--max-new-tokens", 4)
    run_cli("export", "--checkpoint", lora_run, "--out", tmp_path / "hf")
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    ours = load_run(lora_run).decoder.eval()
    x = torch.randint(0, 300, (1, 12))  # text ids: the image-logit mask of transformers' Chameleon does not apply
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours(x)
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[load_run(lora_run).vocab.image_range] = False  # transformers masks image logits
    torch.testing.assert_close(got[..., keep], ref[..., keep], rtol=1e-4, atol=1e-4)


def test_lora_resumes_exactly(lora_run, tiny_pipeline: TinyPipeline, tmp_path):
    """The run cut back to its step-4 checkpoint (as a kill after it leaves it) resumes to the same losses."""
    cut = tmp_path / "cut"
    shutil.copytree(lora_run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    run_cli(*_lora_argv(tiny_pipeline, cut, 8, "--resume"))
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (lora_run, cut)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]


def test_lora_needs_an_init_run(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    argv = _lora_argv(tiny_pipeline, tmp_path / "x", 2)
    i = argv.index("--init-from")
    del argv[i:i + 2]
    rc, err = cli_status(capsys, [*argv, "--image-tokenizer", tiny_pipeline.vq, "--vocab", tiny_pipeline.vocab])
    assert_one_line_error(rc, err)
    assert "--init-from" in err
