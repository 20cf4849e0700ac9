"""`earlyfusion eval` (earlyfusion/evaluate.py): the JSON figures on the tiny pipeline, the scoring of
reading/drawing, free-form imagefolder data, clear errors on bad input, and the validation losses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from earlyfusion.evaluate import _attribute_scores
from earlyfusion.scores import corpus_bleu, exact_match
from earlyfusion.training.monitor import validation_losses
from earlyfusion.training.shapes import ShapeSpec

ATTRIBUTES = ("count_match", "shape", "colour", "size", "position")


def _eval(capsys, *argv) -> tuple[int, str, str]:
    from earlyfusion.cli import main

    capsys.readouterr()  # drop anything printed before
    try:
        rc = main(["eval", *map(str, argv)])
    except SystemExit as e:  # argparse's own refusals (a value of the wrong type)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _last_json(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "eval --json printed nothing on stdout"
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict)
    return figures


def _one_error_line(rc: int, err: str, *words) -> str:
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("earlyfusion: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert str(w) in lines[0], f"{w!r} not named in: {lines[0]}"
    return lines[0]


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------- the command on the tiny pipeline


def test_eval_json_on_tiny_pipeline(capsys, tiny_pipeline, tmp_path):
    out_dir = tmp_path / "eval"
    rc, out, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", tiny_pipeline.data,
                         "--json", "--limit", 6, "--batch-size", 4, "--out", out_dir)
    assert rc == 0, err
    fig = _last_json(out)
    assert fig["pairs"] == 6
    assert fig["step"] == 12
    for key in ("caption_exact_match", "t2i_exact_match"):
        assert isinstance(fig[key], float) and 0.0 <= fig[key] <= 1.0, (key, fig[key])
    for key in ("loss_text", "loss_image", "unigram_text", "unigram_image", "psnr"):
        assert _positive_finite(fig[key]), (key, fig[key])
    assert 0.0 < fig["codebook_usage"] <= 1.0
    assert -1.0 <= fig["ssim"] <= 1.0
    assert fig["sampling_precision"] == "fp32"  # the suite runs the fp32 branch of --mixed-precision auto
    for prefix in ("caption", "t2i"):
        for a in ATTRIBUTES:
            v = fig[f"{prefix}_{a}"]
            assert isinstance(v, float) and 0.0 <= v <= 1.0, (prefix, a, v)
    for prefix in ("caption", "t2i"):  # an exact scene has the right number of shapes
        assert fig[f"{prefix}_exact_match"] <= fig[f"{prefix}_count_match"]
    # the human-readable table goes to stderr with --json, so the JSON line is the whole stdout
    assert len([line for line in out.splitlines() if line.strip()]) == 1
    assert "loss_text" in err

    saved = json.loads((out_dir / "figures.json").read_text(encoding="utf-8"))
    assert saved["loss_text"] == pytest.approx(fig["loss_text"])
    assert saved["caption_exact_match"] == fig["caption_exact_match"]
    sheet = Path(fig["sheet"])
    assert sheet == out_dir / "sheet.png" and sheet.is_file()
    with Image.open(sheet) as im:
        w, h = im.size
    assert w > 2 * 16 * 3 and h >= 6 * 16 * 3  # two image columns and one row per pair (3x scale)


def test_eval_default_out_is_under_the_run(capsys, tiny_pipeline, tmp_path):
    """Without --out the figures land in <run>/eval; the run is copied so the session fixture stays clean."""
    run = tmp_path / "lm"
    shutil.copytree(tiny_pipeline.lm, run)
    rc, out, err = _eval(capsys, "--checkpoint", run, "--data", tiny_pipeline.data, "--limit", 2, "--cfg", 0)
    assert rc == 0, err
    assert "caption_exact_match" in out  # table on stdout without --json
    assert (run / "eval" / "figures.json").is_file()
    assert (run / "eval" / "sheet.png").is_file()
    assert len(list((run / "eval" / "drawn").glob("*.png"))) == 2  # the drawings beside them


def test_eval_scores_what_is_read_and_drawn(monkeypatch, tiny_pipeline, tmp_path):
    """evaluate() with an oracle reader/drawer (one mistake each): the figures follow the predictions."""
    import earlyfusion.evaluate as E
    from earlyfusion.training import shapes

    seen: list[str] = []

    def oracle_read(decoder, vocab, pairs, batch_size=64, device="cpu"):
        seen[:] = [p.caption for p in pairs]
        return ["an unparseable caption"] + [p.caption.upper() + "." for p in pairs[1:]]  # parse_caption tolerates case/stop

    def oracle_draw(decoder, vocab, vq, captions, cfg, seed, batch_size=64, device="cpu", image_temperature=0.0,
                    grids=None):
        scenes = [shapes.parse_caption(c) for c in captions]
        scenes[-1] = scenes[0]  # the last drawing shows the first caption's scene
        return [shapes.render(s, vq.cfg.image_size) for s in scenes]

    monkeypatch.setattr(E, "read_captions", oracle_read)
    monkeypatch.setattr(E, "draw_images", oracle_draw)
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(tiny_pipeline.data), limit=5, out=str(tmp_path)))
    truths = [shapes.parse_caption(c) for c in seen]
    assert len(truths) == 5 and truths[0] != truths[-1]
    assert fig["caption_exact_match"] == pytest.approx(4 / 5)
    assert fig["caption_count_match"] == pytest.approx(4 / 5)
    n_shapes = sum(len(t) for t in truths)
    for a in ("shape", "colour", "size", "position"):
        assert fig[f"caption_{a}"] == pytest.approx(1 - len(truths[0]) / n_shapes), a
    assert fig["t2i_exact_match"] == pytest.approx(4 / 5)
    assert fig["t2i_count_match"] == pytest.approx((4 + (len(truths[0]) == len(truths[-1]))) / 5)


# ---------------------------------------------------------------- scoring


def S(shape, colour, size, position):
    return ShapeSpec(shape, colour, size, position)


def test_attribute_scores_by_hand():
    a = S("circle", "red", "small", "top left")
    b = S("square", "blue", "large", "centre")
    c = S("triangle", "green", "large", "right")
    d = S("circle", "yellow", "small", "bottom")
    e = S("square", "cyan", "large", "top")
    f = S("circle", "purple", "small", "left")
    truths = [frozenset({a, b}), frozenset({c}), frozenset({d}), frozenset({e}), frozenset({f})]
    preds = [
        frozenset({b, a}),                                           # exact (order is irrelevant)
        frozenset({S("triangle", "red", "small", "right")}),         # colour and size wrong
        None,                                                        # unparseable caption: all wrong
        frozenset({S("square", "cyan", "large", "bottom")}),         # wrong cell: nothing matched
        frozenset({S("square", "purple", "large", "left")}),         # shape and size wrong
    ]
    scores = _attribute_scores(truths, preds)
    n_shapes = 6  # a, b, c, d, e, f
    assert scores["exact_match"] == pytest.approx(1 / 5)
    assert scores["count_match"] == pytest.approx(4 / 5)  # only None has the wrong count (0 vs 1)
    assert scores["position"] == pytest.approx(4 / n_shapes)  # a, b, c, f
    assert scores["shape"] == pytest.approx(3 / n_shapes)  # a, b, c
    assert scores["colour"] == pytest.approx(3 / n_shapes)  # a, b, f
    assert scores["size"] == pytest.approx(2 / n_shapes)  # a, b


def test_attribute_scores_edge_cases():
    a = S("circle", "red", "small", "top left")
    b = S("square", "blue", "large", "centre")
    # everything right
    assert _attribute_scores([frozenset({a})], [frozenset({a})]) == {
        "exact_match": 1.0, "count_match": 1.0, "shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0}
    # every prediction unparseable: nothing counts
    none = _attribute_scores([frozenset({a}), frozenset({a, b})], [None, None])
    assert none == {"exact_match": 0.0, "count_match": 0.0, "shape": 0.0, "colour": 0.0, "size": 0.0, "position": 0.0}
    # an extra shape breaks exact and count match but not the attributes of the true shapes
    extra = _attribute_scores([frozenset({a})], [frozenset({a, b})])
    assert extra["exact_match"] == 0.0 and extra["count_match"] == 0.0
    assert extra["shape"] == extra["colour"] == extra["size"] == extra["position"] == 1.0
    # a missing shape: half the true shapes matched
    missing = _attribute_scores([frozenset({a, b})], [frozenset({b})])
    assert missing["exact_match"] == 0.0 and missing["position"] == 0.5 and missing["colour"] == 0.5
    # no pairs at all: zeros, not a ZeroDivisionError
    assert _attribute_scores([], [])["exact_match"] == 0.0


# ---------------------------------------------------------------- data outside the caption grammar


def _free_form_folder(root: Path, size: int = 16, n: int = 4) -> Path:
    captions = ["a photo of a sunset over the sea", "two cats on a sofa", "an old red bicycle", "green hills in fog"]
    test = root / "test"
    test.mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (20 + 50 * i, 200 - 40 * i, 90))
        img.paste((240, 240, 240), (2 + i, 3, 9 + i, 12))
        img.save(test / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": captions[i % len(captions)]}))
    (test / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_eval_free_form_imagefolder(capsys, tiny_pipeline, tmp_path):
    """Captions outside the grammar: word-level exact match, BLEU-4, CIDEr-D, copies, tokenizer figures, and every
    drawing in an imagefolder named by its caption."""
    data = _free_form_folder(tmp_path / "photos")
    out_dir = tmp_path / "eval"
    rc, out, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--json", "--out", out_dir)
    assert rc == 0, err
    fig = _last_json(out)
    assert fig["pairs"] == 4
    assert fig["t2i_exact_match"] is None  # no judge for free-form captions
    assert not any(k.startswith("t2i_") and k != "t2i_exact_match" for k in fig)
    assert {k for k in fig if k.startswith("caption_")} == {"caption_exact_match", "caption_bleu4", "caption_cider"}
    for key in ("caption_exact_match", "caption_bleu4", "copy_rate", "copy_best_overlap", "codebook_usage"):
        assert _in_unit(fig[key]), (key, fig[key])
    assert isinstance(fig["caption_cider"], float) and 0.0 <= fig["caption_cider"] <= 10.0
    for key in ("loss_text", "loss_image", "psnr"):
        assert _positive_finite(fig[key]), (key, fig[key])
    assert 0.0 < fig["codebook_usage"] <= 1.0 and -1.0 <= fig["ssim"] <= 1.0
    assert fig["copy_counted"] == 4  # outside the built-in grammar every drawing counts
    assert fig["copy_reference_images"] == len(list((tiny_pipeline.data / "train").glob("*.png")))
    with Image.open(out_dir / "sheet.png") as im:
        assert im.size[1] >= 4 * 16 * 3
    assert json.loads((out_dir / "figures.json").read_text(encoding="utf-8")) == fig
    readings = json.loads(Path(fig["readings"]).read_text(encoding="utf-8"))
    assert [Path(r["image"]).name for r in readings] == [f"img{i}.png" for i in range(4)]
    assert exact_match([r["read"] for r in readings], [r["text"] for r in readings]) == fig["caption_exact_match"]
    assert corpus_bleu([r["read"] for r in readings], [r["text"] for r in readings]) == fig["caption_bleu4"]

    drawn = Path(fig["images_out"])
    assert drawn == out_dir / "drawn" and fig["drawn_images"] == 4
    pngs = sorted(drawn.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-a-photo-of-a-sunset-over-the-sea.png", "00001-two-cats-on-a-sofa.png",
                                      "00002-an-old-red-bicycle.png", "00003-green-hills-in-fog.png"]
    rows = [json.loads(line) for line in (drawn / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in pngs]
    truth = {json.loads(line)["file_name"]: json.loads(line)["text"]
             for line in (data / "test" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()}
    assert [r["text"] for r in rows] == [truth[f"img{i}.png"] for i in range(4)]
    assert sum(r["best_overlap"] == 1.0 for r in rows) / 4 == pytest.approx(fig["copy_rate"])
    assert sum(r["best_overlap"] for r in rows) / 4 == pytest.approx(fig["copy_best_overlap"], abs=1e-5)
    for p in pngs:
        with Image.open(p) as im:
            assert im.size == (16, 16)

    # a second run replaces the folder: two drawings, nothing left of the first run's four
    rc, out, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--json", "--out", out_dir,
                         "--limit", 2, "--cfg", 1)
    assert rc == 0, err
    assert len(list(drawn.glob("*.png"))) == 2 and _last_json(out)["drawn_images"] == 2


def test_drawn_file_names_are_sanitised_and_unique():
    from earlyfusion.evaluate import drawn_file_names

    names = drawn_file_names(["Crème brûlée, please!", "crème brûlée please", "../../etc/passwd", "???", "x" * 200])
    assert names[:4] == ["00000-creme-brulee-please.png", "00001-creme-brulee-please.png", "00002-etc-passwd.png",
                         "00003-untitled.png"]
    assert len(set(names)) == len(names) and all("/" not in n and len(n) <= 80 for n in names)
    assert drawn_file_names([f"c{i}" for i in range(100001)])[-1] == "100000-c100000.png"


# ---------------------------------------------------------------- copies


def test_sheet_rows_spread_over_the_captions():
    from earlyfusion.evaluate import sheet_rows

    assert sheet_rows([f"c{i}" for i in range(40)]) == list(range(16))  # distinct captions: the first 16
    photos = ["astronaut"] * 20 + ["coins"] * 20 + ["moon"] * 3
    rows = sheet_rows(photos)
    assert rows[:3] == [0, 20, 40] and len(rows) == 16 and len(set(rows)) == 16
    assert {photos[i] for i in rows} == {"astronaut", "coins", "moon"}
    assert sheet_rows(["a", "a"], n=16) == [0, 1] and sheet_rows([]) == []


def test_best_overlap_and_copy_figures_by_hand():
    from earlyfusion.copies import best_overlap, copy_figures

    train = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 0, 0]])
    drawn = torch.tensor([[5, 6, 7, 8],    # a copy of row 1
                          [1, 2, 3, 0],    # 3 of 4 codes of row 0
                          [0, 0, 0, 0],    # 2 of 4 of row 2
                          [9, 9, 9, 9]])   # nothing in common: overlap 0, the first row
    overlap, rows = best_overlap(drawn, train)
    assert overlap.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0])
    assert rows.tolist() == [1, 0, 2, 0]
    fig = copy_figures(overlap, [True] * 4)
    assert fig == {"copy_rate": 0.25, "copy_best_overlap": pytest.approx(2.25 / 4), "copy_counted": 4}
    only = copy_figures(overlap, [False, True, True, False])  # the copy is not counted
    assert only["copy_rate"] == 0.0 and only["copy_best_overlap"] == pytest.approx(0.625) and only["copy_counted"] == 2
    assert copy_figures(overlap, [False] * 4) == {"copy_rate": None, "copy_best_overlap": None, "copy_counted": 0}
    # a grid of another length never overlaps; chunked comparison gives the same answer as one block
    assert best_overlap(torch.zeros(2, 3, dtype=torch.long), train)[0].tolist() == [0.0, 0.0]
    import earlyfusion.copies as C

    big_train = torch.randint(0, 4, (50, 6))
    big_drawn = torch.cat([big_train[:7], torch.randint(0, 4, (30, 6))])
    full = best_overlap(big_drawn, big_train)
    old = C._COMPARE_ELEMENTS
    C._COMPARE_ELEMENTS = 1
    try:
        chunked = best_overlap(big_drawn, big_train)
    finally:
        C._COMPARE_ELEMENTS = old
    assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
    assert (full[0][:7] == 1.0).all()


def test_novel_two_shape():
    from earlyfusion.copies import novel_two_shape

    seen_two = "a small red circle at the top left and a large blue square at the bottom"
    captions = ["a small red circle at the top left",  # one shape: never counted
                seen_two,  # in training
                "A large blue square at the bottom and a small red circle at the top left.",  # the same scene
                "a small red circle at the top left and a large blue square at the bottom right",  # new
                "two cats on a sofa"]  # not in the grammar
    assert novel_two_shape(captions, [seen_two, "a small green triangle on the left"]) == [False, False, False, True, False]


def _copy_oracle(grids_of):
    """A drawer that 'draws' the code grids ``grids_of(captions)`` through the sampler's path: vq.decode."""

    def draw(decoder, vocab, vq, captions, cfg, seed, batch_size=64, device="cpu", image_temperature=0.0,
                    grids=None):
        from earlyfusion.tokenizer.preprocess import to_pil

        grids = grids_of(captions)
        return [to_pil(p) for p in vq.decode(grids.reshape(len(captions), *vocab.grid))]

    return draw


