"""Decoder training: loss falls, exact resume after SIGKILL, non-finite guard, mismatch errors, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TinyPipeline, run_cli, tiny_train_argv
from earlyfusion.core.errors import UserError
from earlyfusion.core.checkpoint import latest_good, step_dirs
from earlyfusion.training.data import DataConfig

REPO = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_training_lowers_loss_and_writes_run(tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 40))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("loss", "loss_text", "loss_image", "z_loss", "grad_norm", "out_norm", "tokens_per_s", "lr"):
        assert key in rows[0]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert "val_loss_text" in rows[-1] and "val_loss_image" in rows[-1]
    ckpt = latest_good(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000040"
    assert (out / "vocab" / "tokenizer.json").is_file() and (out / "image_tokenizer" / "config.json").is_file()
    assert (out / "loss_curves.png").is_file()
    assert list((out / "samples").glob("*.png"))


def test_exact_resume_after_sigkill(tiny_pipeline: TinyPipeline, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli(*tiny_train_argv(tiny_pipeline, full, 16))

    argv = [sys.executable, "-m", "earlyfusion.cli", *map(str, tiny_train_argv(tiny_pipeline, killed, 16))]
    env = {**os.environ, "OMP_NUM_THREADS": str(__import__("torch").get_num_threads())}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(d.name == "step-00000008" for d in step_dirs(killed / "checkpoints")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_good(killed / "checkpoints") is not None

    run_cli(*tiny_train_argv(tiny_pipeline, killed, 16), "--resume")
    assert _losses(killed) == _losses(full)


def test_resume_falls_back_past_corrupted_checkpoint(tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 8))
    newest = step_dirs(out / "checkpoints")[0]
    (newest / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_good(out / "checkpoints").name == "step-00000004"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 8), "--resume")
    assert latest_good(out / "checkpoints").name == "step-00000008"


def test_image_token_noise_touches_only_codes_being_drawn():
    """Only image codes with a target (a picture being drawn) are replaced, by image codes, at about the rate
    asked; the draw depends on (seed, step) alone; a rate of 0 changes nothing."""
    import torch

    from earlyfusion.training.data import noisy_image_codes

    image_ids = range(100, 164)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (8, 512), generator=g)
    targets = torch.where(torch.rand(tokens.shape, generator=g) < 0.3, -100, tokens.roll(-1, 1))
    noisy = noisy_image_codes(tokens, targets, image_ids, 0.25, seed=3, step=7)
    drawn = (tokens >= 100) & (tokens < 164) & (targets != -100)
    changed = noisy != tokens
    assert not (changed & ~drawn).any()
    assert ((noisy[changed] >= 100) & (noisy[changed] < 164)).all()
    rate = changed.sum().item() / drawn.sum().item()
    assert 0.2 < rate < 0.25  # a drawn code may be replaced by itself (1 in 64)
    assert torch.equal(noisy, noisy_image_codes(tokens, targets, image_ids, 0.25, seed=3, step=7))
    assert not torch.equal(noisy, noisy_image_codes(tokens, targets, image_ids, 0.25, seed=3, step=8))
    assert torch.equal(noisy_image_codes(tokens, targets, image_ids, 0.0, seed=3, step=7), tokens)


def test_image_token_noise_trains_differently_and_resumes_exactly(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    plain, noisy = tmp_path / "plain", tmp_path / "noisy"
    run_cli(*tiny_train_argv(tiny_pipeline, plain, 8))
    run_cli(*tiny_train_argv(tiny_pipeline, noisy, 8, "--image-token-noise", 0.3))
    assert [loss for _, loss in _losses(noisy)] != [loss for _, loss in _losses(plain)]
    resumed = tmp_path / "resumed"
    shutil.copytree(noisy, resumed)
    (step_dirs(resumed / "checkpoints")[0] / "model.safetensors").write_bytes(b"\0" * 10)  # back to step 4
    run_cli(*tiny_train_argv(tiny_pipeline, resumed, 8, "--image-token-noise", 0.3), "--resume")
    assert _losses(resumed) == _losses(noisy)
    run_cli(*tiny_train_argv(tiny_pipeline, resumed, 8), "--resume")  # unset: what the run started with
    assert _losses(resumed) == _losses(noisy)
    rc, err = _cli(capsys, *tiny_train_argv(tiny_pipeline, resumed, 12, "--image-token-noise", 0), "--resume")
    assert rc == 2 and "image_token_noise 0.3 (now 0.0)" in err, err
    rc, err = _cli(capsys, *tiny_train_argv(tiny_pipeline, tmp_path / "bad", 4, "--image-token-noise", 1))
    assert rc == 2 and "image-token-noise" in err, err


def _poison_lm_loss(monkeypatch, bad) -> None:
    """Make the decoder's loss NaN on the calls for which ``bad(call number)`` is true."""
    import torch

    from earlyfusion.training import lm_train

    real = lm_train.lm_loss
    calls = {"n": 0}

    def poisoned(losses, *a, **k):
        calls["n"] += 1
        loss, stats = real(losses, *a, **k)
        if bad(calls["n"]):
            loss = loss * torch.tensor(float("nan"))
            stats = {**stats, "sum_all": float("nan")}
        return loss, stats

    monkeypatch.setattr(lm_train, "lm_loss", poisoned)


