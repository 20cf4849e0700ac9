"""`earlyfusion data photos`: crops of scikit-image's photographs, deterministic, split by photograph, readable by
the image readers, with one-line errors for bad options."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.training.photos import MARKER, PHOTOS, TEST_PHOTOS, PhotosConfig, caption, crop_boxes, generate_cmd, load_photo

FEW = dict(photos="astronaut,camera,coins", test_photos="coins", crops_per_photo=3, image_size=16)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _meta(d: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (d / split / "metadata.jsonl").read_text().splitlines()]


def test_every_listed_photograph_loads_offline_as_rgb():
    for name in PHOTOS:
        a = load_photo(name)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 64, name
    assert set(TEST_PHOTOS) <= set(PHOTOS)


def test_split_by_photograph_captions_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert generate_cmd(PhotosConfig(out=str(a), seed=5, **FEW)) == 0
    generate_cmd(PhotosConfig(out=str(b), seed=5, **FEW))
    assert _files(a) == _files(b)  # same options, byte-identical files
    train, test = _meta(a, "train"), _meta(a, "test")
    assert len(train) == 6 and len(test) == 3
    assert {r["text"] for r in train} == {caption("astronaut"), caption("camera")}
    assert {r["text"] for r in test} == {caption("coins")} and caption("coins") == "a crop of the coins photograph"
    assert not {r["file_name"].split("-")[0] for r in train} & {r["file_name"].split("-")[0] for r in test}
    for split, rows in (("train", train), ("test", test)):
        for r in rows:
            img = Image.open(a / split / r["file_name"])
            assert img.mode == "RGB" and img.size == (16, 16)  # grayscale photographs (camera, coins) become RGB
    info = json.loads((a / MARKER).read_text())
    assert info["split"] == {"train": ["astronaut", "camera"], "test": ["coins"]}
    # another seed, other crops; a rerun into the same directory replaces the set
    generate_cmd(PhotosConfig(out=str(b), seed=6, **FEW))
    assert _files(a) != _files(b) and len(_meta(b, "train")) == 6


def test_readers_see_the_splits(tmp_path):
    from earlyfusion.training.vq_eval import load_images

    d = tmp_path / "photos"
    generate_cmd(PhotosConfig(out=str(d), **FEW))
    train, report = load_images(str(d), 16, split="train")
    test, _ = load_images(str(d), 16, split="test")
    assert train.shape == (6, 3, 16, 16) and test.shape == (3, 3, 16, 16) and report.total == 0


def test_crop_boxes_stay_inside_and_respect_the_scale_range():
    rng = np.random.default_rng(0)
    boxes = crop_boxes(rng, 300, 400, 500, 64, 0.25, 0.5)
    for top, left, side, _ in boxes:
        assert 75 <= side <= 150 and 0 <= top <= 300 - side and 0 <= left <= 400 - side
    assert len({b[3] for b in boxes}) == 2  # both mirrored and not
    assert min(b[2] for b in crop_boxes(rng, 300, 400, 50, 128, 0.1, 1.0)) >= 128  # never smaller than the output


@pytest.mark.parametrize("kw, match", [
    (dict(test_photos="unicorn"), "unknown photograph"),
    (dict(photos="astronaut,camera", test_photos="astronaut,camera"), "leave at least one"),
    (dict(photos="astronaut", test_photos="camera"), "not among"),
    (dict(image_size=4), "image-size"),
    (dict(crops_per_photo=0), "crops-per-photo"),
    (dict(min_scale=0.8, max_scale=0.5), "min-scale"),
])
def test_bad_options(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        PhotosConfig(out=str(tmp_path), **kw)


def test_cli_refuses_foreign_directory_with_one_line(tmp_path, capsys):
    from earlyfusion.cli import main

    (tmp_path / "mine.txt").write_text("keep me")
    code = main(["data", "photos", "--out", str(tmp_path), "--crops-per-photo", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a photos data set" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    code = main(["data", "photos", "--out", str(tmp_path / "x"), "--test-photos", "unicorn"])
    assert code == 2 and "unicorn" in capsys.readouterr().err
    with pytest.raises(UserError, match="is a file"):
        generate_cmd(PhotosConfig(out=str(tmp_path / "mine.txt"), **FEW))