def test_copy_rate_forced_copies_and_none(monkeypatch, tiny_pipeline, tmp_path):
    """evaluate() with drawings that are training grids (copy rate 1) or one code away from them (copy rate 0)."""
    import earlyfusion.evaluate as E
    from earlyfusion.copies import training_grids
    from earlyfusion.training.data.runs import load_run

    data = _free_form_folder(tmp_path / "photos")
    run = load_run(tiny_pipeline.lm)
    train = training_grids([str(tiny_pipeline.data)], vocab=run.vocab, image_tokenizer=tiny_pipeline.lm / "image_tokenizer")
    known = {tuple(r) for r in train.codes.tolist()}
    L, K = train.codes.shape[1], run.vocab.codebook_size

    def copies(captions):
        return train.codes[:len(captions)]

    def near(captions):  # each training grid with one code changed so that it equals no training grid
        out = train.codes[:len(captions)].clone()
        for row in out:
            for c in range(K):
                row[0] = c
                if tuple(row.tolist()) not in known:
                    break
        assert not any(tuple(r) in known for r in out.tolist())
        return out

    monkeypatch.setattr(E, "draw_images", _copy_oracle(copies))
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(data), out=str(tmp_path / "a")))
    assert fig["copy_rate"] == 1.0 and fig["copy_best_overlap"] == 1.0 and fig["copy_counted"] == 4
    rows = [json.loads(line) for line in (tmp_path / "a" / "drawn" / "metadata.jsonl").read_text().splitlines()]
    assert [r["closest_training_image"] for r in rows] == [train.srcs[list(map(tuple, train.codes.tolist())).index(tuple(g))]
                                                         for g in train.codes[:4].tolist()]
    monkeypatch.setattr(E, "draw_images", _copy_oracle(near))
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(data), out=str(tmp_path / "b"),
                                  train_data=[str(tiny_pipeline.data)]))
    assert fig["copy_rate"] == 0.0 and fig["copy_best_overlap"] == pytest.approx((L - 1) / L)


