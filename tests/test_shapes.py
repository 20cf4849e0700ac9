"""Built-in shapes data: geometry, captions <-> attributes, the analytic judge, the generator."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from earlyfusion.core.errors import UserError
from earlyfusion.training.shapes import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SQUARE,
    TALL,
    WIDE,
    ShapeSpec,
    _placements,
    caption,
    parse_caption,
    parse_picture,
    picture_of,
    random_scene,
    render,
    render_array,
    shape_mask,
    shape_sizes,
)
from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd, parse_sizes
from earlyfusion.training.shapes_judge import recognise

ALL_SINGLE = [frozenset([ShapeSpec(sh, c, sz, p)]) for sh in SHAPES for c in COLOURS for sz in SIZES for p in POSITIONS]


def scenes(n: int, seed: int) -> list[frozenset[ShapeSpec]]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------- vocabulary and geometry


def test_colours_well_separated_from_each_other_and_background():
    cols = list(COLOURS.values()) + [BACKGROUND]
    assert min(math.dist(a, b) for a, b in itertools.combinations(cols, 2)) > 120
    assert len(SHAPES) >= 3 and len(COLOURS) >= 6 and len(SIZES) == 2 and len(POSITIONS) == 9


@pytest.mark.parametrize("size", [16, 24, 32, 48, 64, 128, 256])
def test_shapes_fit_their_cells_and_never_overlap(size):
    sides = shape_sizes(size)
    assert sides["small"] < sides["large"]
    boxes = {}
    for (sz, pos), (top, left) in _placements(size).items():
        side = sides[sz]
        assert 0 <= top and top + side <= size and 0 <= left and left + side <= size
        boxes[sz, pos] = (top, left, side)
    gap = 1 if size >= 24 else 0  # at 16 px large shapes in neighbouring cells may touch, never overlap
    for pa, pb in itertools.combinations(POSITIONS, 2):
        ta, la, s = boxes["large", pa]
        tb, lb, _ = boxes["large", pb]
        assert abs(ta - tb) >= s + gap or abs(la - lb) >= s + gap, (pa, pb)
    masks = [shape_mask(sh, sides[sz]) for sz in SIZES for sh in SHAPES]  # every (shape, size) is a distinct pattern
    assert len({(m.shape, m.tobytes()) for m in masks}) == len(masks)


def test_render_is_exact_and_deterministic():
    scene = frozenset([ShapeSpec("square", "red", "large", "top left"), ShapeSpec("circle", "blue", "small", "bottom")])
    a = render_array(scene, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    colours = {tuple(map(int, c)) for c in a.reshape(-1, 3)}
    assert colours == {BACKGROUND, COLOURS["red"], COLOURS["blue"]}  # hard edges: no blended pixels
    assert (a == COLOURS["red"]).all(-1).sum() == shape_sizes(32)["large"] ** 2
    assert np.array_equal(a, np.asarray(render(scene, 32)))


def test_random_scenes_follow_the_rules():
    ss = scenes(2000, 0)
    counts = [len(s) for s in ss]
    assert set(counts) == {1, 2} and 0.4 < counts.count(1) / len(ss) < 0.6
    for s in ss:
        assert len({x.position for x in s}) == len(s) and len({x.colour for x in s}) == len(s)
    seen = {(x.shape, x.colour, x.size, x.position) for s in ss for x in s}
    assert len(seen) == len(ALL_SINGLE)  # every attribute combination occurs


def test_spec_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="colour"):
        ShapeSpec("circle", "mauve", "small", "top")


# ---------------------------------------------------------------- captions


def test_caption_example_and_canonical_order():
    a = ShapeSpec("circle", "red", "small", "top left")
    b = ShapeSpec("square", "blue", "large", "bottom")
    assert caption([b, a]) == caption({a, b}) == "a small red circle at the top left and a large blue square at the bottom"
    assert caption([ShapeSpec("triangle", "cyan", "large", "centre")]) == "a large cyan triangle in the centre"


def test_caption_round_trip():
    for scene in ALL_SINGLE + scenes(500, 1):
        text = caption(scene)
        assert parse_caption(text) == scene, text
        assert parse_caption("  " + text.upper() + ". ") == scene  # tolerant of model-output noise


def test_non_square_pictures_fill_the_canvas_and_say_their_shape():
    scene = frozenset([ShapeSpec("square", "red", "large", "top left"), ShapeSpec("circle", "blue", "small", "bottom right")])
    a = render_array(scene, (48, 32))
    assert a.shape == (32, 48, 3)
    assert np.array_equal(a, render_array(scene, (48, 32))) and np.array_equal(render_array(scene, (32, 32)),
                                                                               render_array(scene, 32))
    red = np.argwhere((a == COLOURS["red"]).all(-1))
    blue = np.argwhere((a == COLOURS["blue"]).all(-1))
    assert len(red) == shape_sizes(32)["large"] ** 2  # shapes are sized by the short side
    assert red[:, 1].max() < 16 and blue[:, 1].min() >= 32  # the cells spread over the whole width
    for top, left in _placements(48, 32).values():
        assert 0 <= top and 0 <= left
    assert (picture_of(48, 32), picture_of(32, 48), picture_of(32, 32)) == (WIDE, TALL, SQUARE)
    text = "a large red square at the top left and a small blue circle at the bottom right"
    assert caption(scene) == caption(scene, SQUARE) == text  # a square caption is as it always was
    assert caption(scene, WIDE) == "a wide picture: " + text and caption(scene, TALL) == "a tall picture: " + text
    for picture in (SQUARE, WIDE, TALL):
        assert parse_picture(caption(scene, picture)) == (picture, scene)
        assert parse_caption(caption(scene, picture)) == scene
    assert parse_picture("  A WIDE picture:  " + text.upper() + ".") == (WIDE, scene)
    for bad in ("a wide picture:", "a wide picture: hello", "a square picture: " + text, "a round picture: " + text):
        assert parse_picture(bad) is None and parse_caption(bad) is None
    with pytest.raises(ValueError, match="picture"):
        caption(scene, "round")


def test_sizes_are_parsed_and_bad_ones_refused():
    assert parse_sizes("32x32,48x32") == [(32, 32), (48, 32)]
    assert parse_sizes(" 64X16 , 16x64") == [(64, 16), (16, 64)]
    assert ShapesConfig(out="x", sizes="48x32").canvases() == [(48, 32)]
    assert ShapesConfig(out="x", image_size=16).canvases() == [(16, 16)]
    for bad in ("", "0x32", "32x0", "abc", "32x", "32x32x32", "-32x32", "32.5x32", "2048x32", "32x36", "8x8",
                "128x16", "32x32,32x32", ",".join(f"{32 + 8 * i}x40" for i in range(17))):
        with pytest.raises(ValueError, match="sizes"):
            ShapesConfig(out="x", sizes=bad)
    with pytest.raises(ValueError, match="not both"):
        ShapesConfig(out="x", sizes="48x32", image_size=16)


def test_generate_on_several_canvas_sizes(tmp_path):
    out, square = tmp_path / "sizes", tmp_path / "square"
    cfg = dict(num_images=60, seed=4, num_interleaved=4, num_text=4)
    generate_cmd(ShapesConfig(out=str(out), sizes="32x32,48x32,24x40", **cfg))
    generate_cmd(ShapesConfig(out=str(square), **cfg))
    seen = set()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        same_seed = [json.loads(line) for line in (square / split / "metadata.jsonl").read_text().splitlines()]
        for row, other in zip(rows, same_seed):
            img = Image.open(out / split / row["file_name"])
            assert img.size in {(32, 32), (48, 32), (24, 40)}
            seen.add(img.size)
            picture, scene = parse_picture(row["text"])
            assert picture == picture_of(*img.size) and recognise(img) == scene
            assert scene == parse_caption(other["text"])  # the scenes of a one-size data set of the same seed
    assert seen == {(32, 32), (48, 32), (24, 40)}
    info = json.loads((out / "shapes.json").read_text())
    assert info["canvases"] == [[32, 32], [48, 32], [24, 40]] and "image_size" not in info
    assert json.loads((square / "shapes.json").read_text())["image_size"] == 32


def test_one_square_size_is_the_square_data_set(tmp_path):
    cfg = dict(num_images=20, num_interleaved=3, num_text=3, seed=2)
    generate_cmd(ShapesConfig(out=str(tmp_path / "a"), image_size=16, **cfg))
    generate_cmd(ShapesConfig(out=str(tmp_path / "b"), sizes="16x16", **cfg))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


@pytest.mark.parametrize("text", ["", "hello", "a small red circle", "a tiny red circle at the top",
                                  "a small red circle at the top and", "a small red circle at the top and a large "
                                  "blue square at the top", "a small red circle at the middle", None])
def test_parse_caption_rejects(text):
    assert parse_caption(text) is None


# ---------------------------------------------------------------- the judge


def test_recognise_ground_truth():
    for scene in ALL_SINGLE:
        assert recognise(render(scene, 32)) == scene
    for size, n in ((32, 300), (16, 60), (64, 60)):
        ss = scenes(n, size)
        acc = np.mean([recognise(render(s, size)) == s for s in ss])
        assert acc >= 0.99, (size, acc)
    # pictures that are not square: every canvas size --sizes accepts the shape of
    for canvas in ((48, 32), (32, 48), (64, 16), (16, 64), (40, 24)):
        for scene in ALL_SINGLE[::7]:
            assert recognise(render(scene, canvas)) == scene, (canvas, scene)
        ss = scenes(60, sum(canvas))
        acc = np.mean([recognise(render(s, canvas)) == s for s in ss])
        assert acc >= 0.99, (canvas, acc)


def test_recognise_degrades_gracefully():
    rng = np.random.default_rng(5)
    ss = scenes(100, 6)
    noisy_ok = blur_ok = 0
    for s in ss:
        a = render_array(s, 32).astype(np.float64) + rng.normal(0, 15, (32, 32, 3))
        for r, c in rng.integers(0, 32, (5, 2)):  # a few flipped pixels
            a[r, c] = rng.integers(0, 256, 3)
        noisy_ok += recognise(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))) == s
        blur_ok += recognise(render(s, 32).filter(ImageFilter.GaussianBlur(0.8))) == s
    assert noisy_ok >= 95 and blur_ok >= 95, (noisy_ok, blur_ok)
    assert recognise(Image.new("RGB", (32, 32), BACKGROUND)) == frozenset()
    assert recognise(Image.new("RGB", (32, 32), (255, 255, 255))) == frozenset()
    # a different scene is not mistaken for the right one
    s0 = frozenset([ShapeSpec("circle", "red", "small", "top")])
    for other in ({ShapeSpec("square", "red", "small", "top")}, {ShapeSpec("circle", "red", "large", "top")},
                  {ShapeSpec("circle", "purple", "small", "top")}, {ShapeSpec("circle", "red", "small", "top left")}):
        assert recognise(render(other, 32)) != s0


# ---------------------------------------------------------------- the generator


def test_config_validation():
    for bad in (dict(num_images=1), dict(image_size=20), dict(image_size=8), dict(test_fraction=0.0),
                dict(test_fraction=1.0), dict(num_text=-1), dict(val_fraction=-0.1), dict(val_fraction=1.5)):
        with pytest.raises(ValueError):
            ShapesConfig(out="x", **bad)


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_generate_layout_and_contents(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert generate_cmd(ShapesConfig(out=str(out), num_images=40, seed=3, num_interleaved=12, num_text=15)) == 0
    assert "36 train + 2 val + 4 test" in capsys.readouterr().out
    for split, n in (("train", 36), ("val", 2), ("test", 4)):
        rows = [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == n and len(list((out / split).glob("*.png"))) == n
        for row in rows:
            img = Image.open(out / split / row["file_name"])
            assert img.size == (32, 32) and img.mode == "RGB"
            assert recognise(img) == parse_caption(row["text"])  # caption is a function of the image
    docs = [json.loads(line) for line in (out / "interleaved.jsonl").read_text().splitlines()]
    assert len(docs) == 12
    for d in docs:
        assert len(d["texts"]) == len(d["images"]) >= 2
        for t, i in zip(d["texts"], d["images"]):
            assert (t is None) != (i is None)
            if i is not None:
                assert (out / i).is_file()
    texts = [json.loads(line)["text"] for line in (out / "text.jsonl").read_text().splitlines()]
    assert len(texts) == 15 and all(isinstance(t, str) and t for t in texts)
    assert json.loads((out / "shapes.json").read_text())["counts"] == {"train": 36, "val": 2, "test": 4,
                                                                       "interleaved": 12, "text": 15}
    # train and test do not depend on the val split: adding one leaves every other file as it was
    generate_cmd(ShapesConfig(out=str(tmp_path / "noval"), num_images=40, seed=3, num_interleaved=12, num_text=15,
                              val_fraction=0))
    assert not (tmp_path / "noval" / "val").exists()
    shutil.rmtree(out / "val")
    info = json.loads((out / "shapes.json").read_text())
    del info["counts"]["val"]
    (out / "shapes.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    assert tree_digest(tmp_path / "noval") == tree_digest(out)


def test_generate_deterministic_and_replaces(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cfg = dict(num_images=30, num_interleaved=5, num_text=5, image_size=16)
    generate_cmd(ShapesConfig(out=str(a), seed=7, **cfg))
    generate_cmd(ShapesConfig(out=str(b), seed=7, **cfg))
    generate_cmd(ShapesConfig(out=str(c), seed=8, **cfg))
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)
    generate_cmd(ShapesConfig(out=str(b), seed=8, **cfg))  # a previous shapes data set is replaced whole
    assert tree_digest(b) == tree_digest(c)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="not a shapes data set"):
        generate_cmd(ShapesConfig(out=str(tmp_path / "mine"), **cfg))


def test_datasets_imagefolder_loads_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "shapes"
    generate_cmd(ShapesConfig(out=str(out), num_images=20, num_interleaved=2, num_text=2))
    ds = datasets.load_dataset("imagefolder", data_dir=str(out / "train"), split="train", cache_dir=str(tmp_path / "c"))
    assert len(ds) == 18 and set(ds.column_names) == {"image", "text"}
    assert recognise(ds[0]["image"]) == parse_caption(ds[0]["text"])
    both = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "c2"))
    # the root works too: train/validation/test splits
    assert (len(both["train"]), len(both["validation"]), len(both["test"])) == (18, 1, 2)


def test_cli_options(tmp_path):
    """The CLI's generated parser for this config: every option documented, values reach the config."""
    from earlyfusion.cli import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, ShapesConfig)
    help_text = parser.format_help()
    for opt in ("--out", "--num-images", "--image-size", "--seed", "--test-fraction", "--num-interleaved", "--num-text"):
        assert opt in help_text
    assert "multiple of 8" in help_text
    ns = parser.parse_args(["--out", str(tmp_path / "d"), "--num-images", "12", "--image-size", "16", "--seed", "4"])
    cfg = config_from_args(ShapesConfig, ns)
    assert (cfg.num_images, cfg.image_size, cfg.seed, cfg.num_text) == (12, 16, 4, 1000)


