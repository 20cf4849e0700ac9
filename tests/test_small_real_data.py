"""Small real data sets: `data digits`, and reading and drawing scored by class on a closed caption set."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earlyfusion.class_judge import CLASS_KEYS, class_figures, closed_set, fit_linear, training_captions
from earlyfusion.cli import main
from earlyfusion.training import digits

from conftest import cli_status


def _meta(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digit_set(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("digits") / "d"
    assert main(["data", "digits", "--out", str(out), "--image-size", "16", "--seed", "3"]) == 0
    return out


def test_digits_are_split_by_class_with_one_caption_each(digit_set):
    rows = {s: _meta(digit_set / s) for s in ("train", "val", "test")}
    assert sum(len(r) for r in rows.values()) == 1797  # every digit once
    files = [r["file_name"] for rs in rows.values() for r in rs]
    assert len(set(files)) == len(files)
    for split, share in (("test", 0.2), ("val", 0.1)):
        per = Counter(r["text"] for r in rows[split])
        assert set(per) == {digits.caption(c) for c in range(10)}  # every class held out
        assert all(abs(n - share * 180) <= 3 for n in per.values()), per  # its share of each class (~180 each)
    first = rows["train"][0]
    word = first["file_name"].split("-")[0]
    assert first["text"] == f"a handwritten digit {word}"
    img = Image.open(digit_set / "train" / first["file_name"])
    assert img.size == (16, 16) and img.mode == "RGB"
    a = np.asarray(img)
    assert a.min() < 80 and a.max() > 240  # dark ink on white
    info = json.loads((digit_set / digits.MARKER).read_text())
    assert info["counts"] == {s: len(r) for s, r in rows.items()}


def test_digits_same_seed_same_files_other_seed_other_split(digit_set, tmp_path):
    again, other = tmp_path / "a", tmp_path / "b"
    assert main(["data", "digits", "--out", str(again), "--image-size", "16", "--seed", "3"]) == 0
    assert main(["data", "digits", "--out", str(other), "--image-size", "16", "--seed", "4"]) == 0
    for split in ("train", "test"):
        assert (again / split / "metadata.jsonl").read_bytes() == (digit_set / split / "metadata.jsonl").read_bytes()
    name = _meta(digit_set / "train")[5]["file_name"]
    assert (again / "train" / name).read_bytes() == (digit_set / "train" / name).read_bytes()
    assert {r["file_name"] for r in _meta(other / "test")} != {r["file_name"] for r in _meta(digit_set / "test")}
    assert main(["data", "digits", "--out", str(again), "--image-size", "16", "--seed", "4"]) == 0  # replaced
    assert _meta(again / "test") == _meta(other / "test")


def test_digits_errors_are_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    for argv, words in ((["--out", str(tmp_path / "f")], "is a file"),
                        (["--out", str(tmp_path / "busy")], "not a digits data set"),
                        (["--out", str(tmp_path / "x"), "--test-fraction", "0"], "--test-fraction"),
                        (["--out", str(tmp_path / "x"), "--test-fraction", "0.5", "--val-fraction", "0.5"], "below 0.9")):
        code, err = cli_status(capsys, ["data", "digits", *argv])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "sklearn", None)  # scikit-learn not installed
    code, err = cli_status(capsys, ["data", "digits", "--out", str(tmp_path / "y")])
    assert code == 2 and "scikit-learn" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "y").exists()


def test_closed_set():
    train = Counter({("a", "cat"): 5, ("a", "dog"): 4})
    assert closed_set(train, ["a cat", "A dog."])  # words compared, case and punctuation aside
    assert not closed_set(train, ["a cat", "a bird"])  # a held-out caption never trained on
    assert not closed_set(train, [])
    assert not closed_set(Counter({("a", "cat"): 9}), ["a cat"])  # one class: nothing to tell apart
    assert not closed_set(Counter({(str(i),): 1 for i in range(10)}), ["1"])  # a caption per image: open captions


def _blobs(n: int, side: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images of two classes that a linear model tells apart: a bright left half or a bright right half, in noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g) - 0.5
    labels = ["left" if i % 2 else "right" for i in range(n)]
    for i, t in enumerate(labels):
        half = slice(0, side // 2) if t == "left" else slice(side // 2, side)
        x[i, :, :, half] += 0.6
    return x.clamp(-1, 1), labels


def test_linear_classifier_learns_and_can_fail():
    x, y = _blobs(60)
    xt, yt = _blobs(40, seed=1)
    assert fit_linear(x, y).accuracy(xt, yt) >= 0.95
    assert fit_linear(x, y, with_blurred=True).accuracy(xt, yt) >= 0.95
    assert fit_linear(x, y).accuracy(xt, ["left" if t == "right" else "right" for t in yt]) <= 0.05


def _folder(root: Path, images: torch.Tensor, labels: list[str]) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i, (im, t) in enumerate(zip(images, labels)):
        a = im.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(a, "RGB").save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"bright on the {t}"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows))
    return root


def test_class_figures_follow_readings_and_drawings(tmp_path):
    x, y = _blobs(60)
    train = _folder(tmp_path / "train", x, y)
    xt, yt = _blobs(20, seed=1)
    captions = [f"bright on the {t}" for t in yt]
    assert training_captions(train) == Counter({("bright", "on", "the", "left"): 30, ("bright", "on", "the", "right"): 30})
    real = torch.from_numpy(np.stack([np.asarray(Image.fromarray(
        im.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), "RGB"))
        for im in xt])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    drawn = [Image.fromarray(im.add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy(), "RGB") for im in real]
    reads = [c.upper() for c in captions[:15]] + ["bright on the top"] * 5
    swapped = drawn[1:] + drawn[:1]  # every drawing shows the other class (the classes alternate)
    fig, per = class_figures(train, captions, reads, real, swapped, lambda: real)
    assert fig["class_pairs"] == 20 and fig["class_count"] == 2
    assert fig["class_caption_accuracy"] == pytest.approx(15 / 20)
    assert fig["class_linear_accuracy"] >= 0.95 and fig["class_judge_real_accuracy"] >= 0.95
    assert fig["class_judge_recon_accuracy"] == fig["class_judge_real_accuracy"]
    assert fig["class_drawn_accuracy"] <= 0.05
    shown = [f"bright on the {yt[(i + 1) % 20]}" for i in range(20)]  # what each drawing shows
    assert sum(p["judged_class"] == s for p, s in zip(per, shown)) >= 19
    fig, _ = class_figures(train, captions, reads, real, drawn, lambda: real)
    assert fig["class_drawn_accuracy"] == pytest.approx(fig["class_judge_real_accuracy"])
    # a held-out caption the training split never had: open captions, no class figures
    fig, per = class_figures(train, captions[:-1] + ["a new caption"], reads, real, drawn, lambda: real)
    assert all(fig[k] is None for k in CLASS_KEYS) and per == [{} for _ in drawn]
    fig, _ = class_figures(tmp_path / "missing", captions, reads, real, drawn, lambda: real)
    assert all(fig[k] is None for k in CLASS_KEYS)


# ---------------------------------------------------------------- what an unset --augment-views adds


def _captioned(root: Path, captions: list[str]) -> Path:
    root.mkdir(parents=True)
    for i in range(len(captions)):
        Image.new("RGB", (8, 8), (i * 7 % 256, 0, 0)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                 for i, c in enumerate(captions)))
    return root


def test_class_captions_get_large_crops_when_pairs_repeat(tmp_path, caplog):
    from earlyfusion.training import sizing
    from earlyfusion.training.data import DataConfig
    from earlyfusion.training.data.config import SIZED_CROP_SCALE, SIZED_CROP_VIEWS

    classes = tmp_path / "classes"
    _captioned(classes / "train", [f"a photo of a {w}" if i % 2 else f"A photo of a  {w}"
                                   for w in ("cat", "dog", "fox") for i in range(6)])
    scenes = _captioned(tmp_path / "scenes" / "train", [f"a red square at {i} and a circle" for i in range(18)])
    counts = sizing.caption_counts([str(classes)])
    assert counts == Counter({"a photo of a cat": 6, "a photo of a dog": 6, "a photo of a fox": 6})  # case, spaces aside
    assert sizing.class_captions(counts)
    assert not sizing.class_captions(sizing.caption_counts([str(scenes.parent)]))  # a caption per picture
    assert not sizing.class_captions(Counter({"a cat": 40}))  # one caption: nothing to tell apart
    assert sizing.caption_counts([str(tmp_path / "docs.jsonl")]) is None  # not an imagefolder: not read
    unset = DataConfig(sources=[str(classes)])
    crops = unset.sized(True, mirror_safe=False, crop_safe=True)
    assert (crops.augment_views, crops.augment_scale, crops.augment_flip) == (SIZED_CROP_VIEWS, SIZED_CROP_SCALE, False)
    assert not any(crops.augment(0).mirrored(v) for v in range(SIZED_CROP_VIEWS))  # a digit mirrored is another one
    assert unset.sized(False, mirror_safe=False, crop_safe=True).augment_views == 1  # pairs seen few times: none
    assert unset.sized(True, mirror_safe=True, crop_safe=True).augment_flip  # the built-in data keeps its mirror
    with caplog.at_level("INFO"):
        data, noise = sizing.sized_options(unset, None, sizing.MANY_PASSES + 1, seed=0)
    assert (data.augment_views, data.augment_scale, data.augment_flip) == (SIZED_CROP_VIEWS, SIZED_CROP_SCALE, False)
    assert noise == sizing.SIZED_IMAGE_TOKEN_NOISE
    said = [r.getMessage() for r in caplog.records if "would be seen about" in r.getMessage()]
    assert len(said) == 1 and "crops of at least 90%" in said[0] and "mirror" not in said[0]
    assert sizing.sized_options(unset, None, sizing.MANY_PASSES, seed=0)[0].augment_views == 1
    assert sizing.sized_options(DataConfig(sources=[str(scenes.parent)]), None, 99, seed=0)[0].augment_views == 1
    given = DataConfig(sources=[str(classes)], augment_views=1)
    assert sizing.sized_options(given, None, 99, seed=0)[0].augment_views == 1  # a given value stays


def test_eval_scores_a_closed_caption_set_by_class(capsys, tiny_pipeline, digit_set, tmp_path):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_pipeline.lm), "--data", str(digit_set), "--out", str(tmp_path / "e"),
                 "--limit", "30", "--cfg", "0", "--json"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["split"] == "test" and fig["class_pairs"] == 30 and fig["class_count"] == 10
    for key in CLASS_KEYS[2:]:
        assert isinstance(fig[key], float) and 0.0 <= fig[key] <= 1.0, (key, fig[key])
    assert fig["class_linear_accuracy"] >= 0.8  # handwritten digits are read by a linear model on their pixels
    assert fig["class_caption_accuracy"] == fig["caption_exact_match"]  # one caption per class: the same figure
    rows = _meta(Path(fig["images_out"]))
    assert sum(r["judged_class"] == r["text"] for r in rows) / 30 == pytest.approx(fig["class_drawn_accuracy"])
    assert main(["eval", "--checkpoint", str(tiny_pipeline.lm), "--data", str(tiny_pipeline.data), "--out",
                 str(tmp_path / "s"), "--limit", "2", "--cfg", "0", "--json"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(fig[k] is None for k in CLASS_KEYS)  # scene captions: no class per caption