def test_copy_rate_on_built_in_data_counts_only_new_two_shape_scenes(monkeypatch, tiny_pipeline, tmp_path):
    """Drawings that copy training grids: on the built-in data only two-shape scenes absent from training count."""
    import earlyfusion.evaluate as E
    from earlyfusion.copies import novel_two_shape, training_grids
    from earlyfusion.training.data.runs import load_run

    run = load_run(tiny_pipeline.lm)
    train = training_grids([str(tiny_pipeline.data)], vocab=run.vocab, image_tokenizer=tiny_pipeline.lm / "image_tokenizer")
    monkeypatch.setattr(E, "draw_images", _copy_oracle(lambda captions: train.codes[:len(captions)]))
    fig = E.evaluate(E.EvalConfig(checkpoint=str(tiny_pipeline.lm), data=str(tiny_pipeline.data), limit=12,
                                  out=str(tmp_path)))
    captions = [json.loads(line)["text"] for line in (tmp_path / "drawn" / "metadata.jsonl").read_text().splitlines()]
    counted = novel_two_shape(captions, train.captions)
    assert fig["copy_counted"] == sum(counted) > 0
    assert fig["copy_rate"] == 1.0
    assert fig["t2i_exact_match"] is not None and _in_unit(fig["caption_bleu4"])


