"""The decoder's recipe against memorising a small data set: the context check at train start, the best model by
held-out loss (LMRUN/best, --final, resume), the epochs a run makes, and augmentation through the trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TinyPipeline, assert_one_line_error, cli_status, run_cli, tiny_train_argv
from earlyfusion.core.checkpoint import read_weights, step_dirs
from earlyfusion.tokenizer.vocab import Vocabulary


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_weights(a / "model.safetensors"), read_weights(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def said():
    """The messages of the project's logger during a test (it does not propagate to pytest's caplog)."""
    logger, handler = logging.getLogger("earlyfusion"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _longest_pair(p: TinyPipeline) -> int:
    """Tokens of the longest pair document of the training split, counted here from the captions."""
    vocab = Vocabulary.load(p.vocab)
    caps = [json.loads(line)["text"] for line in (p.data / "train" / "metadata.jsonl").read_text().splitlines()]
    return max(len(ids) for ids in vocab.encode_texts(caps)) + vocab.tokens_per_image + 4


# ---------------------------------------------------------------- the context


def test_context_that_cannot_hold_one_image_is_one_line(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    need = Vocabulary.load(tiny_pipeline.vocab).tokens_per_image + 4
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, tmp_path / "lm", 2, "--context-len", need - 1))
    assert_one_line_error(rc, err)
    assert f"--context-len {need - 1} cannot hold one image" in err and f"needs {need} tokens" in err
    assert f"--context-len {need} or more" in err
    assert not (tmp_path / "lm").exists()


def test_context_that_cannot_hold_the_longest_caption_is_one_line(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    need = _longest_pair(tiny_pipeline)
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, tmp_path / "short", 2, "--context-len", need - 1))
    assert_one_line_error(rc, err)
    assert f"needs {need} tokens" in err and f"--context-len {need} or more" in err and "metadata.jsonl" in err
    run_cli(*tiny_train_argv(tiny_pipeline, tmp_path / "fits", 2, "--context-len", need))  # exactly enough trains


def test_context_error_names_the_presets_that_hold_it():
    from earlyfusion.training.sizing import context_error, preset_context

    msg = context_error(context_len=128, given=False, max_seq_len=128, preset="tiny", need=300, what="one image")
    assert "preset tiny" in msg and "needs 300 tokens" in msg and "--context-len" not in msg.split(";")[1]
    assert f"base ({preset_context('base')})" in msg and "small" not in msg
    msg = context_error(context_len=40, given=True, max_seq_len=128, preset="tiny", need=60, what="one image")
    assert msg.startswith("--context-len 40 cannot hold one image") and "--context-len 60 or more" in msg


# ---------------------------------------------------------------- the best model


def test_best_is_the_step_with_the_lowest_heldout_loss(tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 12, "--eval-every", 2, "--checkpoint-every", 2, "--keep-checkpoints", 10,
                             "--lr", 3e-2))
    rows = [r for r in _rows(out) if "val_loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    for r in rows:
        assert r["val_loss"] == pytest.approx(r["val_loss_text"] + r["val_loss_image"])
    best = min(rows, key=lambda r: r["val_loss"])
    saved = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert saved["step"] == best["step"] and saved["heldout"]["loss_image"] == best["val_loss_image"]
    assert _same_weights(out / "checkpoints" / "best", out / "checkpoints" / f"step-{best['step']:08d}")
    # --final best (the default): the run's model is the best one
    assert json.loads((out / "final.json").read_text()) == {"checkpoint": "best"}


class _ScriptedValidation:
    """validation_losses replaced by a script of held-out scores (one per validation, in order)."""

    def __init__(self, monkeypatch, scores: list[float]):
        from earlyfusion.training import lm_train

        self.scores = list(scores)
        monkeypatch.setattr(lm_train, "validation_losses", self)

    def __call__(self, *args, **kwargs) -> dict:
        s = self.scores.pop(0)
        return {"loss_text": s / 4, "loss_image": 3 * s / 4, "unigram_text": 1.0, "unigram_image": 4.0}


def _cfg(p: TinyPipeline, out: Path, **kw):
    from earlyfusion.training.data import DataConfig
    from earlyfusion.training.lm_config import TrainConfig

    kw = {"final": "best", "keep_checkpoints": 10, **kw}
    return TrainConfig(data=DataConfig(sources=[str(p.data)]), image_tokenizer=str(p.vq), vocab=str(p.vocab), out=str(out),
                       preset="tiny", steps=16, batch_size=4, warmup_steps=2, eval_every=4, checkpoint_every=4, lr=3e-3,
                       **kw)


def test_final_best_is_what_load_run_returns_and_the_turn_is_said_once(tiny_pipeline: TinyPipeline, tmp_path,
                                                                        monkeypatch, said):
    from earlyfusion.training.data.runs import load_run
    from earlyfusion.training.lm_train import train

    out = tmp_path / "lm"
    _ScriptedValidation(monkeypatch, [3.0, 2.0, 2.5, 2.6])  # best at step 8; 25 % above it at step 12
    train(_cfg(tiny_pipeline, out))
    assert [r["val_loss"] for r in _rows(out) if "val_loss" in r] == [3.0, 2.0, 2.5, 2.6]
    turned = [line for line in said if "turned up" in line]
    assert len(turned) == 1 and "at step 12" in turned[0] and "step 8" in turned[0], turned
    assert json.loads((out / "checkpoints" / "best" / "config.json").read_text())["step"] == 8
    assert _same_weights(out / "checkpoints" / "best", out / "checkpoints" / "step-00000008")
    assert json.loads((out / "final.json").read_text()) == {"checkpoint": "best"}
    run = load_run(out)
    assert run.path == out / "checkpoints" / "best" and run.config["step"] == 8
    want = read_weights(out / "checkpoints" / "step-00000008" / "model.safetensors")
    assert all(torch.equal(v, want[k]) for k, v in run.decoder.state_dict().items() if k in want)
    assert load_run(out / "checkpoints" / "best").path == out / "checkpoints" / "best"
    assert load_run(out / "checkpoints" / "step-00000016").config["step"] == 16
    # a damaged best/ is an error, not a silent fall-back to another model
    (out / "checkpoints" / "best" / "model.safetensors").write_bytes(b"\0" * 8)
    from earlyfusion.core.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="final model"):
        load_run(out)


def test_final_last_leaves_load_run_on_the_last_step(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    from earlyfusion.training.data.runs import load_run
    from earlyfusion.training.lm_train import train

    out = tmp_path / "lm"
    _ScriptedValidation(monkeypatch, [3.0, 2.0, 2.5, 2.6])
    train(_cfg(tiny_pipeline, out, final="last", keep_checkpoints=1))
    assert [d.name for d in step_dirs(out / "checkpoints")] == ["step-00000016"]  # pruning leaves best alone
    assert json.loads((out / "checkpoints" / "best" / "config.json").read_text())["step"] == 8
    assert not (out / "final.json").exists() and load_run(out).config["step"] == 16


class _Killed(Exception):
    pass


def _die_after_checkpoint(monkeypatch, at: int):
    """Make training stop (raise _Killed) right after checkpoint ``at`` is written, as a kill would; returns the undo."""
    from earlyfusion.training.trainer import Trainer

    real_save = Trainer.save

    def save_then_die(self, step, *args, **kwargs):
        dest = real_save(self, step, *args, **kwargs)
        if step == at:
            raise _Killed
        return dest

    monkeypatch.setattr(Trainer, "save", save_then_die)
    return lambda: monkeypatch.setattr(Trainer, "save", real_save)


def _killed_then_resumed(p: TinyPipeline, out: Path, monkeypatch, said, between) -> None:
    """A run killed after its step-12 checkpoint, validating 3.0, 2.0, 2.5 at steps 4, 8, 12; ``between()``; then
    resumed, validating once more at step 16 (2.1: above step 8's 2.0), with ``said`` cleared before the resume."""
    from earlyfusion.training.lm_train import train

    undo = _die_after_checkpoint(monkeypatch, 12)
    _ScriptedValidation(monkeypatch, [3.0, 2.0, 2.5])
    with pytest.raises(_Killed):
        train(_cfg(p, out))
    undo()
    between()
    _ScriptedValidation(monkeypatch, [2.1])
    said.clear()
    train(_cfg(p, out, resume=True))


def test_resume_keeps_the_best_so_far(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch, said):
    out = tmp_path / "lm"

    def killed() -> None:
        assert not (out / "final.json").exists()

    _killed_then_resumed(tiny_pipeline, out, monkeypatch, said, between=killed)
    assert json.loads((out / "checkpoints" / "best" / "config.json").read_text())["step"] == 8
    assert _same_weights(out / "checkpoints" / "best", out / "checkpoints" / "step-00000008")
    assert json.loads((out / "final.json").read_text()) == {"checkpoint": "best"}
    assert any("resumed" in line for line in said)
    assert not [line for line in said if "turned up" in line]  # said once, before the kill
    assert [r["val_loss"] for r in _rows(out) if "val_loss" in r] == [3.0, 2.0, 2.5, 2.1]


def test_resume_on_other_heldout_pairs_chooses_the_best_again(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch, said):
    """A data directory whose held-out pairs changed (its val split gone: validation moves to test) between a run and
    its resume: the scores do not compare, so the best-so-far is dropped (said) and the next validation is the best."""
    data = tmp_path / "data"
    shutil.copytree(tiny_pipeline.data, data, ignore=shutil.ignore_patterns(".earlyfusion-cache"))
    p = dataclasses.replace(tiny_pipeline, data=data)
    out = tmp_path / "lm"
    _killed_then_resumed(p, out, monkeypatch, said, between=lambda: shutil.rmtree(data / "val"))
    assert any("other held-out pairs" in line and "val" in line and "test" in line for line in said)
    assert json.loads((out / "checkpoints" / "best" / "config.json").read_text())["step"] == 16


def test_exact_resume_with_dropout_across_validations(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    """Dropout draws from the torch RNG: nothing else may draw from it after the seed (a validation's sheet loads
    the image tokenizer), or a resumed run, which loads it again, would draw other masks."""
    from earlyfusion.training import lm_train

    cfg = dict(final="last", dropout=0.2)
    lm_train.train(_cfg(tiny_pipeline, tmp_path / "full", **cfg))
    undo = _die_after_checkpoint(monkeypatch, 8)
    with pytest.raises(_Killed):
        lm_train.train(_cfg(tiny_pipeline, tmp_path / "killed", **cfg))
    undo()
    lm_train.train(_cfg(tiny_pipeline, tmp_path / "killed", resume=True, **cfg))
    full, resumed = _rows(tmp_path / "full"), _rows(tmp_path / "killed")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full]


# ---------------------------------------------------------------- steps sized to the data


def test_epoch_estimate_matches_the_batches_and_warns_when_many(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    from earlyfusion.training import sizing
    from earlyfusion.training.data import DataConfig, training_batches

    vocab = Vocabulary.load(tiny_pipeline.vocab)
    b = training_batches(DataConfig(sources=[str(tiny_pipeline.data)], cache_dir=str(tmp_path / "c")), vocab=vocab,
                         image_tokenizer=tiny_pipeline.vq, context_len=128, batch_size=4, seed=0)
    steps = 60
    est = dict(sizing.epochs(b.data, vocab, steps=steps, batch_size=4, context_len=128))
    starts = []
    for _ in range(steps):
        batch = next(b)
        starts.append(int(((batch["positions"] == 0) & (batch["doc_ids"] >= 0)).sum()))
    drawn = sum(starts)
    want = sum(est[p.name] * len(p) for p in b.data.parts)
    assert 0.85 * want <= drawn <= 1.02 * want, (drawn, want)  # padding only ever makes it fewer
    warnings, infos = [], []
    monkeypatch.setattr(sizing.log, "warning", lambda msg, *a: warnings.append(msg % a))
    monkeypatch.setattr(sizing.log, "info", lambda msg, *a: infos.append(msg % a))
    sizing.say_epochs(b.data, vocab, steps=steps, batch_size=4, context_len=128)
    assert len(infos) == 1 and "epochs of" in infos[0] and not warnings
    many = int(steps * (sizing.MANY_PASSES + 1) / max(est.values())) + 1
    sizing.say_epochs(b.data, vocab, steps=many, batch_size=4, context_len=128)
    assert len(warnings) == 1 and f"more than {sizing.MANY_PASSES}" in warnings[0]


# ---------------------------------------------------------------- augmentation through the trainer


def test_unset_augment_views_is_sized_to_the_passes():
    from earlyfusion.training.data import DataConfig
    from earlyfusion.training.sizing import MANY_PASSES, repeats_too_often

    assert not repeats_too_often(MANY_PASSES) and repeats_too_often(MANY_PASSES + 1)
    unset = DataConfig(sources=["x"])
    few, many = unset.sized(False, mirror_safe=True), unset.sized(True, mirror_safe=True)
    assert (few.augment_views, few.augment_flip) == (1, False) and few.augment(0).active is False
    assert (many.augment_views, many.augment_scale, many.augment_flip) == (2, 1.0, True)
    assert many.augment(3).mirrored(1) and many.augment(3).swap == (("left", "right"),)
    unsafe = unset.sized(True, mirror_safe=False)  # data whose meaning a mirror may change: never mirrored unasked
    assert (unsafe.augment_views, unsafe.augment_flip) == (1, False)
    assert DataConfig(sources=["x"], augment_views=1).sized(True, True).augment_views == 1  # a given value stays
    assert DataConfig(sources=["x"], augment_views=3).sized(False, True).augment_views == 3


def test_mirrored_views_only_for_data_known_to_be_mirror_safe(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch,
                                                               caplog):
    """Any data but the built-in shapes data (here the same pictures as a user's imagefolder, without the built-in
    marker) is not mirrored when its pairs repeat often; the image-token noise, which keeps meaning, still comes."""
    from earlyfusion.training import sizing

    assert sizing.mirror_safe([str(tiny_pipeline.data)])
    data = tmp_path / "mine"
    shutil.copytree(tiny_pipeline.data, data, ignore=shutil.ignore_patterns(".earlyfusion-cache", "shapes.json"))
    assert not sizing.mirror_safe([str(data)])
    monkeypatch.setattr(sizing, "MANY_PASSES", 0)
    out = tmp_path / "lm"
    argv = tiny_train_argv(tiny_pipeline, out, 2, "--cache-dir", tmp_path / "cache")
    argv[argv.index("--data") + 1] = data
    with caplog.at_level("INFO"):
        run_cli(*argv)
    said = [r.getMessage() for r in caplog.records if "would be seen about" in r.getMessage()]
    assert len(said) == 1 and "mirror" not in said[0] and "random codes" in said[0]
    saved = json.loads((out / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert (saved["train"]["data"]["augment_views"], saved["train"]["data"]["augment_flip"]) == (1, False)


def test_trainer_adds_mirrored_views_when_pairs_repeat_and_records_the_choice(tiny_pipeline: TinyPipeline, tmp_path,
                                                                             capsys, monkeypatch, caplog):
    from earlyfusion.training import sizing

    monkeypatch.setattr(sizing, "MANY_PASSES", 0)  # any run repeats its pairs "too often"
    out = tmp_path / "lm"
    with caplog.at_level("INFO"):
        run_cli(*tiny_train_argv(tiny_pipeline, out, 4, "--cache-dir", tmp_path / "cache"))
    sized = [r.getMessage() for r in caplog.records if "would be seen about" in r.getMessage()]
    assert len(sized) == 1 and "mirror image" in sized[0] and "random codes" in sized[0]  # one line says both
    assert any("each of its 2 grids per image" in r.getMessage() for r in caplog.records)
    data = json.loads((out / "checkpoints" / "step-00000004" / "config.json").read_text())["train"]["data"]
    assert (data["augment_views"], data["augment_scale"], data["augment_flip"]) == (2, 1.0, True)
    identity = json.loads((out / "checkpoints" / "step-00000004" / "config.json").read_text())["identity"]
    assert identity["image_token_noise"] == sizing.SIZED_IMAGE_TOKEN_NOISE > 0
    # the same command resumes (the same decision); an explicit other choice is refused
    run_cli(*tiny_train_argv(tiny_pipeline, out, 8, "--cache-dir", tmp_path / "cache", "--resume"))
    assert [r["step"] for r in _rows(out)] == list(range(1, 9))
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 12, "--augment-views", 1, "--cache-dir",
                                                 tmp_path / "cache", "--resume"))
    assert_one_line_error(rc, err)
    assert "augment_views 2 (now 1)" in err
    monkeypatch.setattr(sizing, "MANY_PASSES", 10 ** 9)
    run_cli(*tiny_train_argv(tiny_pipeline, tmp_path / "few", 2, "--cache-dir", tmp_path / "cache"))
    few = json.loads((tmp_path / "few" / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert (few["train"]["data"]["augment_views"], few["train"]["data"]["augment_flip"]) == (1, False)
    assert few["identity"]["image_token_noise"] == 0


def test_training_with_augmented_views_and_its_identity(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4, "--augment-views", 3, "--augment-flip",
                             "--cache-dir", tmp_path / "cache"))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 8, "--augment-views", 2, "--augment-flip",
                                                 "--cache-dir", tmp_path / "cache", "--resume"))
    assert_one_line_error(rc, err)
    assert "augment_views 3 (now 2)" in err
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 8, "--augment-flip"))
    assert_one_line_error(rc, err)
    assert "--augment-views" in err