def test_nonfinite_steps_skipped_then_stop(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    from earlyfusion.training import lm_train

    _poison_lm_loss(monkeypatch, lambda n: n in (3,) or n >= 7)  # one isolated NaN, then NaN forever
    out = tmp_path / "lm"
    cfg = lm_train.TrainConfig(data=DataConfig(sources=[str(tiny_pipeline.data)]), image_tokenizer=str(tiny_pipeline.vq), vocab=str(tiny_pipeline.vocab),
                               out=str(out), preset="tiny", steps=20, batch_size=4, warmup_steps=2, eval_every=0,
                               checkpoint_every=4, max_nonfinite=3)
    with pytest.raises(UserError, match="non-finite"):
        lm_train.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 5, 6]  # step 3 skipped, then the run stopped
    assert rows[-1]["skipped_nonfinite"] == 1
    assert latest_good(out / "checkpoints").name == "step-00000004"


def test_compiled_training_matches_eager(tiny_pipeline: TinyPipeline, tmp_path):
    """train --compile (torch.compile of the forward + backward) follows the eager run's losses."""
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    run_cli(*tiny_train_argv(tiny_pipeline, eager, 6))
    run_cli(*tiny_train_argv(tiny_pipeline, comp, 6), "--compile")
    for (step_a, a), (step_b, b) in zip(_losses(eager), _losses(comp), strict=True):
        assert step_a == step_b and abs(a - b) < 1e-4 * max(1.0, abs(a)), (step_a, a, b)
    assert (comp / "checkpoints" / "step-00000004" / "model.safetensors").is_file()


def test_image_positions_train_compiled_as_eager_and_are_saved(tiny_pipeline: TinyPipeline, tmp_path):
    """train --image-positions: a place embedding for every place of the vocabulary's longest image span, counted
    from its <boi>, for a document's first picture and for its later ones; compiled training follows the eager
    losses, and the run keeps the tables and the ids."""
    from safetensors import safe_open

    from earlyfusion.tokenizer.vocab import Vocabulary

    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    run_cli(*tiny_train_argv(tiny_pipeline, eager, 6), "--image-positions")
    run_cli(*tiny_train_argv(tiny_pipeline, comp, 6), "--image-positions", "--compile")
    for (step_a, a), (step_b, b) in zip(_losses(eager), _losses(comp), strict=True):
        assert step_a == step_b and abs(a - b) < 1e-4 * max(1.0, abs(a)), (step_a, a, b)
    vocab = Vocabulary.load(tiny_pipeline.vocab)
    ckpt = latest_good(comp / "checkpoints")
    decoder = json.loads((ckpt / "config.json").read_text())["decoder"]
    assert (decoder["image_positions"], decoder["image_ordinals"], decoder["boi_id"], decoder["eoi_id"]) == \
        (vocab.max_span - 1, 2, vocab.boi, vocab.eoi)
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert tuple(f.get_slice("image_pos.weight").get_shape()) == (2 * (vocab.max_span - 1), decoder["dim"])


