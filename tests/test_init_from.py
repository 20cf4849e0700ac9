"""`train --init-from RUN`: start from another run's weights (its shape, vocabulary and image tokenizer), optionally
training only the image-id columns of the output layer (`--trainable image-head`); resume and option errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TinyPipeline, assert_one_line_error, cli_status, run_cli, tiny_train_argv
from earlyfusion.core.checkpoint import latest_good, load_state, read_weights, save_weights, write_manifest
from earlyfusion.core.rundir import resolve_checkpoint
from earlyfusion.tokenizer.vocab import Vocabulary


def _init_argv(p: TinyPipeline, out: Path, steps: int, *extra) -> list:
    """Like ``tiny_train_argv`` but from the session's trained tiny run, without --vocab/--image-tokenizer/--preset."""
    return ["train", "--data", p.data, "--init-from", p.lm, "--out", out, "--steps", steps, "--batch-size", 4,
            "--warmup-steps", 2, "--eval-every", 0, "--checkpoint-every", 4, "--lr", 3e-3, *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _one_line_error(capsys, argv, *words) -> None:
    rc, err = cli_status(capsys, argv)
    assert_one_line_error(rc, err)
    for w in words:
        assert w in err, (w, err)


def test_init_from_starts_from_the_run_and_keeps_learning(tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "ft"
    run_cli(*_init_argv(tiny_pipeline, out, 16))
    losses = [loss for _, loss in _losses(out)]
    fresh = _losses(tiny_pipeline.lm)[0][1]  # the init run's own first step: a fresh model on the same first batch
    assert losses[0] < 0.8 * fresh, (losses[0], fresh)
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    # the run is self-contained: the init run's vocabulary, image tokenizer and shape
    saved = json.loads((latest_good(out / "checkpoints") / "config.json").read_text())
    init_cfg = json.loads((resolve_checkpoint(tiny_pipeline.lm)[1] / "config.json").read_text())
    assert saved["decoder"] == init_cfg["decoder"]
    assert saved["identity"]["init_from"] == str(resolve_checkpoint(tiny_pipeline.lm)[1].resolve())
    assert len(saved["identity"]["init_weights"]) == 64 and saved["identity"]["trainable"] == "all"
    assert Vocabulary.load(out / "vocab").layout == Vocabulary.load(tiny_pipeline.vocab).layout
    assert (out / "image_tokenizer" / "config.json").read_bytes() == (tiny_pipeline.lm / "image_tokenizer" / "config.json").read_bytes()


def test_init_from_loads_the_weights_exactly(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    """The model the first step runs is the init run's, tensor for tensor (bf16 files load into fp32 masters)."""
    from earlyfusion.training import lm_train

    init = tmp_path / "bf16"  # a copy of the tiny run whose weights file holds bf16, like an imported checkpoint
    shutil.copytree(tiny_pipeline.lm, init)
    ckpt = resolve_checkpoint(init)[1]
    weights = {k: v.to(torch.bfloat16) for k, v in read_weights(ckpt / "model.safetensors").items()}
    save_weights(ckpt / "model.safetensors", weights)
    write_manifest(ckpt)

    seen = {}
    real = lm_train.make_optimizer

    def spy(model, cfg):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, cfg)

    monkeypatch.setattr(lm_train, "make_optimizer", spy)
    argv = _init_argv(tiny_pipeline, tmp_path / "ft", 1)
    argv[argv.index("--init-from") + 1] = ckpt  # a step directory works as well as the run root
    run_cli(*argv)
    assert set(seen) == set(weights)
    for k, v in weights.items():
        assert seen[k].dtype == torch.float32 and torch.equal(seen[k], v.float()), k


def test_image_head_trains_only_the_image_columns(tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "head"
    run_cli(*_init_argv(tiny_pipeline, out, 8, "--trainable", "image-head", "--weight-decay", 0.5))
    before = read_weights(resolve_checkpoint(tiny_pipeline.lm)[1] / "model.safetensors")
    ckpt = latest_good(out / "checkpoints")
    after = read_weights(ckpt / "model.safetensors")
    assert set(before) == set(after)
    for k in before:
        if k != "output.weight":
            assert torch.equal(before[k], after[k]), k
    vocab = Vocabulary.load(tiny_pipeline.vocab)
    img = vocab.image_range
    w0, w1 = before["output.weight"], after["output.weight"]  # (vocab_size, dim): one row per id
    assert w0.shape == (vocab.vocab_size, w0.shape[1])
    assert torch.equal(w0[:img.start], w1[:img.start]) and torch.equal(w0[img.stop:], w1[img.stop:])
    changed = (w0[img.start:img.stop] != w1[img.start:img.stop]).any(dim=1)
    assert changed.sum() > len(img) // 2, changed
    opt = load_state(ckpt, "state")["optimizer"]
    assert len(opt["state"]) == 1 and [len(g["params"]) for g in opt["param_groups"]] == [1]
    assert opt["param_groups"][0]["weight_decay"] == 0.0


@pytest.mark.parametrize("trainable", ["all", "image-head"])
def test_resume_of_an_init_from_run_continues_exactly(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch, capsys, trainable):
    from earlyfusion.training import lm_train

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(*_init_argv(tiny_pipeline, full, 10, "--trainable", trainable))

    class Killed(Exception):
        pass

    real, calls = lm_train.lm_loss, [0]

    def dies_at_step_7(*args, **kwargs):  # one loss call per step: the run stops after checkpoint step-4 (and 6 steps)
        calls[0] += 1
        if calls[0] == 7:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_train, "lm_loss", dies_at_step_7)
    with pytest.raises(Killed):
        run_cli(*_init_argv(tiny_pipeline, cut, 10, "--trainable", trainable))
    monkeypatch.setattr(lm_train, "lm_loss", real)
    assert latest_good(cut / "checkpoints").name == "step-00000004" and len(_losses(cut)) == 6

    other = "all" if trainable == "image-head" else "image-head"
    _one_line_error(capsys, [*_init_argv(tiny_pipeline, cut, 10, "--trainable", other), "--resume"], "trainable")
    run_cli(*_init_argv(tiny_pipeline, cut, 10, "--trainable", trainable), "--resume")
    assert _losses(cut) == _losses(full)


def test_option_errors_are_one_line(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "out"
    no_vocab = tiny_train_argv(tiny_pipeline, out, 4)
    i = no_vocab.index("--vocab")
    del no_vocab[i:i + 2]
    _one_line_error(capsys, no_vocab, "--vocab")
    _one_line_error(capsys, [*tiny_train_argv(tiny_pipeline, out, 4), "--trainable", "image-head"], "--init-from")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    for path in (not_a_run, tiny_pipeline.data, tmp_path / "missing"):
        argv = _init_argv(tiny_pipeline, out, 4)
        argv[argv.index("--init-from") + 1] = path
        _one_line_error(capsys, argv, str(path))
    _one_line_error(capsys, [*_init_argv(tiny_pipeline, out, 4), "--preset", "small"], "--preset small", "dim")
    _one_line_error(capsys, [*_init_argv(tiny_pipeline, out, 4), "--image-positions"], "--image-positions", "without")
    other_vocab = tmp_path / "vocab2"  # a vocabulary that is not the run's
    run_cli("vocab", "build", "--image-tokenizer", tiny_pipeline.vq, "--data", tiny_pipeline.data, "--out", other_vocab,
            "--text-vocab-size", 280)
    _one_line_error(capsys, [*_init_argv(tiny_pipeline, out, 4), "--vocab", other_vocab], "--vocab")
    assert not out.exists()
    # the run's own vocabulary, image tokenizer and preset are accepted
    run_cli(*_init_argv(tiny_pipeline, out, 1), "--vocab", tiny_pipeline.vocab, "--image-tokenizer", tiny_pipeline.vq,
            "--preset", "tiny")
