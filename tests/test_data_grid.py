"""Images that keep their aspect ratio (a vocabulary with grid tokens): the code cache keeps each image's grid,
documents state it, packing and held-out pairs follow it, bad shapes are skipped and counted, copies compare only
grids of one shape, and a run records the grids it trained on. Two aspect ratios end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli_status, run_cli
from earlyfusion.core.checkpoint import CheckpointError
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.preprocess import aspect_grid, preprocess, preprocess_to_grid
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, vq_fingerprint
from earlyfusion.training import data as D
from earlyfusion.training.shapes import TALL, WIDE, parse_picture
from earlyfusion.training.shapes_data import ShapesConfig, generate
from test_data import documents, make_vq

SIZES = "32x32,48x32"  # the tiny tokenizer's 4x4 codes: 32x32 -> 4x4, 48x32 -> 3x4
GRIDS = [(3, 4), (4, 4)]


def make_vocab(sources, vq: Path, grid_tokens: bool) -> Vocabulary:
    cfg = read_vq_config(vq)
    return Vocabulary.build(list(D.iter_texts(sources)), codebook_size=cfg.codebook_size, grid=cfg.grid_size,
                            image_tokenizer_fingerprint=vq_fingerprint(vq), text_vocab_size=300, grid_tokens=grid_tokens)


class World:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        generate(ShapesConfig(out=str(self.data), num_images=32, sizes=SIZES, seed=3, num_interleaved=8, num_text=8,
                              test_fraction=0.25), self.data)
        self.vq = make_vq(root / "vq")
        self.vocab = make_vocab([str(self.data)], self.vq, grid_tokens=True)
        self.fixed = make_vocab([str(self.data)], self.vq, grid_tokens=False)

    def cfg(self, sources=None, **kw) -> D.DataConfig:
        kw.setdefault("cache_dir", str(self.root / "cache"))
        kw.setdefault("reading_ratio", 0.5)
        kw.setdefault("reading_image_loss", True)
        return D.DataConfig(sources=sources or [str(self.data)], **kw)

    def prepare(self, vocab=None, context_len=128, **kw) -> D.PreparedData:
        return D.prepare(self.cfg(**kw), vocab or self.vocab, self.vq, context_len=context_len)

    def train_images(self) -> list[str]:
        return sorted(str(p) for p in (self.data / "train").glob("*.png"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("grid"))


def expected_grid(path) -> tuple[int, int]:
    return aspect_grid(*Image.open(path).size, (4, 4), 4)


# ---------------------------------------------------------------- the code cache


def test_the_cache_keeps_each_images_grid_and_its_codes(world, tmp_path):
    vq = load_vqvae(world.vq)
    paths = world.train_images()
    table = D.local_image_table(paths, paths, world.vq, vq_fingerprint(world.vq), tmp_path / "c", grid_tokens=True)
    assert not table.cache_hit and table.codes.shape == (len(paths), 16) and table.grids.shape == (len(paths), 2)
    assert {table.grid(i) for i in range(len(paths))} == set(GRIDS)
    for i, p in enumerate(paths):
        h, w = table.grid(i)
        assert (h, w) == expected_grid(p)
        want = vq.encode(preprocess_to_grid(p, (4, 4), 4)[None])[0]  # the whole image, its aspect ratio kept
        assert table.image(i).shape == (h, w) and np.array_equal(table.image(i), want.numpy())
        assert (table.codes[i, h * w:] == D.PAD_CODE).all() and (table.codes[i, :h * w] >= 0).all()
    again = D.local_image_table(paths, paths, world.vq, vq_fingerprint(world.vq), tmp_path / "c", grid_tokens=True)
    assert again.cache_hit and np.array_equal(again.codes, table.codes) and np.array_equal(again.grids, table.grids)
    # the grid mode is part of the key: the fixed grid is another entry, every image centre-cropped to 4x4
    fixed = D.local_image_table(paths, paths, world.vq, vq_fingerprint(world.vq), tmp_path / "c")
    assert not fixed.cache_hit and {fixed.grid(i) for i in range(len(paths))} == {(4, 4)}
    assert np.array_equal(fixed.codes, vq.encode(torch.stack([preprocess(p, 16) for p in paths])).reshape(len(paths), -1))


def test_prepare_is_cached_with_the_grids(world, tmp_path):
    first = world.prepare(cache_dir=str(tmp_path / "c"))
    second = world.prepare(cache_dir=str(tmp_path / "c"))
    assert first.images_encoded > 0 and second.images_encoded == 0 and second.images_cached == first.images_encoded
    for a, b in zip(first.parts, second.parts):
        assert np.array_equal(a.grids, b.grids) and (a.kind != "pairs" or np.array_equal(a.codes, b.codes))
    assert first.grids == second.grids == GRIDS


def test_augmented_views_keep_each_images_grid(world, tmp_path):
    part = world.prepare(cache_dir=str(tmp_path / "a"), augment_views=3, augment_scale=0.6).parts[0]
    plain = world.prepare(cache_dir=str(tmp_path / "p")).parts[0]
    assert np.array_equal(part.codes, plain.codes) and np.array_equal(part.grids, plain.grids)
    assert part.views.shape == (len(part), 2, 16) and part.n_views == 3
    differ = 0
    for i in range(len(part)):
        h, w = part.grid(i)
        for view in (1, 2):
            assert part.image(i, view).shape == (h, w) and (part.views[i, view - 1, h * w:] == D.PAD_CODE).all()
            differ += not np.array_equal(part.image(i, view), part.image(i))
    assert differ >= len(part)  # crops are other images


# ---------------------------------------------------------------- documents and packing


def test_documents_state_each_images_grid_and_read_back(world):
    v = world.vocab
    b = D.PackedBatches(world.prepare(), v, context_len=128, batch_size=8, reading_ratio=0.5, reading_image_loss=True)
    seen = set()
    for _ in range(6):
        batch = next(b)
        for tokens, targets, _, modality in documents(batch):
            segs = v.decode_document(tokens)  # strict: every span whole
            images = [s for s in segs if isinstance(s, torch.Tensor)]
            for img in images:
                seen.add(tuple(img.shape))
                span = v.image_span(img)
                assert any(tokens[i:i + len(span)] == span for i in range(len(tokens)))
                assert len(span) == v.span_length(tuple(img.shape))
            texts = [s for s in segs if isinstance(s, str)]
            if len(images) == 1 and len(texts) == 1 and parse_picture(texts[0]) is not None:  # a pair document
                picture = parse_picture(texts[0])[0]
                assert (tuple(images[0].shape) == (3, 4)) == (picture == WIDE) and picture != TALL
                assert len(tokens) == len(v.encode_text(texts[0])) + D.pair_overhead(v, tuple(images[0].shape))
            for t, m in zip(targets, modality):  # an image's size and row ends are image targets
                if t in v.rows_ids or t in v.cols_ids or t == v.row_end:
                    assert m == 1
    assert seen == set(GRIDS)


def test_reading_examples_skip_the_whole_span_of_their_grid(world):
    v = world.vocab
    b = D.PackedBatches(world.prepare(sources=[str(world.data / "train")]), v, context_len=128, batch_size=8,
                        reading_ratio=1.0, cond_dropout=0.0, reading_image_loss=False)
    spans = set()
    for tokens, targets, _, _ in documents(next(b)):
        cut = tokens.index(v.eoi)
        assert tokens[1] == v.boi and targets[:cut] == [-100] * cut and targets[cut] != -100
        spans.add(cut)
    assert spans == {v.span_length(g) for g in GRIDS}


def test_interleaved_documents_and_longest_span(world):
    v = world.vocab
    data = world.prepare(sources=[str(world.data / "interleaved.jsonl")])
    (part,) = data.parts
    grids = sorted({tuple(s.shape) for d in part.docs for s in v.decode_document(d.tolist()) if isinstance(s, torch.Tensor)})
    assert grids == data.grids == sorted({tuple(g) for g in part.grids.tolist()})
    # every length of an image is the vocabulary's: the largest image needs max_span + <s> </s>
    assert D.pair_overhead(v) == v.max_span + 2 == 4 * 5 + 4 + 2
    with pytest.raises(UserError, match=f"cannot hold one image.*<rows_4> <cols_4>.*= {D.pair_overhead(v)} tokens"):
        world.prepare(context_len=D.pair_overhead(v) - 1)
    caps = [json.loads(line)["text"] for line in (world.data / "train" / "metadata.jsonl").read_text().splitlines()]
    need = max(len(ids) for ids in v.encode_texts(caps)) + D.pair_overhead(v)
    with pytest.raises(D.ContextTooShort, match=f"needs {need}"):
        D.prepare(world.cfg(), v, world.vq, context_len=need - 1, fit_captions=True)


def test_heldout_pairs_keep_their_grid(world):
    vq = load_vqvae(world.vq)
    pairs = D.heldout_pairs([str(world.data)], vocab=world.vocab, image_tokenizer=world.vq,
                            cache_dir=str(world.root / "cache"))
    assert pairs and {tuple(p.codes.shape) for p in pairs} <= set(GRIDS)
    for p in pairs:
        h, w = p.codes.shape
        assert (h, w) == expected_grid(p.path) and p.pixels.shape == (3, 4 * h, 4 * w)
        assert torch.equal(vq.encode(p.pixels[None])[0], p.codes)
        assert (parse_picture(p.caption)[0] == WIDE) == ((h, w) == (3, 4))


def test_fixed_grid_vocabulary_is_unchanged(world):
    """Without grid tokens the same data gives the fixed grid: square crops, <boi> 16 codes <eoi>."""
    v = world.fixed
    data = world.prepare(vocab=v)
    assert data.grids == [(4, 4)] and not v.grid_tokens
    b = D.PackedBatches(data, v, context_len=128, batch_size=4, reading_ratio=0.5, reading_image_loss=True)
    for tokens, *_ in documents(next(b)):
        for s in v.decode_document(tokens):
            if isinstance(s, torch.Tensor):
                assert s.shape == (4, 4) and len(v.image_span(s)) == v.tokens_per_image + 2
    assert D.pair_overhead(v) == v.tokens_per_image + 4 and D.span_words(v) == "<boi> 16 codes <eoi>"


# ---------------------------------------------------------------- bad shapes


def _bad_shapes_folder(world, root: Path) -> list[str]:
    root.mkdir()
    rows = []
    for i, src in enumerate(world.train_images()[:3]):
        shutil.copy(src, root / f"good{i}.png")
        rows.append({"file_name": f"good{i}.png", "text": f"good {i}"})
    Image.new("RGB", (3, 2), (200, 10, 10)).save(root / "tiny.png")  # smaller than one 4 px code
    Image.new("RGB", (400, 8), (10, 200, 10)).save(root / "strip.png")  # 1:50, under half a code tall in 4x4
    rows += [{"file_name": "tiny.png", "text": "tiny"}, {"file_name": "strip.png", "text": "strip"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["text"] for r in rows[:3]]


def test_too_small_and_extreme_aspect_images_are_skipped_and_counted(world, tmp_path):
    good = _bad_shapes_folder(world, tmp_path / "bad")
    data = D.prepare(D.DataConfig([str(tmp_path / "bad")], cache_dir=str(tmp_path / "c")), world.vocab, world.vq,
                     context_len=128)
    (part,) = data.parts
    assert sorted(world.vocab.decode_text(c.tolist()) for c in part.captions) == sorted(good)
    assert dict(data.report.counts) == {"too_small": 1, "extreme_aspect": 1}
    for strict_error in (r"tiny\.png.*too small", r"strip\.png.*extreme aspect"):
        (tmp_path / "one").mkdir()
        name = "tiny.png" if "tiny" in strict_error else "strip.png"
        shutil.copy(tmp_path / "bad" / name, tmp_path / "one" / name)
        (tmp_path / "one" / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
        with pytest.raises(UserError, match=strict_error):
            D.prepare(D.DataConfig([str(tmp_path / "one")], strict=True, cache_dir=str(tmp_path / "c2")), world.vocab,
                      world.vq, context_len=64)
        shutil.rmtree(tmp_path / "one")


# ---------------------------------------------------------------- copies


def test_grids_of_other_shapes_are_never_copies(world):
    from earlyfusion.copies import best_overlap, flatten_grids, training_grids

    a = torch.arange(12).reshape(3, 4)
    codes, shapes = flatten_grids([a, a.reshape(2, 6), torch.zeros(4, 4, dtype=torch.long)], length=16)
    assert shapes.tolist() == [[3, 4], [2, 6], [4, 4]] and (codes[0, 12:] == D.PAD_CODE).all()
    drawn, drawn_shapes = flatten_grids([a.reshape(2, 6), a, torch.ones(2, 2, dtype=torch.long)], length=16)
    overlap, rows = best_overlap(drawn, codes, drawn_shapes, shapes)
    assert overlap.tolist() == [1.0, 1.0, 0.0] and rows.tolist() == [1, 0, -1]  # the 2x2 grid has no training peer
    drawn2, _ = flatten_grids([a.reshape(2, 6)], length=16)
    assert best_overlap(drawn2, codes[:1], torch.tensor([[2, 6]]), shapes[:1])[0].tolist() == [0.0]  # same codes, other shape
    with pytest.raises(ValueError, match="both"):
        best_overlap(drawn, codes, drawn_shapes)
    ref = training_grids([str(world.data)], vocab=world.vocab, image_tokenizer=world.vq,
                         cache_dir=str(world.root / "cache"))
    assert ref.codes.shape[1] == 16 and {tuple(g) for g in ref.grids.tolist()} == set(GRIDS)
    overlap, rows = best_overlap(ref.codes[:5], ref.codes, ref.grids[:5], ref.grids)
    assert overlap.tolist() == [1.0] * 5


# ---------------------------------------------------------------- end to end, and the run's record


def test_two_aspect_ratios_end_to_end(tmp_path, capsys):
    from earlyfusion.training.data.runs import load_run, trained_grids

    data, vq, vocab, lm = tmp_path / "data", tmp_path / "vq", tmp_path / "vocab", tmp_path / "lm"
    run_cli("data", "shapes", "--out", data, "--num-images", 48, "--sizes", SIZES, "--num-interleaved", 4,
            "--num-text", 4)
    run_cli("tokenizer", "train", "--data", data, "--out", vq, "--preset", "tiny", "--steps", 10)
    capsys.readouterr()
    run_cli("vocab", "build", "--image-tokenizer", vq, "--data", data, "--out", vocab, "--text-vocab-size", 300,
            "--grid-tokens")
    said = capsys.readouterr().out
    assert "grid tokens" in said and "from 1x1 to 4x4" in said and "24 tokens" in said
    v = Vocabulary.load(vocab)
    assert v.grid_tokens and v.max_span == 24
    train = ["train", "--data", data, "--image-tokenizer", vq, "--vocab", vocab, "--preset", "tiny",
             "--batch-size", 4, "--warmup-steps", 1, "--eval-every", 0, "--checkpoint-every", 2]
    rc, err = cli_status(capsys, [*train, "--out", tmp_path / "short", "--steps", 2, "--context-len", v.max_span + 1])
    assert_one_line_error(rc, err)
    assert f"needs {v.max_span + 2} tokens" in err and "<rows_4> <cols_4>" in err
    run_cli(*train, "--out", lm, "--steps", 2)
    run = load_run(lm)
    assert run.config["image_grids"] == [list(g) for g in GRIDS] and trained_grids(run) == GRIDS
    # drawing: --size picks a trained grid (the tiny tokenizer's codes are 4 px); the model's own choice stays
    # among the trained grids
    for size, want in (("48x32", (16, 12)), ("32x32", (16, 16)), ("", None)):
        out = tmp_path / f"drawn{size}"
        run_cli("sample", "--checkpoint", lm, "--prompt", "a wide picture: a red circle", "--modality", "image",
                "--num-samples", 3, "--image-temperature", 1.0, "--out", out, *(["--size", size] if size else []))
        sizes = {Image.open(out / f"sample-{i:02d}.png").size for i in range(3)}
        assert sizes == {want} if want else sizes <= {(16, 16), (16, 12)}, sizes
    rc, err = cli_status(capsys, ["sample", "--checkpoint", lm, "--prompt", "a", "--modality", "image", "--size",
                                  "64x16", "--out", tmp_path / "bad"])
    assert_one_line_error(rc, err)
    assert "not trained on" in err and "16x12, 16x16" in err
    for bad in ("64x1", "48"):
        rc, err = cli_status(capsys, ["sample", "--checkpoint", lm, "--prompt", "a", "--modality", "image", "--size",
                                      bad, "--out", tmp_path / "bad"])
        assert_one_line_error(rc, err)
    # reading an image of either shape
    wide = next(p for p in sorted((data / "test").glob("*.png")) if Image.open(p).size == (48, 32))
    capsys.readouterr()
    run_cli("sample", "--checkpoint", lm, "--image", wide, "--max-new-tokens", 8, "--temperature", 0)
    # eval: the picture's shape in readings and drawings, and every figure per shape
    capsys.readouterr()
    run_cli("eval", "--checkpoint", lm, "--data", data, "--json", "--image-temperature", 1.0)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures["by_picture"]) == {"square", WIDE}
    for k in ("caption_picture", "t2i_picture"):
        assert 0.0 <= figures[k] <= 1.0
    assert sum(f["pairs"] for f in figures["by_picture"].values()) == figures["pairs"]
    drawn = [json.loads(line) for line in (lm / "eval" / "drawn" / "metadata.jsonl").read_text().splitlines()]
    assert {Image.open(lm / "eval" / "drawn" / d["file_name"]).size for d in drawn} <= {(16, 16), (16, 12)}
    assert figures["copy_rate"] is not None and figures["psnr"] > 0
    # strict data with an image too small for one code: one line, exit 2
    (tmp_path / "tiny").mkdir()
    Image.new("RGB", (3, 3)).save(tmp_path / "tiny" / "a.png")
    (tmp_path / "tiny" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    rc, err = cli_status(capsys, ["train", "--data", tmp_path / "tiny", "--image-tokenizer", vq, "--vocab", vocab,
                                  "--preset", "tiny", "--steps", 2, "--strict", "--out", tmp_path / "strict"])
    assert_one_line_error(rc, err)
    assert "too small" in err


def test_trained_grids_of_runs_without_a_record_and_of_altered_ones(world, tmp_path):
    from earlyfusion.training.data.runs import trained_grids

    def run(config, vocab=world.vocab):
        return SimpleNamespace(config=config, vocab=vocab, path=tmp_path)

    assert trained_grids(run({})) == [] and trained_grids(run({}, world.fixed)) == []
    assert trained_grids(run({"image_grids": [[4, 4], [3, 4], [4, 4]]})) == GRIDS
    for bad in ([[5, 4]], [[0, 4]], [["a", 4]], [[4]], 7, "4x4"):
        with pytest.raises(CheckpointError, match="image_grids"):
            trained_grids(run({"image_grids": bad}))
