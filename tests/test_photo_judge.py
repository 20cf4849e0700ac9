"""Which-photograph figures on `data photos` data: the val split (new crops of the training photographs), the
judge trained on real training crops (earlyfusion/photo_judge.py), and `eval`'s photo_* figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earlyfusion.photo_judge import load_split, photo_of_caption, pil_batch, read_photos_info, train_judge
from earlyfusion.training.photos import MARKER, PhotosConfig, _boxes, caption, generate_cmd, load_photo, val_boxes

from conftest import assert_one_line_error, cli_status

FEW = dict(photos="astronaut,camera,coins", test_photos="coins", crops_per_photo=3, image_size=16)
# five textures and scenes the judge tells apart: four to train on, one held out
JUDGED = dict(photos="astronaut,coins,grass,moon,camera", test_photos="camera", crops_per_photo=24, val_crops=10,
              image_size=16, seed=3)
PHOTO_KEYS = ("photo_caption_accuracy", "photo_drawn_accuracy", "photo_judge_real_accuracy", "photo_judge_recon_accuracy")


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _meta(d: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (d / split / "metadata.jsonl").read_text().splitlines()]


def _pixels(d: Path, split: str) -> list[bytes]:
    return [np.asarray(Image.open(d / split / r["file_name"])).tobytes() for r in _meta(d, split)]


@pytest.fixture(scope="module")
def judged_photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("judged") / "photos"
    generate_cmd(PhotosConfig(out=str(d), **JUDGED))
    return d


# ---------------------------------------------------------------- the val split


def test_val_crops_are_new_crops_of_the_training_photographs(tmp_path):
    a, b, none = tmp_path / "a", tmp_path / "b", tmp_path / "none"
    generate_cmd(PhotosConfig(out=str(a), seed=5, val_crops=4, **FEW))
    generate_cmd(PhotosConfig(out=str(b), seed=5, val_crops=4, **FEW))
    generate_cmd(PhotosConfig(out=str(none), seed=5, val_crops=0, **FEW))
    assert _files(a) == _files(b)  # deterministic, val included
    assert not (none / "val").exists()
    for split in ("train", "test"):  # the val split leaves the other splits' files as they are
        assert {k: v for k, v in _files(a).items() if k.startswith(split + "/")} == \
               {k: v for k, v in _files(none).items() if k.startswith(split + "/")}
    val = _meta(a, "val")
    assert len(val) == 8 and {r["text"] for r in val} == {caption("astronaut"), caption("camera")}
    assert not set(_pixels(a, "val")) & set(_pixels(a, "train"))  # no val crop is a train crop
    assert len(set(_pixels(a, "val"))) == 8
    info = json.loads((a / MARKER).read_text())
    assert info["val"]["photos"] == ["astronaut", "camera"] and info["val"]["crops"] == {"astronaut": 4, "camera": 4}
    assert info["counts"] == {"train": 6, "test": 3, "val": 8}
    assert info["split"] == {"train": ["astronaut", "camera"], "test": ["coins"]}


def test_val_boxes_avoid_every_train_square():
    cfg = PhotosConfig(out="x", photos="astronaut,coins", test_photos="coins", crops_per_photo=300, val_crops=200,
                       image_size=16, min_scale=0.9)  # a narrow scale range: many val draws hit a train square
    shape = load_photo("astronaut").shape
    train = {b[:3] for b in _boxes(cfg, "astronaut", shape, cfg.crops_per_photo)}
    val = val_boxes(cfg, "astronaut", shape)
    assert len(val) == 200 and len({b[:3] for b in val}) == 200 and not {b[:3] for b in val} & train
    assert val == val_boxes(cfg, "astronaut", shape)


def test_val_shortfall_is_reported_not_silent(tmp_path, caplog):
    """At --min-scale 1 a square photograph has one square, which the train crops take: no val crops, said so."""
    d = tmp_path / "p"
    with caplog.at_level(logging.WARNING, logger="earlyfusion"):
        generate_cmd(PhotosConfig(out=str(d), min_scale=1.0, val_crops=2, **FEW))
    assert "only 0 of 2 crops of astronaut" in caplog.text and "only 0 of 2 crops of camera" in caplog.text
    assert not (d / "val").exists() and json.loads((d / MARKER).read_text())["val"]["crops"] == {"astronaut": 0, "camera": 0}


def test_bad_val_crops(tmp_path, capsys):
    for bad in (-1, 10**9):
        with pytest.raises(ValueError, match="val-crops"):
            PhotosConfig(out=str(tmp_path), val_crops=bad)
    rc, err = cli_status(capsys, ["data", "photos", "--out", tmp_path / "x", "--val-crops", "-3"])
    assert_one_line_error(rc, err)
    assert "val-crops" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- captions back to photographs


def test_photo_of_caption():
    captions = {n: caption(n) for n in ("brick", "camera", "coffee", "moon", "text")}
    assert photo_of_caption("a crop of the brick wall photograph", captions) == "brick"
    assert photo_of_caption("A crop of the Coffee Cup photograph.", captions) == "coffee"
    assert photo_of_caption("the moon", captions) == "moon"  # the photograph's own words suffice
    assert photo_of_caption("a crop of the street sign photograph photograph", captions) == "text"
    assert photo_of_caption("a crop of the brick photograph", captions) is None  # half a name names nothing
    assert photo_of_caption("a crop of the photograph", captions) is None
    assert photo_of_caption("a cameraman on the moon", captions) is None  # two photographs: neither
    assert photo_of_caption("", captions) is None


# ---------------------------------------------------------------- the judge


def test_judge_tells_the_training_photographs_apart(judged_photos):
    info = read_photos_info(judged_photos)
    captions = {n: info["captions"][n] for n in info["split"]["train"]}
    train, labels, skipped = load_split(judged_photos / "train", captions, 16)
    assert train.shape == (96, 3, 16, 16) and skipped == 0 and sorted(set(labels)) == ["astronaut", "coins", "grass", "moon"]
    val, truth, skipped = load_split(judged_photos / "val", captions, 16)
    assert len(truth) == 40 and skipped == 0
    judge = train_judge(train, labels, seed=0)
    assert judge.accuracy(val, truth) >= 0.7  # chance is 0.25
    assert judge.accuracy(train, labels) >= judge.accuracy(val, truth) - 0.05
    again = train_judge(train, labels, seed=0)
    assert torch.equal(judge.weight, again.weight) and judge.predict(val) == again.predict(val)
    # crops of a photograph it never saw are not a photograph of its own; a judge of PIL images agrees with tensors
    test, _, skipped = load_split(judged_photos / "test", captions, 16)
    assert len(test) == 0 and skipped == 24
    pil = [Image.open(judged_photos / "val" / r["file_name"]) for r in _meta(judged_photos, "val")]
    assert judge.predict(pil_batch(pil)) == judge.predict(val)
    assert judge.accuracy(val[:0], []) is None
    with pytest.raises(Exception, match="at least two photographs"):
        train_judge(train[:3], ["moon"] * 3)


# ---------------------------------------------------------------- eval on a photos set


def _eval_json(capsys, *argv) -> dict:
    from earlyfusion.cli import main

    capsys.readouterr()
    rc = main(["eval", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_eval_reports_which_photograph_on_the_val_split(capsys, tiny_pipeline, judged_photos, tmp_path):
    fig = _eval_json(capsys, "--checkpoint", tiny_pipeline.lm, "--data", judged_photos, "--out", tmp_path / "e",
                     "--cfg", 0)
    assert fig["split"] == "val" and fig["pairs"] == 40 and fig["photo_pairs"] == 40
    for key in PHOTO_KEYS:
        assert isinstance(fig[key], float) and 0.0 <= fig[key] <= 1.0, (key, fig[key])
    assert fig["photo_judge_real_accuracy"] >= 0.7
    for key in ("caption_exact_match", "caption_bleu4", "psnr", "copy_rate"):  # the other figures stay
        assert key in fig
    rows = [json.loads(line) for line in (Path(fig["images_out"]) / "metadata.jsonl").read_text().splitlines()]
    judged = [r["judged_photo"] for r in rows]
    assert set(judged) <= {"astronaut", "coins", "grass", "moon"}
    truth = [photo_of_caption(r["text"], read_photos_info(judged_photos)["captions"]) for r in rows]
    assert sum(j == t for j, t in zip(judged, truth)) / 40 == pytest.approx(fig["photo_drawn_accuracy"])
    # the test split: photographs the judge never saw, so no which-photograph figures; other data has none either
    fig = _eval_json(capsys, "--checkpoint", tiny_pipeline.lm, "--data", judged_photos, "--split", "test",
                     "--out", tmp_path / "t", "--limit", 2, "--cfg", 0)
    assert fig["split"] == "test" and all(fig[k] is None for k in (*PHOTO_KEYS, "photo_pairs"))
    fig = _eval_json(capsys, "--checkpoint", tiny_pipeline.lm, "--data", tiny_pipeline.data, "--out", tmp_path / "s",
                     "--limit", 2, "--cfg", 0)
    assert fig["split"] == "test" and all(fig[k] is None for k in PHOTO_KEYS)
    assert fig["image_temperature"] == 0.0  # captions of the built-in grammar: greedy drawings, judged exactly


def test_eval_photo_figures_follow_an_oracle(monkeypatch, tiny_pipeline, judged_photos, tmp_path):
    """Readings that name the photograph (all but one) and drawings that are the real crops: the caption figure
    counts the names, and the drawn figure equals the judge's own on real crops."""
    import earlyfusion.evaluate as E

    def oracle_read(decoder, vocab, pairs, batch_size=64, device="cpu"):
        return ["a crop of the photograph"] + [p.caption.upper() for p in pairs[1:]]

    temperatures = []

    def oracle_draw(decoder, vocab, vq, captions, cfg, seed, batch_size=64, device="cpu", image_temperature=0.0,
                    grids=None):
        temperatures.append(image_temperature)
        return [Image.open(judged_photos / "val" / r["file_name"]).convert("RGB") for r in _meta(judged_photos, "val")]

    monkeypatch.setattr(E, "read_captions", oracle_read)
    monkeypatch.setattr(E, "draw_images", oracle_draw)
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(judged_photos), out=str(tmp_path)))
    assert fig["photo_caption_accuracy"] == pytest.approx(39 / 40)
    assert fig["photo_drawn_accuracy"] == pytest.approx(fig["photo_judge_real_accuracy"])
    # a caption names many crops of its photograph: drawn by sampling unless asked otherwise
    assert temperatures == [1.0] and fig["image_temperature"] == 1.0
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(judged_photos), out=str(tmp_path / "g"),
                                  image_temperature=0.0))
    assert temperatures == [1.0, 0.0] and fig["image_temperature"] == 0.0


@pytest.mark.parametrize("argv", [["--split", ""], ["--split", "../x"], ["--split", ".."]])
def test_bad_split(capsys, tmp_path, argv):
    rc, err = cli_status(capsys, ["eval", "--checkpoint", tmp_path / "run", "--data", tmp_path, *argv])
    assert_one_line_error(rc, err)
    assert "--split" in err


def test_missing_split_names_it(capsys, tiny_pipeline):
    rc, err = cli_status(capsys, ["eval", "--checkpoint", tiny_pipeline.lm, "--data", tiny_pipeline.data, "--split", "dev"])
    assert_one_line_error(rc, err)
    assert "no 'dev' folder" in err and "--split" in err
