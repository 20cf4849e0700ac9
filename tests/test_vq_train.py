"""Image tokenizer training/evaluation: loss goes down, RUN layout, exact resume after SIGKILL,
non-finite guard, bad images skipped and counted, metrics (PSNR/SSIM) and eval --json."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from earlyfusion.core.errors import UserError
from earlyfusion.core.checkpoint import latest_good, read_weights, step_dirs, verify_dir
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae
from earlyfusion.training import vq_train
from earlyfusion.training.vq_eval import VQEvalConfig, eval_cmd, evaluate_tokenizer, load_images, psnr, ssim
from earlyfusion.training.vq_train import VQTrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small built-in data set at 16 px (the tiny preset's size)."""
    from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd

    d = tmp_path_factory.mktemp("vqdata") / "shapes"
    generate_cmd(ShapesConfig(out=str(d), num_images=72, image_size=16, seed=3, num_interleaved=0, num_text=0))
    return d


def _cfg(data: Path, out: Path, steps: int = 12, **kw) -> VQTrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", steps=steps, batch_size=16, lr=3e-3, warmup_steps=2,
                checkpoint_every=4, sheet_every=0, log_every=100)
    base.update(kw)
    return VQTrainConfig(**base)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_writes_run(data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=40, checkpoint_every=10, keep_checkpoints=2, sheet_every=20))
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 41))
    first = sum(r["loss"] for r in m[:5]) / 5
    last = sum(r["loss"] for r in m[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(0 < r["usage"] <= 1 and r["perplexity"] >= 1 for r in m)
    # RUN/config.json + RUN/model.safetensors are the latest weights; old checkpoints pruned
    assert [p.name for p in step_dirs(run / "checkpoints")] == ["step-00000040", "step-00000030"]
    for d in step_dirs(run / "checkpoints"):
        verify_dir(d)
    top, last_ckpt = read_weights(run / "model.safetensors"), read_weights(run / "checkpoints/step-00000040/model.safetensors")
    assert top.keys() == last_ckpt.keys() and all(torch.equal(top[k], last_ckpt[k]) for k in top)
    assert json.loads((run / "config.json").read_text())["codebook_size"] == 32
    model = load_vqvae(run)
    assert model.cfg.image_size == 16
    from PIL import Image

    sheet = Image.open(run / "reconstructions.png")
    assert sheet.width > sheet.height  # a row of originals over a row of reconstructions
    assert (run / "sheets" / "step-00000020.png").is_file()


def test_refuses_existing_run_without_resume(data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=4))
    with pytest.raises(UserError, match="--resume"):
        train(_cfg(data, run, steps=8))


_KILLER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from earlyfusion.training import vq_train
    real_lr_at = vq_train.lr_at
    def lr_at(step, cfg):
        if step == {stop_at}:  # steps 1..{stop_at} done, checkpoint at {ckpt} written: wait to be killed
            print("ready", flush=True)
            time.sleep(600)
        return real_lr_at(step, cfg)
    vq_train.lr_at = lr_at
    vq_train.train_cmd(vq_train.VQTrainConfig(**{cfg!r}))
""")


def test_exact_resume_after_sigkill(data, tmp_path):
    torch.set_num_threads(1)
    steps = 12
    ref = tmp_path / "ref"
    train(_cfg(data, ref, steps=steps))
    expected = _metrics(ref)

    run = tmp_path / "killed"
    cfg = _cfg(data, run, steps=steps)
    script = _KILLER.format(repo=str(REPO), stop_at=10, ckpt=8, cfg=vars(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference ran on one thread: same reductions
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert latest_good(run / "checkpoints").name == "step-00000008"
    assert [r["step"] for r in _metrics(run)] == list(range(1, 11))  # two steps past the checkpoint were lost

    train(_cfg(data, run, steps=steps, resume=True))
    got = _metrics(run)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(expected, got):
        for key in ("loss", "recon", "commit", "usage", "perplexity", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    wa, wb = read_weights(ref / "model.safetensors"), read_weights(run / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # EMA codebook buffers included


def test_resume_falls_back_past_corrupted_checkpoint(data, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(_cfg(data, run, steps=12, keep_checkpoints=3))
    expected = _metrics(run)
    for step in (8, 12):  # truncated / corrupted: --resume must fall back to step 4
        w = run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100] if step == 8 else w.read_bytes()[:-1] + b"x")
    train(_cfg(data, run, steps=12, keep_checkpoints=3, resume=True))
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in expected]
    assert latest_good(run / "checkpoints").name == "step-00000012"


class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a poisoned gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def _inject(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None):
    real = vq_train.compute_loss
    calls = {"n": 0}

    def compute_loss(model, x, cfg):
        calls["n"] += 1
        loss, parts = real(model, x, cfg)
        if (bad_calls and calls["n"] in bad_calls) or (from_call and calls["n"] >= from_call):
            loss = _NaNGrad.apply(loss)
        return loss, parts

    monkeypatch.setattr(vq_train, "compute_loss", compute_loss)


def test_nonfinite_gradient_steps_are_skipped(data, tmp_path, monkeypatch):
    _inject(monkeypatch, bad_calls={3, 4})
    run = tmp_path / "run"
    train(_cfg(data, run, steps=8, max_nonfinite=2))
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 5, 6, 7, 8]  # steps 3 and 4 skipped, the run went on
    assert m[-1]["skipped_nonfinite"] == 2
    w = read_weights(run / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in w.values())  # incl. the EMA codebook


def test_too_many_nonfinite_in_a_row_stops_keeping_last_good(data, tmp_path, monkeypatch):
    _inject(monkeypatch, from_call=6)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite"):
        train(_cfg(data, run, steps=12, max_nonfinite=2))
    good = latest_good(run / "checkpoints")
    assert good is not None and good.name == "step-00000004"
    w = read_weights(good / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in w.values())
    load_vqvae(run)  # the top-level weights are those of the last good checkpoint


def test_bad_images_skipped_and_counted(data, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(data / "train", d / "train")
    meta = d / "train" / "metadata.jsonl"
    good = len(meta.read_text().splitlines())
    png = sorted((d / "train").glob("*.png"))[0].read_bytes()
    (d / "train" / "trunc.png").write_bytes(png[: len(png) // 2])
    (d / "train" / "empty.png").write_bytes(b"")
    (d / "train" / "text.png").write_text("not an image")
    with open(meta, "a") as f:
        for name in ("trunc.png", "empty.png", "text.png", "missing.png"):
            f.write(json.dumps({"file_name": name, "text": "x"}) + "\n")
        f.write("{not json\n")
    images, report = load_images(str(d), 16)
    assert len(images) == good and images.dtype == torch.uint8
    assert report.total == 5
    assert report.counts["empty_file"] == 1 and report.counts["missing"] == 1 and report.counts["bad_json"] == 1
    with pytest.raises(UserError):
        load_images(str(d), 16, strict=True)
    train(_cfg(d, tmp_path / "run", steps=2))  # trains to the end despite the bad records


def test_psnr_ssim_definitions():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(a, a), torch.ones(3))
    b = (a + 0.1).clamp(0, 1)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert (ssim(a, noisy) < ssim(a, b)).all() and (ssim(a, b) < 1).all()
    torch.testing.assert_close(ssim(a, noisy), ssim(noisy, a))
    c = torch.full((1, 3, 8, 8), 0.5)
    torch.testing.assert_close(psnr(c, c + 0.1), torch.tensor([20.0]))  # MSE 0.01 -> 20 dB
    assert ssim(torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6)).shape == (1,)  # window shrinks for small images


def test_evaluate_tokenizer_and_eval_json(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=6))
    model = load_vqvae(run)
    images, _ = load_images(str(data), 16, split="test")
    fig = evaluate_tokenizer(model, images, batch_size=5)
    fig_float = evaluate_tokenizer(model, images.float() / 127.5 - 1, batch_size=64)
    assert fig["psnr"] == pytest.approx(fig_float["psnr"], abs=1e-4)
    assert 0 < fig["codebook_usage"] <= 1 and 1 <= fig["perplexity"] <= 32 and fig["images_per_s"] > 0
    assert math.isfinite(fig["psnr"]) and -1 <= fig["ssim"] <= 1

    capsys.readouterr()
    assert eval_cmd(VQEvalConfig(checkpoint=str(run), data=str(data), json=True)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "PSNR" in "\n".join(lines[:-1])
    out = json.loads(lines[-1])
    assert {"psnr", "ssim", "codebook_usage", "perplexity", "images_per_s"} <= set(out)
    assert out["psnr"] == pytest.approx(fig["psnr"], abs=1e-4)


def test_cli_eval_json_last_line(data, tmp_path):
    """Through the real `earlyfusion` command in a subprocess: the last stdout line is the JSON object."""
    run = tmp_path / "run"
    train(_cfg(data, run, steps=4))
    p = subprocess.run([sys.executable, "-m", "earlyfusion.cli", "tokenizer", "eval", "--checkpoint", str(run),
                        "--data", str(data), "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(json.loads(p.stdout.strip().splitlines()[-1])) >= {"psnr", "ssim", "codebook_usage", "perplexity", "images_per_s"}
    p = subprocess.run([sys.executable, "-m", "earlyfusion.cli", "tokenizer", "eval", "--checkpoint", str(tmp_path / "nope"),
                        "--data", str(data)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr


def test_skipped_last_step_saves_the_last_good_weights_and_fails(data, tmp_path, monkeypatch):
    """A run whose last step was not finite did not finish as asked: it exits non-zero naming the last good
    checkpoint, which holds the weights from before the bad step."""
    _inject(monkeypatch, bad_calls={4})
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"last 1 step\(s\) .* not finite.*step-00000004"):
        train(_cfg(data, run, steps=4, checkpoint_every=100))
    assert latest_good(run / "checkpoints").name == "step-00000004"
    w = read_weights(run / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in w.values())
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]


def test_resume_with_other_identity_or_only_corrupted_checkpoints_is_refused(data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=8))
    with pytest.raises(UserError, match=r"seed 0 \(now 1\)"):
        train(_cfg(data, run, steps=12, seed=1, resume=True))
    with pytest.raises(UserError, match=r"batch_size 16 \(now 8\)"):
        train(_cfg(data, run, steps=12, batch_size=8, resume=True))
    for d in step_dirs(run / "checkpoints"):
        (d / "model.safetensors").write_bytes(b"\0" * 10)
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="step-00000008.*step-00000004"):
        train(_cfg(data, run, steps=12, resume=True))
    assert (run / "metrics.jsonl").read_bytes() == before


# ---------------------------------------------------------------- shapes from options, FSQ, perceptual and GAN losses


def test_preset_recipes_fill_only_what_was_not_given(data, tmp_path):
    photo = VQTrainConfig(data=str(data), out=str(tmp_path / "a"), preset="photo64")
    assert (photo.steps, photo.batch_size, photo.lr) == (3000, 32, 2e-3)
    default = VQTrainConfig(data=str(data), out=str(tmp_path / "b"))
    assert (default.steps, default.batch_size, default.lr) == (1800, 128, 3e-3)  # what the demo trains with
    mine = VQTrainConfig(data=str(data), out=str(tmp_path / "c"), preset="photo64", steps=7, lr=1e-3)
    assert (mine.steps, mine.batch_size, mine.lr) == (7, 32, 1e-3)


def test_photo_preset_at_another_size_trains_and_evaluates(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=4, preset="photo64", image_size=16, downsample=4, width=16,
               overrides=["latent_dim=16", "codebook_size=32", "decoder_res_blocks=1"]))
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["image_size"], cfg["downsample"], cfg["attention"], cfg["grid"]) == (16, 4, False, [4, 4])
    assert (cfg["encoder_reach"], cfg["patch_size"]) == (1, 4)
    capsys.readouterr()
    assert eval_cmd(VQEvalConfig(checkpoint=str(run), data=str(data), json=True)) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(out["psnr"]) and 0 < out["codebook_usage"] <= 1


def test_fsq_training_lowers_loss(data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data, run, steps=30, quantizer="fsq", fsq_levels="4,3,3"))
    m = _metrics(run)
    assert sum(r["loss"] for r in m[-5:]) < 0.7 * sum(r["loss"] for r in m[:5])
    assert all(r["commit"] == 0.0 for r in m)
    model = load_vqvae(run)
    assert model.cfg.quantizer == "fsq" and model.cfg.codebook_size == 36
    images, _ = load_images(str(data), 16, split="test")
    assert 0 < evaluate_tokenizer(model, images)["codebook_usage"] <= 1


def test_perceptual_loss_from_a_file_trains(data, tmp_path):
    from test_vq_options import write_vgg_standin

    weights = write_vgg_standin(tmp_path / "vgg.safetensors")
    run = tmp_path / "run"
    train(_cfg(data, run, steps=6, perceptual_weights=str(weights), perceptual_weight=0.5))
    m = _metrics(run)
    assert all(r["perceptual"] > 0 and math.isfinite(r["loss"]) for r in m)
    assert all(r["loss"] > r["recon"] + r["commit"] for r in m)  # the perceptual term is part of the loss
    with pytest.raises(ValueError, match="perceptual-weights.*not found"):  # refused before any data is read
        _cfg(data, tmp_path / "run2", steps=2, perceptual_weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="bad.safetensors"):
        train(_cfg(data, tmp_path / "run3", steps=2, perceptual_weights=str(tmp_path / "bad.safetensors")))


def test_gan_run_resumes_exactly_and_is_refused_without_gan(data, tmp_path):
    from earlyfusion.core.checkpoint import load_state

    torch.set_num_threads(1)
    run = tmp_path / "run"
    kw = dict(steps=12, keep_checkpoints=3, gan_weight=0.5, gan_start_step=3)
    train(_cfg(data, run, **kw))
    expected = _metrics(run)
    assert all("disc" not in r for r in expected[:3])  # the warm-up: no GAN before gan_start_step
    assert all(math.isfinite(r["disc"]) and math.isfinite(r["gan"]) and r["gan_weight"] >= 0 for r in expected[3:])
    assert "discriminator" in load_state(run / "checkpoints" / "step-00000008", "state")
    ref = read_weights(run / "model.safetensors")
    w = run / "checkpoints" / "step-00000012" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # corrupted: --resume continues from step 8
    with pytest.raises(UserError, match="losses.gan"):
        train(_cfg(data, run, steps=12, keep_checkpoints=3, resume=True))
    train(_cfg(data, run, resume=True, **kw))
    got = _metrics(run)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(expected, got):
        for key in ("loss", "recon", "commit", "usage", "grad_norm", "gan", "gan_weight", "disc"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
    now = read_weights(run / "model.safetensors")
    assert all(torch.equal(ref[k], now[k]) for k in ref)


# ---------------------------------------------------------------- images of several shapes


def test_crops_are_square_of_the_shortest_side_and_reproducible():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((16, 16), (12, 16), (16, 8))]
    a, b = vq_train.crops(images, 5, 0, 4), vq_train.crops(images, 5, 0, 4)
    assert a.shape == (3, 3, 8, 8) and torch.equal(a, b)
    for crop, img in zip(a, images):  # each crop is a window of its own image, at a multiple of 4 px
        windows = img.unfold(1, 8, 4).unfold(2, 8, 4)  # (3, rows, cols, 8, 8)
        assert any(torch.equal(windows[:, i, j], crop) for i in range(windows.shape[1]) for j in range(windows.shape[2]))
    assert len({vq_train.crops(images, s, 0, 4)[0].sum().item() for s in range(12)}) > 1


def test_keep_aspect_trains_on_each_images_own_shape(tmp_path):
    """--keep-aspect: wide pictures are resized whole (16x12 for 24x16 canvases at the tiny preset's 16 px),
    training lowers the loss, the sheet shows each image at its shape, and the run's identity records the option."""
    from PIL import Image

    from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd

    d = tmp_path / "shapes2"
    generate_cmd(ShapesConfig(out=str(d), num_images=64, sizes="16x16,24x16", seed=4,
                              num_interleaved=0, num_text=0))
    images, _ = load_images(str(d), 16, max_grid=(4, 4), downsample=4)
    assert {tuple(t.shape) for t in images} == {(3, 16, 16), (3, 12, 16)}
    run = tmp_path / "run"
    train(_cfg(d, run, steps=30, keep_aspect=True, sheet_every=30))
    m = _metrics(run)
    assert sum(r["loss"] for r in m[-5:]) < 0.8 * sum(r["loss"] for r in m[:5])
    identity = json.loads((run / "config.json").read_text())["training"]["identity"]
    assert identity["keep_aspect"] is True
    sheet = Image.open(run / "reconstructions.png")
    assert sheet.width > sheet.height
    with pytest.raises(UserError, match="keep_aspect"):
        train(_cfg(d, run, steps=40, resume=True))


def test_two_processes_with_the_gan_loss_match_one(data, tmp_path):
    """The image tokenizer and its discriminator under DDP (two gloo processes, each half of the global batch) follow
    one process's losses over 20 steps within 3 % (relative). Not exactly: the codebook's k-means start and its
    dead-code replacement sample from each process's half of the batch (synchronised, but other samples)."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["tokenizer", "train", "--data", data, "--preset", "tiny", "--steps", 20, "--batch-size", 16, "--lr", 3e-3,
            "--warmup-steps", 2, "--checkpoint-every", 10, "--sheet-every", 0, "--gan-weight", 0.5,
            "--gan-start-step", 3, "--mixed-precision", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    for out, launch in ((one, []), (two, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        res = subprocess.run([sys.executable, *launch, "-m", "earlyfusion", *map(str, argv), "--out", str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=180)  # a hang fails here in minutes, not at CI's limit
        assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b):
        for key in ("loss", "recon"):
            assert abs(ra[key] - rb[key]) <= 0.03 * abs(ra[key]), (key, ra, rb)
        assert ("disc" in ra) == ("disc" in rb) and all(math.isfinite(rb[k]) for k in ("gan", "disc") if k in rb)
    load_vqvae(two)  # the run is an ordinary image tokenizer
