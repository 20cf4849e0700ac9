"""`earlyfusion sample`: every direction end to end on a tiny trained run, and one-line errors on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from earlyfusion.cli import main


def _sample(capsys, *argv):
    rc = main(["sample", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(rc, err, *words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("earlyfusion: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


# ---------------------------------------------------------------- option errors (no model needed)


@pytest.mark.parametrize("argv, words", [
    (["--prompt", "a", "--cfg", "3"], ["--cfg", "text"]),
    (["--prompt", "a", "--num-samples", "0"], ["--num-samples"]),
    (["--prompt", "a", "--modality", "image"], ["--out"]),
    (["--prompt", "a", "--modality", "auto"], ["--out"]),
    (["--prompt", "a", "--temperature", "-1"], ["temperature"]),
    (["--prompt", "a", "--image-top-p", "2"], ["top-p"]),
    (["--prompt", "a", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt", "a", "--prompt-first"], ["--image"]),
])
def test_contradictory_options(capsys, tmp_path, argv, words):
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, *argv)
    _one_error_line(rc, err, *words)


@pytest.mark.parametrize("argv, words", [
    (["--num-samples", "100000"], ["--num-samples", "4096"]),
    (["--modality", "image", "--cfg", "nan"], ["--cfg", "finite"]),
    (["--modality", "auto", "--cfg", "inf"], ["--cfg", "finite"]),
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--image-temperature=-inf"], ["--image-temperature", "finite"]),
    (["--top-p", "nan"], ["--top-p"]),
    (["--image-top-p", "inf"], ["--image-top-p"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--seed", str(2 ** 64)], ["--seed"]),
])
def test_out_of_range_and_non_finite_options(capsys, tmp_path, argv, words):
    """Rejected before anything is loaded or written, with one line naming the option."""
    out = tmp_path / "out"
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, "--prompt", "a", "--out", out, *argv)
    _one_error_line(rc, err, *words)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the --out directory


def test_prompt_that_is_not_utf8(capsys, tmp_path):
    """Bytes that are not UTF-8 reach argv as surrogate escapes (``--prompt $'\\xff'``)."""
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, "--prompt", b"a\xff".decode("utf-8", "surrogateescape"))
    _one_error_line(rc, err, "--prompt", "UTF-8")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me\n")
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, "--prompt", "a", "--out", target)
    _one_error_line(rc, err, "--out", "not a directory")
    assert target.read_text() == "keep me\n" and list(tmp_path.iterdir()) == [target]


def test_num_samples_not_an_integer(capsys, tmp_path):
    """argparse rejects '1e6' for an integer option (a usage error: SystemExit 2, one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", str(tmp_path), "--prompt", "a", "--num-samples", "1e6"])
    _one_error_line(exit_info.value.code, capsys.readouterr().err, "--num-samples", "1e6")
    assert list(tmp_path.iterdir()) == []


def test_missing_image_fails_before_loading(capsys, tmp_path):
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, "--image", tmp_path / "nope.png")
    _one_error_line(rc, err, "nope.png")