def test_compile_failure_in_training_is_a_clear_error(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    from earlyfusion.training.lm_config import TrainConfig
    from earlyfusion.training.lm_train import train

    with pytest.raises(UserError, match="--compile failed.*run without --compile"):
        train(TrainConfig(data=DataConfig(sources=[str(tiny_pipeline.data)]), image_tokenizer=str(tiny_pipeline.vq), vocab=str(tiny_pipeline.vocab),
                          out=str(tmp_path / "lm"), preset="tiny", steps=2, batch_size=4, eval_every=0, compile=True))


def test_vocab_for_other_tokenizer_is_refused(tiny_pipeline: TinyPipeline, tmp_path):
    other = tmp_path / "vq2"
    shutil.copytree(tiny_pipeline.vq, other)
    cfg_path = other / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["codebook_size"] = cfg["codebook_size"] * 2
    cfg_path.write_text(json.dumps(cfg))
    from earlyfusion.training.lm_config import TrainConfig
    from earlyfusion.training.lm_train import train

    with pytest.raises(UserError) as e:
        train(TrainConfig(data=DataConfig(sources=[str(tiny_pipeline.data)]), image_tokenizer=str(other), vocab=str(tiny_pipeline.vocab),
                          out=str(tmp_path / "lm"), preset="tiny", steps=2))
    assert str(other) in str(e.value)


def test_two_process_gloo_matches_one_process(tiny_pipeline: TinyPipeline, tmp_path):
    pytest.importorskip("accelerate")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(*tiny_train_argv(tiny_pipeline, one, 6))
    # torch.distributed.run starts two gloo processes that accelerate sees as multi-CPU (its own `launch --cpu` starts
    # one process without mpirun)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "earlyfusion", *map(str, tiny_train_argv(tiny_pipeline, two, 6))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr, res.stderr[-3000:]  # two processes really trained
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)


# ---------------------------------------------------------------- runs that cannot be mixed or lost


def _cli(capsys, *argv) -> tuple[int, str]:
    from earlyfusion.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_new_run_into_existing_run_is_refused(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4))
    before = (out / "metrics.jsonl").read_bytes()
    rc, err = _cli(capsys, *tiny_train_argv(tiny_pipeline, out, 8))
    assert rc == 2 and "--resume" in err and "--out" in err, err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert [d.name for d in step_dirs(out / "checkpoints")] == ["step-00000004"]


def test_resume_with_other_identity_is_refused(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4))
    rc, err = _cli(capsys, *tiny_train_argv(tiny_pipeline, out, 8), "--resume", "--seed", 1)
    assert rc == 2 and "seed 0 (now 1)" in err, err
    copy = tmp_path / "data-copy"  # the same records elsewhere: another run's data
    shutil.copytree(tiny_pipeline.data, copy)
    argv = tiny_train_argv(tiny_pipeline, out, 8, "--resume")
    argv[argv.index("--data") + 1] = copy
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and "data.sources" in err and str(copy) in err, err
    assert [d.name for d in step_dirs(out / "checkpoints")] == ["step-00000004"]


def test_resume_in_another_precision_says_so(tiny_pipeline: TinyPipeline, tmp_path, caplog):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4, "--mixed-precision", "no"))
    with caplog.at_level("WARNING"):
        run_cli(*tiny_train_argv(tiny_pipeline, out, 8, "--resume", "--mixed-precision", "no"))
    assert not any("ran with --mixed-precision" in r.getMessage() for r in caplog.records)
    with caplog.at_level("WARNING"):  # e.g. resumed on a machine that chooses otherwise
        run_cli(*tiny_train_argv(tiny_pipeline, out, 12, "--resume", "--mixed-precision", "bf16"))
    said = [r for r in caplog.records if "ran with --mixed-precision" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert "steps up to 8 ran with --mixed-precision no and the rest run with bf16" in said[0].getMessage()
    assert [s for s, _ in _losses(out)] == list(range(1, 13))


def test_resume_refuses_when_every_checkpoint_is_corrupted(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 8))
    for d in step_dirs(out / "checkpoints"):
        (d / "model.safetensors").write_bytes(b"\0" * 10)
    before = (out / "metrics.jsonl").read_bytes()
    rc, err = _cli(capsys, *tiny_train_argv(tiny_pipeline, out, 8), "--resume")
    lines = [line for line in err.splitlines() if line.startswith("earlyfusion: error")]
    assert rc == 2 and len(lines) == 1 and "step-00000008" in lines[0] and "step-00000004" in lines[0], err
    assert (out / "metrics.jsonl").read_bytes() == before  # not silently started again


def _final_last(p: TinyPipeline, out, **kw):
    from earlyfusion.training.lm_config import TrainConfig

    return TrainConfig(data=DataConfig(sources=[str(p.data)]), image_tokenizer=str(p.vq), vocab=str(p.vocab),
                       out=str(out), preset="tiny", batch_size=4, eval_every=0, final="last", **kw)