# ---------------------------------------------------------------- bad input


def test_eval_errors_on_bad_data(capsys, tiny_pipeline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", empty)
    _one_error_line(rc, err, empty, "no held-out image-caption pairs")
    missing = tmp_path / "no-such-data"
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", missing)
    _one_error_line(rc, err, missing, "no such directory")
    assert not missing.exists()
    a_file = tmp_path / "captions.txt"
    a_file.write_text("a small red circle at the top left\n", encoding="utf-8")
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", a_file)
    _one_error_line(rc, err, a_file, "not a directory")
    no_test_images = tmp_path / "no-images"  # a test/ folder whose metadata names no image that exists
    (no_test_images / "test").mkdir(parents=True)
    (no_test_images / "test" / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n', encoding="utf-8")
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", no_test_images)
    _one_error_line(rc, err, no_test_images)
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", tiny_pipeline.data, "--limit", -1)
    _one_error_line(rc, err, "--limit")


def test_eval_errors_on_folders_without_pairs(capsys, tiny_pipeline, tmp_path):
    """No captions, an empty split, no test split: one line each that says which, exit 2."""
    uncaptioned = tmp_path / "uncaptioned"
    (uncaptioned / "test").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(uncaptioned / "test" / f"{i}.png")
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", uncaptioned)
    _one_error_line(rc, err, uncaptioned, "no held-out image-caption pairs", "3 image(s)", "no captions", "metadata.jsonl")
    empty_split = tmp_path / "empty-split"
    (empty_split / "test").mkdir(parents=True)
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", empty_split)
    _one_error_line(rc, err, empty_split, "holds no images", "empty split")
    train_only = tmp_path / "train-only"
    shutil.copytree(tiny_pipeline.data / "train", train_only / "train")
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", train_only)
    _one_error_line(rc, err, train_only, "no 'test' folder", "found: train")


def test_eval_errors_on_images_out_and_train_data(capsys, tiny_pipeline, tmp_path):
    data = _free_form_folder(tmp_path / "photos")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--images-out", foreign,
                       "--out", tmp_path / "eval")
    _one_error_line(rc, err, foreign, "--images-out", "did not write")
    assert _files(foreign) == ["notes.txt"] and not (tmp_path / "eval").exists()
    gone = tmp_path / "moved-away"
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--train-data", gone,
                       "--out", tmp_path / "eval")
    _one_error_line(rc, err, gone)
    rc, _, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--train-data", data / "test" / "img0.png")
    _one_error_line(rc, err, "img0.png")