# ---------------------------------------------------------------- on a tiny trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """A complete LMRUN with random weights (tiny image tokenizer, vocabulary, tiny decoder) + one test image."""
    import torch

    from earlyfusion.model.decoder import Decoder, DecoderConfig
    from earlyfusion.core.checkpoint import atomic_dir, step_dir
    from earlyfusion.core.rundir import CHECKPOINTS_DIR, IMAGE_TOKENIZER_DIR, VOCAB_DIR, write_decoder
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE
    from earlyfusion.tokenizer.vq_checkpoint import save_vqvae, vq_fingerprint

    root = tmp_path_factory.mktemp("sample_run")
    lm = root / "lm"
    torch.manual_seed(0)
    vq = VQVAE(VQ_PRESETS["tiny"])
    size = vq.cfg.image_size
    vq(torch.rand(8, 3, size, size) * 2 - 1)  # k-means initialises the codebook (else every code decodes alike)
    vq.eval()
    save_vqvae(vq, lm / IMAGE_TOKENIZER_DIR)
    texts = ["a red circle at the top left", "two blue squares", "a small green triangle in the centre"] * 20
    vocab = Vocabulary.build(texts, codebook_size=vq.codebook_size, grid=vq.grid_size, text_vocab_size=300,
                             image_tokenizer_fingerprint=vq_fingerprint(lm / IMAGE_TOKENIZER_DIR))
    vocab.save(lm / VOCAB_DIR)
    decoder = Decoder(DecoderConfig.from_preset("tiny", vocab.vocab_size))
    with atomic_dir(step_dir(lm / CHECKPOINTS_DIR, 1)) as tmp:
        write_decoder(tmp, decoder, {"decoder": decoder.config.to_dict(), "step": 1})
    image = root / "shape.png"
    img = Image.new("RGB", (size, size), "white")
    img.paste((200, 30, 30), (2, 2, size // 2, size // 2))
    img.save(image)
    return SimpleNamespace(lm=lm, image=image, context=decoder.config.max_seq_len)


def test_missing_and_incomplete_checkpoint(capsys, run, tmp_path):
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path / "missing", "--prompt", "a")
    _one_error_line(rc, err, "missing")
    broken = tmp_path / "broken"
    shutil.copytree(run.lm, broken)
    shutil.rmtree(broken / "vocab")
    rc, _, err = _sample(capsys, "--checkpoint", broken, "--prompt", "a")
    _one_error_line(rc, err, "vocab")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _sample(capsys, "--checkpoint", empty, "--prompt", "a")
    _one_error_line(rc, err, "checkpoint")


def test_unreadable_image_and_long_prompt(capsys, run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc, _, err = _sample(capsys, "--checkpoint", run.lm, "--image", bad)
    _one_error_line(rc, err, "bad.png")
    rc, _, err = _sample(capsys, "--checkpoint", run.lm, "--prompt", "red circle " * 2000)
    _one_error_line(rc, err, "context")


def test_text_from_text_streams_and_is_reproducible(capsys, run, tmp_path):
    argv = ["--checkpoint", run.lm, "--prompt", "a red", "--max-new-tokens", 12, "--seed", 3]
    rc, out1, err = _sample(capsys, *argv, "--out", tmp_path)
    assert rc == 0 and out1.endswith("\n") and "sample-00.txt" in err
    assert out1 == (tmp_path / "sample-00.txt").read_text(encoding="utf-8")  # streamed == returned text
    rc, out2, _ = _sample(capsys, *argv)
    assert out1 == out2
    rc, out3, _ = _sample(capsys, *argv[:-1], 4, "--temperature", 2.0)
    assert rc == 0


def test_text_from_image_and_several_samples(capsys, run, tmp_path):
    img = run.image
    rc, out, _ = _sample(capsys, "--checkpoint", run.lm, "--image", img, "--temperature", 0, "--max-new-tokens", 10)
    assert rc == 0
    rc, out, err = _sample(capsys, "--checkpoint", run.lm, "--image", img, img, "--prompt", "what?",
                           "--num-samples", 2, "--max-new-tokens", 6, "--out", tmp_path)
    assert rc == 0 and out.count("--- sample") == 2
    assert (tmp_path / "sample-00.txt").is_file() and (tmp_path / "sample-01.txt").is_file()


def test_image_from_text_writes_pngs_and_grid(capsys, run, tmp_path):
    caption = "a red circle at the top left"
    out_dir = tmp_path / "imgs"
    rc, out, _ = _sample(capsys, "--checkpoint", run.lm, "--prompt", caption, "--modality", "image",
                         "--num-samples", 3, "--cfg", 2.0, "--out", out_dir, "--seed", 1)
    assert rc == 0
    written = [Path(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("wrote ")]
    assert sorted(p.name for p in written) == ["grid.png", "sample-00.png", "sample-01.png", "sample-02.png"]
    for p in written:
        assert p.is_file()
    size = Image.open(out_dir / "sample-00.png").size
    assert size[0] == size[1] and size[0] > 0
    first = (out_dir / "sample-00.png").read_bytes()
    assert (out_dir / "sample-01.png").read_bytes() != first  # samples differ
    rc, _, _ = _sample(capsys, "--checkpoint", run.lm, "--prompt", caption, "--modality", "image",
                       "--num-samples", 3, "--cfg", 2.0, "--out", out_dir, "--seed", 1)
    assert (out_dir / "sample-00.png").read_bytes() == first  # same seed, same image


def test_interleaved_writes_text_pngs_and_page(capsys, run, tmp_path):
    rc, out, _ = _sample(capsys, "--checkpoint", run.lm, "--prompt", "a", "--modality", "auto",
                         "--max-new-tokens", 60, "--out", tmp_path, "--temperature", 1.0)
    assert rc == 0
    text = (tmp_path / "sample-00.txt").read_text()
    page = (tmp_path / "index.html").read_text()
    n_images = text.count("[image ")
    assert page.count("<img ") == n_images
    assert len(list(tmp_path.glob("sample-00-image-*.png"))) == n_images