def test_skipped_last_step_saves_the_last_good_weights_and_fails(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    """A run whose last step was not finite exits non-zero naming the last good checkpoint (the weights from before
    the bad step), and does not mark a model of its own."""
    import torch

    from earlyfusion.core.checkpoint import read_weights
    from earlyfusion.training import lm_train

    _poison_lm_loss(monkeypatch, lambda n: n == 3)  # the last of 3 steps
    out = tmp_path / "lm"
    with pytest.raises(UserError, match=r"last 1 step\(s\) .* not finite.*step-00000003"):
        lm_train.train(_final_last(tiny_pipeline, out, steps=3, checkpoint_every=100))
    ckpt = latest_good(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000003"
    assert all(torch.isfinite(t.float()).all() for t in read_weights(ckpt / "model.safetensors").values())
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "final.json").exists()


def test_non_finite_weights_are_never_saved(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch):
    """Weights an update turned non-finite are not written as a checkpoint: the run stops naming the last good one."""
    import torch

    from earlyfusion.training import lm_train
    from earlyfusion.training.trainer import Trainer

    real = Trainer.update

    def update_then_break(self, optimizer, step, loss, grad_norm):
        skipped = real(self, optimizer, step, loss, grad_norm)
        if step == 1:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))
        return skipped

    monkeypatch.setattr(Trainer, "update", update_then_break)
    out = tmp_path / "lm"
    with pytest.raises(UserError, match=r"weights are not finite after step 2.*step-00000001"):
        lm_train.train(_final_last(tiny_pipeline, out, steps=4, checkpoint_every=1))
    assert latest_good(out / "checkpoints").name == "step-00000001"


def test_no_heldout_pairs_skips_validation_once(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    out = tmp_path / "lm"
    argv = tiny_train_argv(tiny_pipeline, out, 4, "--eval-every", 2)
    argv[argv.index("--data") + 1] = tiny_pipeline.data / "text.jsonl"  # no held-out split
    capsys.readouterr()
    run_cli(*argv)
    err = capsys.readouterr().err
    assert err.count("no held-out pairs: validation skipped") == 1, err
    assert "val text" not in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not any(k.startswith("val_") for r in rows for k in r)


def test_metrics_file_cut_is_tolerant_and_atomic(tmp_path, monkeypatch):
    from earlyfusion.training import trainer as loop

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0}).encode() for s in (1, 2, 3)]
    path.write_bytes(b"\n".join([good[0], b"\xff\xfe", b'{"step": "x"}', b"[1]", b'{"step": true}', good[1],
                                 b'{"loss": 2}', b'{"step": 2', good[2]]) + b"\n")
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(loop.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError):
            loop.metrics_file(tmp_path, 2)
    assert path.read_bytes() == before  # a kill while cutting leaves the old file
    warnings = []
    monkeypatch.setattr(loop.log, "warning", lambda msg, *a: warnings.append(msg % a))
    loop.metrics_file(tmp_path, 2)
    assert path.read_bytes() == good[0] + b"\n" + good[1] + b"\n"
    assert len(warnings) == 1 and "dropped 6 line" in warnings[0], warnings


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_pipeline: TinyPipeline, tmp_path, monkeypatch, capsys):
    """A full disk while writing a checkpoint (safetensors' own 'os error 28'): one line naming the file, exit 2,
    no traceback; the checkpoint written before survives and --resume continues from it."""
    from safetensors import SafetensorError

    import earlyfusion.core.checkpoint as ck
    from earlyfusion.cli import main

    out = tmp_path / "lm"
    real = ck.save_file
    calls = {"n": 0}

    def fill_up(tensors, path, metadata=None):
        if "step-00000008" in str(path):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        calls["n"] += 1
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", fill_up)
    capsys.readouterr()
    rc = main([str(a) for a in tiny_train_argv(tiny_pipeline, out, 8)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("earlyfusion: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "No space left on device" in errors[0] and "step-00000008" in errors[0]
    assert [d.name for d in step_dirs(out / "checkpoints")] == ["step-00000004"]
    assert latest_good(out / "checkpoints") is not None
    monkeypatch.setattr(ck, "save_file", real)
    assert main([str(a) for a in tiny_train_argv(tiny_pipeline, out, 8, "--resume")]) == 0
    assert latest_good(out / "checkpoints").name == "step-00000008"


def test_full_disk_outside_checkpoints_is_one_line(tmp_path, monkeypatch, capsys):
    """Any other write that hits a full disk (here: data shapes' PNGs) says which path and exits 2."""
    import errno
    from pathlib import Path as P

    from earlyfusion.cli import main

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(P, "write_bytes", full)
    capsys.readouterr()
    rc = main(["data", "shapes", "--out", str(tmp_path / "d"), "--num-images", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and ".png" in err, err