def test_eval_without_training_data_has_no_copy_rate(capsys, tiny_pipeline, tmp_path, caplog):
    """A run whose recorded training data is gone still evaluates; the copy figures are None and the log says why."""
    from earlyfusion.core.checkpoint import load_json, save_json, write_manifest
    from earlyfusion.copies import recorded_sources
    from earlyfusion.core.rundir import resolve_checkpoint

    run = tmp_path / "lm"
    shutil.copytree(tiny_pipeline.lm, run)
    data = _free_form_folder(tmp_path / "photos")
    _, ckpt = resolve_checkpoint(run)
    config = load_json(ckpt / "config.json")
    assert recorded_sources(config)[0] == [str(tiny_pipeline.data)]
    config["train"]["data"]["sources"] = config["identity"]["data"]["sources"] = [str(tmp_path / "moved")]
    save_json(ckpt / "config.json", config)
    write_manifest(ckpt)  # the edited config's new checksum
    rc, out, err = _eval(capsys, "--checkpoint", run, "--data", data, "--json", "--limit", 2)
    assert rc == 0, err
    fig = _last_json(out)
    assert fig["copy_rate"] is None and fig["copy_best_overlap"] is None and fig["copy_reference_images"] == 0
    assert _in_unit(fig["caption_bleu4"]) and fig["drawn_images"] == 2
    assert "--train-data" in caplog.text
    # --train-data gives it back
    rc, out, err = _eval(capsys, "--checkpoint", run, "--data", data, "--json", "--limit", 2,
                         "--train-data", tiny_pipeline.data)
    assert rc == 0, err
    assert _in_unit(_last_json(out)["copy_rate"])


