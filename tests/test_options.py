"""Bad option values for `train`, `tokenizer train` and `tokenizer eval`: exit status 2, exactly one line on
stderr, no traceback, and nothing written to --out."""

from __future__ import annotations

import pytest

from conftest import TinyPipeline, assert_one_line_error as _assert_one_line_error, cli_status as _run

TRAIN_BAD = [
    ["--steps", "0"], ["--steps", "-1"], ["--steps", "1.5"], ["--steps", "nan"],
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "-1"], ["--lr", "0"], ["--lr", "abc"],
    ["--min-lr-ratio", "1.5"], ["--min-lr-ratio", "nan"], ["--min-lr-ratio", "-0.1"],
    ["--weight-decay", "-0.1"], ["--weight-decay", "inf"], ["--z-loss", "-1"], ["--z-loss", "nan"],
    ["--warmup-steps", "-1"], ["--grad-clip", "-1"], ["--grad-clip", "nan"], ["--max-nonfinite", "-1"],
    ["--dropout", "1"], ["--dropout", "-0.1"], ["--dropout", "nan"],
    ["--context-len", "4"], ["--context-len", "0"], ["--micro-batch-size", "0"],
    ["--batch-size", "0"], ["--batch-size", "65537"], ["--batch-size", "1000000000000"],
    ["--seed", "-1"], ["--seed", str(2 ** 32)], ["--eval-every", "-1"], ["--keep-checkpoints", "0"],
    ["--checkpoint-every", "0"], ["--log-every", "0"],
    ["--reading-ratio", "2"], ["--reading-ratio", "nan"], ["--cond-dropout", "1"], ["--cond-dropout", "-0.5"],
    ["--preset", "huge"], ["--mixed-precision", "fp8"], ["--bogus-option", "1"],
]
VQ_TRAIN_BAD = [
    ["--steps", "0"], ["--steps", "2.5"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"], ["--batch-size", "0"],
    ["--batch-size", "70000"], ["--min-lr-ratio", "-0.1"], ["--min-lr-ratio", "inf"], ["--seed", "-1"],
    ["--seed", str(2 ** 32)], ["--recon-loss", "l3"], ["--grad-clip", "nan"], ["--weight-decay", "inf"],
    ["--warmup-steps", "-1"], ["--sheet-every", "-1"], ["--max-nonfinite", "-1"], ["--keep-checkpoints", "0"],
    ["--preset", "huge"], ["--bogus-option"],
]
VQ_EVAL_BAD = [["--batch-size", "0"], ["--batch-size", "1e6"], ["--batch-size", "100000"], ["--limit", "-1"],
               ["--limit", "x"], ["--bogus-option"]]


def _train_argv(tmp_path, out, *extra):
    return ["train", "--data", tmp_path / "data", "--image-tokenizer", tmp_path / "vq", "--vocab", tmp_path / "vocab",
            "--out", out, "--preset", "tiny", *extra]


@pytest.mark.parametrize("bad", TRAIN_BAD, ids=" ".join)
def test_train_rejects(capsys, tmp_path, bad):
    out = tmp_path / "out"
    _assert_one_line_error(*_run(capsys, _train_argv(tmp_path, out, *bad)))
    assert not out.exists()


@pytest.mark.parametrize("bad", VQ_TRAIN_BAD, ids=" ".join)
def test_tokenizer_train_rejects(capsys, tmp_path, bad):
    out = tmp_path / "out"
    _assert_one_line_error(*_run(capsys, ["tokenizer", "train", "--data", tmp_path / "data", "--out", out, *bad]))
    assert not out.exists()


@pytest.mark.parametrize("bad", VQ_EVAL_BAD, ids=" ".join)
def test_tokenizer_eval_rejects(capsys, tmp_path, bad):
    (tmp_path / "vq").mkdir()
    _assert_one_line_error(*_run(capsys, ["tokenizer", "eval", "--checkpoint", tmp_path / "vq", "--data", tmp_path / "d", *bad]))
    assert list((tmp_path / "vq").iterdir()) == []


def test_file_given_for_a_directory(capsys, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    for argv in (_train_argv(tmp_path, f), _train_argv(tmp_path, tmp_path / "out", "--cache-dir", f),
                 ["tokenizer", "train", "--data", tmp_path / "data", "--out", f],
                 ["tokenizer", "eval", "--checkpoint", f, "--data", tmp_path / "data"]):
        _assert_one_line_error(*_run(capsys, argv))
        assert f.read_text() == "keep me" and not (tmp_path / "out").exists()


def test_context_too_short_for_an_image_document(capsys, tmp_path, tiny_pipeline: TinyPipeline):
    out = tmp_path / "out"
    argv = ["train", "--data", tiny_pipeline.data, "--image-tokenizer", tiny_pipeline.vq, "--vocab", tiny_pipeline.vocab,
            "--out", out, "--preset", "tiny", "--context-len", "8"]
    rc, err = _run(capsys, argv)
    _assert_one_line_error(rc, err)
    assert "cannot hold one image" in err and "--context-len 20 or more" in err and not out.exists()


VOCAB_BAD = [["--text-vocab-size", "1000000000"], ["--text-vocab-size", "10"], ["--text-vocab-size", "nan"],
             ["--min-frequency", "0"], ["--max-texts", "-1"], ["--bogus-option"]]


@pytest.mark.parametrize("bad", VOCAB_BAD, ids=" ".join)
def test_vocab_build_rejects(capsys, tmp_path, bad):
    """`vocab build --text-vocab-size 1000000000` used to abort natively (a 70 GB allocation)."""
    out = tmp_path / "vocab"
    rc, err = _run(capsys, ["vocab", "build", "--image-tokenizer", tmp_path / "vq", "--data", tmp_path, "--out", out, *bad])
    _assert_one_line_error(rc, err)
    assert not out.exists()