def test_cli_end_to_end(tmp_path):
    from earlyfusion.cli import main

    rc = main(["data", "shapes", "--out", str(tmp_path / "d"), "--num-images", "10", "--num-interleaved", "2",
               "--num-text", "2"])
    assert rc == 0 and (tmp_path / "d" / "test" / "metadata.jsonl").is_file()
    assert main(["data", "shapes", "--out", str(tmp_path / "e"), "--image-size", "20"]) == 2  # validation -> one-line error


@pytest.mark.parametrize("argv", [
    ["--image-size", "100000"], ["--image-size", "12"], ["--seed", "-1"], ["--seed", str(2 ** 40)],
    ["--num-images", "1e9"], ["--num-images", "-3"], ["--num-images", "100000000"], ["--test-fraction", "nan"],
    ["--num-text", "-1"], ["--num-interleaved", "99999999999"],
    ["--sizes", "0x32"], ["--sizes", "abc"], ["--sizes", "4096x32"], ["--sizes", "32x32,"],
])
def test_bad_values_one_line_nothing_written(tmp_path, capsys, argv):
    from earlyfusion.cli import main

    out = tmp_path / "d"
    capsys.readouterr()
    try:
        rc = main(["data", "shapes", "--out", str(out), *argv])
    except SystemExit as e:  # argparse's own refusals (a value of the wrong type)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_refuses_what_the_disk_cannot_hold(tmp_path, capsys, monkeypatch):
    """A data set larger than the free space is refused up front with its estimated size, not written until full."""
    import shutil as sh
    from collections import namedtuple

    from earlyfusion.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 10 ** 6, 10 ** 6))  # 1 MB free
    capsys.readouterr()
    rc = main(["data", "shapes", "--out", str(tmp_path / "d"), "--num-images", "5000"])
    err = capsys.readouterr().err
    assert rc == 2 and "GB" in err and "free" in err and not (tmp_path / "d").exists()