def test_eval_error_on_missing_checkpoint(capsys, tiny_pipeline, tmp_path):
    missing = tmp_path / "no-such-run"
    rc, _, err = _eval(capsys, "--checkpoint", missing, "--data", tiny_pipeline.data)
    _one_error_line(rc, err, missing)


def test_eval_error_on_vocab_of_another_image_tokenizer(capsys, tiny_pipeline, tmp_path):
    """The run's image tokenizer replaced by another one (same shape, other weights): its vocabulary no longer belongs."""
    from earlyfusion.core.rundir import IMAGE_TOKENIZER_DIR
    from earlyfusion.tokenizer.vqvae import VQVAE
    from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, save_vqvae

    run = tmp_path / "lm"
    shutil.copytree(tiny_pipeline.lm, run)
    cfg = load_vqvae(run / IMAGE_TOKENIZER_DIR).cfg
    shutil.rmtree(run / IMAGE_TOKENIZER_DIR)
    torch.manual_seed(123)
    save_vqvae(VQVAE(cfg), run / IMAGE_TOKENIZER_DIR)
    rc, _, err = _eval(capsys, "--checkpoint", run, "--data", tiny_pipeline.data)
    line = _one_error_line(rc, err, run / IMAGE_TOKENIZER_DIR)
    assert "vocab" in line


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_eval_error_on_edited_codebook_size(capsys, tiny_pipeline, tmp_path, keep_manifest):
    """config.json of the run's image tokenizer edited: caught by its checksum, or (no MANIFEST) by the weights' shapes."""
    from earlyfusion.core.rundir import IMAGE_TOKENIZER_DIR

    run = tmp_path / "lm"
    shutil.copytree(tiny_pipeline.lm, run)
    config = run / IMAGE_TOKENIZER_DIR / "config.json"
    raw = json.loads(config.read_text(encoding="utf-8"))
    raw["codebook_size"] = raw["codebook_size"] * 2
    config.write_text(json.dumps(raw), encoding="utf-8")
    if not keep_manifest:
        (run / IMAGE_TOKENIZER_DIR / "MANIFEST.json").unlink()
    rc, _, err = _eval(capsys, "--checkpoint", run, "--data", tiny_pipeline.data)
    _one_error_line(rc, err, config)


