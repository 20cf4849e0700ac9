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


def test_eval_scores_what_is_read_and_drawn(monkeypatch, tiny_pipeline, tmp_path):
    """evaluate() with an oracle reader/drawer (one mistake each): the figures follow the predictions."""
    import earlyfusion.evaluate as E
    from earlyfusion.training import shapes

    seen: list[str] = []

    def oracle_read(decoder, vocab, pairs, batch_size=64, device="cpu"):
        seen[:] = [p.caption for p in pairs]
        return ["an unparseable caption"] + [p.caption.upper() + "." for p in pairs[1:]]  # parse_caption tolerates case/stop

    def oracle_draw(decoder, vocab, vq, captions, cfg, seed, batch_size=64, device="cpu", image_temperature=0.0):
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


def test_eval_free_form_imagefolder(capsys, tiny_pipeline, tmp_path):
    data = _free_form_folder(tmp_path / "photos")
    out_dir = tmp_path / "eval"
    rc, out, err = _eval(capsys, "--checkpoint", tiny_pipeline.lm, "--data", data, "--json", "--out", out_dir)
    assert rc == 0, err
    fig = _last_json(out)
    assert fig["pairs"] == 4
    assert fig["caption_exact_match"] is None and fig["t2i_exact_match"] is None
    assert not any(k.startswith(("caption_", "t2i_")) and k not in ("caption_exact_match", "t2i_exact_match") for k in fig)
    for key in ("loss_text", "loss_image", "psnr"):
        assert _positive_finite(fig[key]), (key, fig[key])
    assert 0.0 < fig["codebook_usage"] <= 1.0
    with Image.open(out_dir / "sheet.png") as im:
        assert im.size[1] >= 4 * 16 * 3
    assert json.loads((out_dir / "figures.json").read_text(encoding="utf-8"))["caption_exact_match"] is None


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


def test_eval_error_on_missing_checkpoint(capsys, tiny_pipeline, tmp_path):
    missing = tmp_path / "no-such-run"
    rc, _, err = _eval(capsys, "--checkpoint", missing, "--data", tiny_pipeline.data)
    _one_error_line(rc, err, missing)


def test_eval_error_on_vocab_of_another_image_tokenizer(capsys, tiny_pipeline, tmp_path):
    """The run's image tokenizer replaced by another one (same shape, other weights): its vocabulary no longer belongs."""
    from earlyfusion.rundir import IMAGE_TOKENIZER_DIR
    from earlyfusion.tokenizer.vqvae import VQVAE, load_vqvae, save_vqvae

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
    from earlyfusion.rundir import IMAGE_TOKENIZER_DIR

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
    from earlyfusion.rundir import load_run
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
