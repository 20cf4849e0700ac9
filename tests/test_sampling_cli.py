"""`earlyfusion sample`: every direction end to end on a tiny trained run, and one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from earlyfusion_cli import main


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


def test_missing_image_fails_before_loading(capsys, tmp_path):
    rc, _, err = _sample(capsys, "--checkpoint", tmp_path, "--image", tmp_path / "nope.png")
    _one_error_line(rc, err, "nope.png")


# ---------------------------------------------------------------- on a tiny trained run


@pytest.fixture(scope="module")
def run(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def test_image(run) -> tuple[Path, str]:
    meta = json.loads((run.data / "test" / "metadata.jsonl").read_text().splitlines()[0])
    return run.data / "test" / meta["file_name"], meta["text"]


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


def test_text_from_text_streams_and_is_reproducible(capsys, run):
    argv = ["--checkpoint", run.lm, "--prompt", "a red", "--max-new-tokens", 12, "--seed", 3]
    rc, out1, _ = _sample(capsys, *argv)
    assert rc == 0 and out1.endswith("\n")
    rc, out2, _ = _sample(capsys, *argv)
    assert out1 == out2
    rc, out3, _ = _sample(capsys, *argv[:-1], 4, "--temperature", 2.0)
    assert rc == 0


def test_text_from_image_and_several_samples(capsys, run, test_image, tmp_path):
    img, _ = test_image
    rc, out, _ = _sample(capsys, "--checkpoint", run.lm, "--image", img, "--temperature", 0, "--max-new-tokens", 10)
    assert rc == 0
    rc, out, err = _sample(capsys, "--checkpoint", run.lm, "--image", img, img, "--prompt", "what?",
                           "--num-samples", 2, "--max-new-tokens", 6, "--out", tmp_path)
    assert rc == 0 and out.count("--- sample") == 2
    assert (tmp_path / "sample-00.txt").is_file() and (tmp_path / "sample-01.txt").is_file()


def test_image_from_text_writes_pngs_and_grid(capsys, run, test_image, tmp_path):
    _, caption = test_image
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