# ---------------------------------------------------------------- validation losses


@pytest.fixture(scope="module")
def trained(tiny_pipeline):
    from earlyfusion.training.data.runs import load_run
    from earlyfusion.training.data import heldout_pairs

    run = load_run(tiny_pipeline.lm)
    pairs = heldout_pairs([str(tiny_pipeline.data)], vocab=run.vocab, image_tokenizer=tiny_pipeline.lm / "image_tokenizer", limit=8)
    assert len(pairs) == 8
    return run, pairs


def test_validation_losses_trained_beats_fresh(trained):
    from earlyfusion.model.decoder import Decoder, DecoderConfig

    run, pairs = trained
    got = validation_losses(run.decoder, run.vocab, pairs, batch_size=8)
    torch.manual_seed(0)
    fresh = Decoder(DecoderConfig.from_dict(run.config["decoder"]))
    base = validation_losses(fresh, run.vocab, pairs, batch_size=8)
    for key in ("loss_text", "loss_image", "unigram_text", "unigram_image"):
        assert _positive_finite(got[key]) and _positive_finite(base[key]), (key, got[key], base[key])
    assert got["loss_text"] < base["loss_text"] - 0.5, (got, base)
    assert got["loss_image"] < base["loss_image"] - 0.5, (got, base)
    assert got["loss_text"] < math.log(run.vocab.vocab_size) and got["loss_image"] < math.log(run.vocab.vocab_size)
    # the unigram baselines depend on the data only, not on the model
    assert got["unigram_text"] == pytest.approx(base["unigram_text"])
    assert got["unigram_image"] == pytest.approx(base["unigram_image"])
    # an untrained model (near-uniform over the whole vocabulary) is worse than the unigram of the data
    assert base["loss_text"] > base["unigram_text"] and base["loss_image"] > base["unigram_image"]
    # image entropy cannot exceed log(codebook size); text tokens are few in these captions
    assert got["unigram_image"] <= math.log(run.vocab.codebook_size + 1) + 1e-6


def test_validation_losses_do_not_depend_on_batching(trained):
    """Padding shorter documents in a batch must not change the loss of any token."""
    run, pairs = trained
    pairs = pairs[:4]
    lengths = {len(run.vocab.encode_document([p.caption, p.codes])) for p in pairs}
    assert len(lengths) > 1, "need documents of different lengths so that a batch is padded"
    one = validation_losses(run.decoder, run.vocab, pairs, batch_size=1)
    many = validation_losses(run.decoder, run.vocab, pairs, batch_size=4)
    for key in one:
        assert one[key] == pytest.approx(many[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("argv", [["--cfg", "nan"], ["--image-temperature", "nan"], ["--cfg", "-1"], ["--cfg", "inf"],
                                  ["--limit", "-1"], ["--batch-size", "0"], ["--seed", "-1"], ["--out", "FILE"]])
def test_bad_values_one_line(tmp_path, capsys, argv):
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    rc, out, err = _eval(capsys, "--checkpoint", tmp_path / "run", "--data", tmp_path, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
