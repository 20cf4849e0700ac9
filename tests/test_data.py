"""Data pipeline: documents, packing invariants, orders and condition dropout, mixture, exact resume,
sharding, the image-code cache, bad corpora (every good record used, every bad one counted), truncation."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.tokenizer.vq_checkpoint import save_vqvae, vq_fingerprint
from earlyfusion.training import data as D
from earlyfusion.training.data import documents as D_documents
from earlyfusion.training.shapes_data import ShapesConfig, generate


def make_vq(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    m = VQVAE(VQ_PRESETS["tiny"])
    m.train()
    m(torch.rand(16, 3, 16, 16) * 2 - 1)  # k-means init of the codebook: codes vary between images
    save_vqvae(m.eval(), directory)
    return directory


def make_vocab(sources, vq: Path) -> Vocabulary:
    from earlyfusion.tokenizer.vq_checkpoint import read_vq_config

    cfg = read_vq_config(vq)
    return Vocabulary.build(list(D.iter_texts(sources)), codebook_size=cfg.codebook_size, grid=cfg.grid_size,
                            image_tokenizer_fingerprint=vq_fingerprint(vq), text_vocab_size=300)


class World:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        generate(ShapesConfig(out=str(self.data), num_images=48, image_size=16, seed=3, num_interleaved=12,
                              num_text=12, test_fraction=0.25), self.data)
        self.vq = make_vq(root / "vq")
        self.vocab = make_vocab([str(self.data)], self.vq)

    def cfg(self, sources=None, **kw) -> D.DataConfig:
        kw.setdefault("cache_dir", str(self.root / "cache"))
        kw.setdefault("reading_ratio", 0.5)
        kw.setdefault("reading_image_loss", True)
        return D.DataConfig(sources=sources or [str(self.data)], **kw)

    def batches(self, sources=None, context_len=64, batch_size=4, seed=0, **kw) -> D.PackedBatches:
        return D.training_batches(self.cfg(sources, **kw), vocab=self.vocab, image_tokenizer=self.vq,
                                  context_len=context_len, batch_size=batch_size, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("data"))


def documents(batch: dict) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """(tokens, targets, positions, modality) of every document in a batch."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        ids = batch["doc_ids"][r]
        for k in sorted(set(ids.tolist()) - {-1}):
            sel = ids == k
            out.append(tuple(batch[n][r][sel].tolist() for n in ("tokens", "targets", "positions", "modality")))
    return out


def kind_of(vocab, tokens: list[int]) -> str:
    assert tokens[0] == vocab.bos
    if tokens[1] != vocab.boi:
        return "draw"
    after = tokens[tokens.index(vocab.eoi) + 1:]
    return "uncond" if after == [vocab.eos] else "read"


# ---------------------------------------------------------------- batches


def test_batch_layout_and_packing_invariants(world):
    v = world.vocab
    b = world.batches(context_len=64, batch_size=8)
    for _ in range(4):
        batch = next(b)
        assert {k: (t.shape, t.dtype) for k, t in batch.items()} == {
            "tokens": ((8, 64), torch.long), "targets": ((8, 64), torch.long), "positions": ((8, 64), torch.long),
            "doc_ids": ((8, 64), torch.long), "modality": ((8, 64), torch.int8)}
        for r in range(8):
            ids = batch["doc_ids"][r].tolist()
            n_real = sum(i >= 0 for i in ids)
            assert ids[:n_real] == sorted(ids[:n_real]) and all(i == -1 for i in ids[n_real:])  # docs contiguous, padding last
            assert (batch["tokens"][r, n_real:] == v.pad).all() and (batch["targets"][r, n_real:] == -100).all()
            assert (batch["modality"][r, n_real:] == -1).all()
        for tokens, targets, positions, modality in documents(batch):
            assert positions == list(range(len(tokens)))  # positions restart per document
            assert targets[:-1] == tokens[1:] and targets[-1] == -100  # no target across documents
            for t, m in zip(targets, modality):
                want = -1 if t == -100 else (1 if (v.is_image_id(t) or t == v.eoi) else 0)
                assert m == want
            segs = v.decode_document(tokens)  # strict: every image span is whole
            assert tokens.count(v.boi) == tokens.count(v.eoi) == sum(isinstance(s, torch.Tensor) for s in segs)


def test_pairs_both_orders_and_condition_dropout(world):
    v = world.vocab
    train = str(world.data / "train")
    b = world.batches([train], context_len=48, batch_size=32, reading_ratio=0.3, cond_dropout=0.25, seed=1)
    kinds = Counter(kind_of(v, d[0]) for _ in range(25) for d in documents(next(b)))
    n = sum(kinds.values())
    assert n > 700
    assert abs(kinds["read"] / n - 0.3) < 0.06
    assert abs(kinds["uncond"] / n - 0.7 * 0.25) < 0.05
    assert abs(kinds["draw"] / n - 0.7 * 0.75) < 0.06
    only_read = world.batches([train], reading_ratio=1.0, cond_dropout=0.0)
    assert {kind_of(v, d[0]) for d in documents(next(only_read))} == {"read"}
    only_draw = world.batches([train], reading_ratio=0.0, cond_dropout=0.0)
    assert {kind_of(v, d[0]) for d in documents(next(only_draw))} == {"draw"}


def test_reading_image_loss_off_trains_reading_examples_on_their_caption_only(world):
    """reading_image_loss=False: a reading example gets no loss on <boi> codes <eoi> (only on its caption and
    </s>); drawing and unconditional examples and interleaved/text documents keep every target; the documents
    themselves do not change."""
    v = world.vocab
    pairs = [str(world.data / "train")]
    others = [str(world.data / "interleaved.jsonl"), str(world.data / "text.jsonl")]
    seen = Counter()
    for sources in (pairs, others):
        full = world.batches(sources, context_len=64, batch_size=8, seed=2)
        masked = world.batches(sources, context_len=64, batch_size=8, seed=2, reading_image_loss=False)
        for _ in range(4):
            a, b = documents(next(full)), documents(next(masked))
            assert [d[0] for d in a] == [d[0] for d in b]  # the same documents in the same places
            for (tokens, targets, _, _), (_, got, _, modality) in zip(a, b):
                kind = kind_of(v, tokens) if sources is pairs else "other"
                cut = tokens.index(v.eoi) if kind == "read" else 0  # targets boi, codes, eoi
                assert got[:cut] == [-100] * cut and got[cut:] == targets[cut:], kind
                if kind == "read":
                    assert cut == v.tokens_per_image + 2 and all(m in (-1, 0) for m in modality)  # text targets only
                seen[kind] += 1
    assert set(seen) == {"read", "draw", "uncond", "other"} and min(seen.values()) > 0, seen
    with pytest.raises(UserError, match="cannot be resumed"):  # the stream's signature includes the option
        masked.load_state_dict(full.state_dict())


def test_every_good_pair_is_used_each_epoch(world):
    v = world.vocab
    train = world.data / "train"
    captions = [json.loads(line)["text"] for line in (train / "metadata.jsonl").read_text().splitlines()]
    b = world.batches([str(train)], context_len=128, batch_size=4, reading_ratio=1.0)
    seen = Counter()
    while sum(seen.values()) < 2 * len(captions):
        for tokens, *_ in documents(next(b)):
            seen[v.decode_document(tokens)[1]] += 1
    assert set(seen) == set(captions)


def test_mixture_weights(world):
    train, text = world.data / "train", world.data / "text.jsonl"
    b = world.batches([f"{train}:3", f"{text}:1"], context_len=64, batch_size=32, seed=2)
    kinds = Counter("text" if d[0][1] not in (world.vocab.boi,) and world.vocab.boi not in d[0] else "pair"
                    for _ in range(10) for d in documents(next(b)))
    frac = kinds["text"] / sum(kinds.values())
    assert abs(frac - 0.25) < 0.06, kinds
    # a data directory expands to its three parts with the default weights
    parts = D.resolve_sources([str(world.data)])
    assert [p.kind for p in parts] == ["pairs", "interleaved", "text"]
    assert [round(p.weight, 6) for p in parts] == [0.8, 0.1, 0.1]
    assert [round(p.weight, 6) for p in D.resolve_sources([f"{world.data}:2"])] == [1.6, 0.2, 0.2]


def test_exact_resume_and_sharding(world):
    a = world.batches(seed=5)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    expected = [next(a) for _ in range(2)]
    fresh = world.batches(seed=5)
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)
    other = world.batches(seed=6)
    assert not torch.equal(next(other)["tokens"], next(world.batches(seed=5))["tokens"])
    with pytest.raises(UserError, match="resume"):
        world.batches(seed=5, batch_size=2).load_state_dict(state)
    # two processes' rows are the global batch
    g = next(world.batches(seed=7, batch_size=4))
    s0, s1 = world.batches(seed=7, batch_size=4).sharded(0, 2), world.batches(seed=7, batch_size=4).sharded(1, 2)
    r0, r1 = next(s0), next(s1)
    assert all(torch.equal(torch.cat([r0[k], r1[k]]), g[k]) for k in g)
    with pytest.raises(ValueError):
        world.batches(batch_size=3).sharded(0, 2)


# ---------------------------------------------------------------- cache


def test_codes_are_cached_and_invalidated(world, tmp_path):
    cfg = world.cfg(cache_dir=str(tmp_path / "cache"))
    first = D.prepare(cfg, world.vocab, world.vq, context_len=64)
    n_images = len(list((world.data / "train").glob("*.png")))
    assert first.images_encoded == n_images and first.images_cached == 0
    second = D.prepare(cfg, world.vocab, world.vq, context_len=64)
    assert second.images_encoded == 0 and second.images_cached == n_images
    assert second.seconds < first.seconds
    assert np.array_equal(first.parts[0].codes, second.parts[0].codes)
    # the codes are those of the image tokenizer
    from earlyfusion.tokenizer.preprocess import preprocess
    from earlyfusion.tokenizer.vq_checkpoint import load_vqvae

    row = json.loads((world.data / "train" / "metadata.jsonl").read_text().splitlines()[0])
    px = preprocess(world.data / "train" / row["file_name"], 16)[None]
    assert load_vqvae(world.vq).encode(px).reshape(-1).tolist() in first.parts[0].codes.tolist()
    # another image tokenizer (and its vocabulary): everything is encoded again
    vq2 = make_vq(tmp_path / "vq2", seed=1)
    vocab2 = make_vocab([str(world.data)], vq2)
    third = D.prepare(cfg, vocab2, vq2, context_len=64)
    assert third.images_encoded == n_images and third.images_cached == 0
    # the old vocabulary does not fit the new tokenizer
    with pytest.raises(UserError, match="rebuild"):
        D.prepare(cfg, world.vocab, vq2, context_len=64)
    # a changed image file invalidates the source's cache entry
    data2 = tmp_path / "data2"
    shutil.copytree(world.data, data2, ignore=shutil.ignore_patterns(".earlyfusion-cache"))
    cfg2 = world.cfg([str(data2)], cache_dir=str(tmp_path / "cache"))
    assert D.prepare(cfg2, world.vocab, world.vq, context_len=64).images_encoded == n_images
    assert D.prepare(cfg2, world.vocab, world.vq, context_len=64).images_encoded == 0
    img = next((data2 / "train").glob("*.png"))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(img)
    os.utime(img, ns=(1, 1))
    assert D.prepare(cfg2, world.vocab, world.vq, context_len=64).images_encoded == n_images


# ---------------------------------------------------------------- bad corpora


def write_bad_jsonl(root: Path, good_image: str) -> dict:
    """interleaved.jsonl and text.jsonl with good records and one of every bad kind; returns expected counts."""
    inter = [
        json.dumps({"texts": ["a picture:", None], "images": [None, good_image]}).encode(),
        json.dumps({"texts": [None, "after"], "images": [good_image, None]}).encode(),
        b'{"texts": ["broken json", null], "images": [null, ',                                  # bad_json
        '{"texts": ["caf\u00e9"], "images": [null]}'.encode("latin-1"),                            # bad_utf8
        json.dumps({"texts": ["a", None], "images": [None]}).encode(),                             # bad_record
        json.dumps({"texts": [None, None], "images": [None, None]}).encode(),                      # empty
        json.dumps({"texts": ["x", None], "images": [None, "nowhere.png"]}).encode(),              # missing
        json.dumps({"texts": ["y", None], "images": [None, "zero.png"]}).encode(),                 # empty_file
        b"",
    ]
    (root / "interleaved.jsonl").write_bytes(b"\n".join(inter) + b"\n")
    (root / "zero.png").write_bytes(b"")
    text = [
        json.dumps({"text": "a good line"}).encode(),
        json.dumps({"text": "another good line"}).encode(),
        json.dumps({"text": ""}).encode(),                                                         # empty
        json.dumps({"text": 5}).encode(),                                                          # bad_record
        b"not json at all",                                                                       # bad_json
        b'{"text": "\xff\xfe"}',                                                                   # bad_utf8
    ]
    (root / "text.jsonl").write_bytes(b"\n".join(text) + b"\n")
    return {"good_inter": 2, "good_text": 2,
            "counts": {"bad_json": 2, "bad_utf8": 2, "bad_record": 2, "empty": 2, "missing": 1, "empty_file": 1}}


def test_bad_corpus_every_good_record_used_every_bad_one_counted(world, tmp_path):
    from test_sources import make_bad_corpus

    root = tmp_path / "bad"
    good_pairs, bad_pairs = make_bad_corpus(root / "train")
    jl = write_bad_jsonl(root, "train/good0.png")
    vocab = make_vocab([str(root)], world.vq)
    data = D.prepare(D.DataConfig([str(root)], cache_dir=str(tmp_path / "cache")), vocab, world.vq, context_len=64)
    kinds = {p.kind: p for p in data.parts}
    assert len(kinds["pairs"]) == len(good_pairs)
    assert len(kinds["interleaved"]) == jl["good_inter"] and len(kinds["text"]) == jl["good_text"]
    want = Counter(bad_pairs) + Counter(jl["counts"])
    assert dict(data.report.counts) == dict(want)
    assert data.report.good == len(good_pairs) + jl["good_inter"] + jl["good_text"]
    assert "skipped" in data.summary() and "bad_json" in data.summary()
    got_captions = sorted(vocab.decode_text(c.tolist()) for c in kinds["pairs"].captions)
    assert got_captions == sorted(good_pairs)
    # batches come out of it
    b = D.PackedBatches(data, vocab, context_len=64, batch_size=4, reading_ratio=0.5, reading_image_loss=True)
    assert (next(b)["targets"] != -100).any()


@pytest.mark.parametrize("name, line", [("interleaved.jsonl", 3), ("text.jsonl", 3)])
def test_strict_fails_at_first_bad_line(world, tmp_path, name, line):
    jl_root = tmp_path / "jl"
    jl_root.mkdir()
    shutil.copy(world.data / "train" / "000000.png", jl_root / "img.png")
    write_bad_jsonl(jl_root, "img.png")
    cfg = D.DataConfig([str(jl_root / name)], strict=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=rf"{name}:{line}\b"):
        D.prepare(cfg, world.vocab, world.vq, context_len=64)


def test_strict_fails_on_bad_image(world, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(world.data / "train", root)
    (root / "000001.png").write_bytes(b"")
    cfg = D.DataConfig([str(root)], strict=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=r"metadata\.jsonl:2 \(000001\.png\).*empty file"):
        D.prepare(cfg, world.vocab, world.vq, context_len=64)


def test_txt_source_and_bad_utf8(world, tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"first line\n\n  \nsecond \xff line\nthird line\n")
    data = D.prepare(D.DataConfig([str(p)]), world.vocab, world.vq, context_len=32)
    (part,) = data.parts
    assert [world.vocab.decode_document(d.tolist()) for d in part.docs] == [["first line"], ["third line"]]
    assert dict(data.report.counts) == {"bad_utf8": 1}


# ---------------------------------------------------------------- too long for the context


def test_truncation_rules(world, tmp_path):
    v, hw = world.vocab, world.vocab.tokens_per_image
    root = tmp_path / "long"
    root.mkdir()
    shutil.copy(world.data / "train" / "000000.png", root / "img.png")
    long_text = "word " * 200
    (root / "text.jsonl").write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    docs = [{"texts": [long_text, None, "tail"], "images": [None, "img.png", None]},          # text cut, image kept
            {"texts": [None] * 4, "images": ["img.png"] * 4}]                                  # 4 images never fit
    (root / "interleaved.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "train").mkdir()
    shutil.copy(world.data / "train" / "000000.png", root / "train" / "a.png")
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": long_text}) + "\n")
    T = 3 * (hw + 2)  # room for two images, not four
    data = D.prepare(D.DataConfig([str(root)], cache_dir=str(tmp_path / "c")), v, world.vq, context_len=T)
    parts = {p.kind: p for p in data.parts}
    long_doc, short_doc = parts["text"].docs
    assert len(long_doc) == T and long_doc[-1] != v.eos and v.eos == short_doc[-1]
    assert v.decode_document(long_doc.tolist())[0] == v.decode_text(v.encode_text(long_text)[:T - 1])
    (inter,) = parts["interleaved"].docs  # the 4-image document was skipped
    assert len(inter) == T and list(inter).count(v.boi) == 1 and list(inter[-hw - 2:]) == [v.boi, *inter[-hw - 1:-1], v.eoi]
    assert data.report.counts == {"too_long": 1}
    assert len(parts["pairs"].captions[0]) == T - hw - 4
    assert data.truncated == {"text": 1, "interleaved": 1, "pairs": 1}
    b = D.PackedBatches(data, v, context_len=T, batch_size=4, reading_ratio=0.5, reading_image_loss=True)
    for _ in range(3):
        for tokens, *_ in documents(next(b)):
            assert len(tokens) <= T
            v.decode_document(tokens)  # spans whole
    with pytest.raises(UserError, match="context"):
        D.prepare(D.DataConfig([str(root)], strict=True, cache_dir=str(tmp_path / "c")), v, world.vq, context_len=T)
    with pytest.raises(UserError, match="cannot hold one image"):
        D.prepare(D.DataConfig([str(root)], cache_dir=str(tmp_path / "c")), v, world.vq, context_len=hw + 3)


# ---------------------------------------------------------------- held-out pairs, texts, errors


def test_heldout_pairs(world):
    from earlyfusion.tokenizer.vq_checkpoint import load_vqvae

    rows = [json.loads(line) for line in (world.data / "test" / "metadata.jsonl").read_text().splitlines()]
    pairs = D.heldout_pairs([str(world.data)], vocab=world.vocab, image_tokenizer=world.vq,
                            cache_dir=str(world.root / "cache"))
    assert [p.caption for p in pairs] == [r["text"] for r in rows]
    vq = load_vqvae(world.vq)
    px = torch.stack([p.pixels for p in pairs])
    assert px.shape == (len(rows), 3, 16, 16) and px.min() >= -1 and px.max() <= 1
    assert torch.equal(vq.encode(px), torch.stack([p.codes for p in pairs]))
    assert pairs[0].image.size == (16, 16) and pairs[0].path.endswith(rows[0]["file_name"])
    assert len(D.heldout_pairs([str(world.data)], vocab=world.vocab, image_tokenizer=world.vq, limit=3,
                               cache_dir=str(world.root / "cache"))) == 3
    assert D.heldout_pairs([str(world.data / "text.jsonl")], vocab=world.vocab, image_tokenizer=world.vq) == []


def test_training_validates_on_a_validation_split_when_there_is_one(world, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(world.data, data)
    shutil.rmtree(data / "val", ignore_errors=True)
    assert D.validation_split(data) == "test"
    test_rows = (data / "test" / "metadata.jsonl").read_text().splitlines()
    shutil.copytree(data / "test", data / "val")
    (data / "val" / "metadata.jsonl").write_text("\n".join(test_rows[:2]) + "\n")
    assert D.validation_split(data) == "val"
    chosen = D.heldout_pairs([str(data)], vocab=world.vocab, image_tokenizer=world.vq, split=None,
                             cache_dir=str(tmp_path / "c"))
    assert len(chosen) == 2 and all("/val/" in p.path for p in chosen)
    # an explicit split is read as given: eval's test figures stay on the test split
    test = D.heldout_pairs([str(data)], vocab=world.vocab, image_tokenizer=world.vq, cache_dir=str(tmp_path / "c"))
    assert len(test) == len(test_rows) and all("/test/" in p.path for p in test)


def test_iter_texts_reads_every_part(world):
    texts = list(D.iter_texts([str(world.data)]))
    n_train = len((world.data / "train" / "metadata.jsonl").read_text().splitlines())
    inter = [json.loads(line) for line in (world.data / "interleaved.jsonl").read_text().splitlines()]
    # consecutive texts of a record are one paragraph-joined segment
    n_inter = sum(t is not None and (k == 0 or d["texts"][k - 1] is None) for d in inter for k, t in enumerate(d["texts"]))
    assert len(texts) == n_train + n_inter + 12


def test_source_errors(world, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        D.resolve_sources([str(tmp_path / "missing_dir")])
    with pytest.raises(UserError, match="weight"):
        D.parse_source("some/name:-1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no training data"):
        D.resolve_sources([str(tmp_path / "empty")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        D.resolve_sources([str(tmp_path / "x.csv")])
    assert D.parse_source("user/dataset:0.5") == ("user/dataset", 0.5)
    assert D.resolve_sources(["user/dataset"])[0].hub


def test_hub_source_code_path(world, tmp_path, monkeypatch):
    """A hub data set (stood in for by a local datasets.Dataset): image+text -> pairs, text only -> documents."""
    import datasets

    pngs = sorted((world.data / "train").glob("*.png"))[:5]
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in pngs] + [{"bytes": b"", "path": None}],
            "caption": [f"hub caption {i}" for i in range(6)]}
    images = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    texts = datasets.Dataset.from_dict({"caption": ["hub text one", "", "hub text two"]})
    monkeypatch.setattr(D_documents, "load_hub", lambda name, split: images if name == "user/images" else texts)
    cfg = D.DataConfig(["user/images", "user/texts:0.5"], text_column="caption", cache_dir=str(tmp_path / "c"))
    data = D.prepare(cfg, world.vocab, world.vq, context_len=64)
    pairs, docs = data.parts
    assert (pairs.kind, len(pairs), docs.kind, len(docs)) == ("pairs", 5, "text", 2)
    assert dict(data.report.counts) == {"empty_file": 1, "empty": 1}
    assert [world.vocab.decode_text(c.tolist()) for c in pairs.captions] == [f"hub caption {i}" for i in range(5)]
    assert data.images_encoded == 6 and D.prepare(cfg, world.vocab, world.vq, context_len=64).images_cached == 6
    from earlyfusion.tokenizer.preprocess import preprocess
    from earlyfusion.tokenizer.vq_checkpoint import load_vqvae

    want = load_vqvae(world.vq).encode(torch.stack([preprocess(p.read_bytes(), 16) for p in pngs]))
    assert np.array_equal(pairs.codes, want.reshape(5, -1).numpy())


def test_interleaved_paragraphs_and_text_only_records(world, tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"texts": ["hello", "world", None], "images": [None, None, None]}) + "\n"
                 + json.dumps({"texts": [None], "images": ["gone.png"]}) + "\n")
    data = D.prepare(D.DataConfig([str(p)], cache_dir=str(tmp_path / "c")), world.vocab, world.vq, context_len=64)
    (part,) = data.parts
    assert [world.vocab.decode_document(d.tolist()) for d in part.docs] == [["hello\n\nworld"]]
    assert dict(data.report.counts) == {"missing": 1}


def test_data_config_validation(tmp_path):
    D.DataConfig(["x"], reading_ratio=1.0, cond_dropout=0.0)  # the ends of the ranges are fine
    for bad in ({"sources": []}, {"sources": [""]}, {"reading_ratio": float("nan")}, {"reading_ratio": 1.5},
                {"cond_dropout": 1.0}, {"cond_dropout": float("inf")}, {"cond_dropout": -0.1}, {"split": ""}):
        with pytest.raises(ValueError):
            D.DataConfig(**{"sources": ["x"], **bad})
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="cache-dir"):
        D.DataConfig(["x"], cache_dir=str(tmp_path / "f"))
    with pytest.raises(ValueError):
        D.PackedBatches(D.PreparedData([], D.SkipReport(), Counter()), None, context_len=3, batch_size=1)


def test_check_vocab_matches_returns_the_fingerprint(world, tmp_path):
    from earlyfusion.tokenizer.vocab import check_vocab_matches

    assert check_vocab_matches(world.vocab, world.vq, "here") == vq_fingerprint(world.vq)
    with pytest.raises(UserError, match="^there: .*rebuild"):
        check_vocab_matches(world.vocab, make_vq(tmp_path / "other", seed=1), "there")


def test_stale_cache_temporaries_of_dead_encoders_are_removed(tmp_path):
    """A kill during the code-cache write leaves .codes-*.tmp-PID; the next encoder removes those of dead processes."""
    import subprocess
    import sys

    from earlyfusion.training.data.codes import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".codes-abc.tmp-{dead_pid}"
    alive = tmp_path / f".codes-def.tmp-{os.getppid()}"
    kept = tmp_path / "codes-0123"
    for d in (stale, alive, kept):
        (d / "x").mkdir(parents=True)
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and alive.exists() and kept.exists()


# ---------------------------------------------------------------- augmentation


def _grids(part) -> np.ndarray:
    """(N, K, h*w): view 0 and the augmented views of every pair."""
    return np.concatenate([part.codes[:, None], part.views], 1)


def test_augmented_views_differ_and_are_deterministic_for_a_seed(world, tmp_path):
    cfg = world.cfg(augment_views=4, augment_scale=0.5, cache_dir=str(tmp_path / "a"))
    part = D.prepare(cfg, world.vocab, world.vq, context_len=64, seed=0).parts[0]
    plain = D.prepare(world.cfg(cache_dir=str(tmp_path / "plain")), world.vocab, world.vq, context_len=64).parts[0]
    assert part.views.shape == (len(plain), 3, world.vocab.tokens_per_image) and part.n_views == 4
    assert np.array_equal(part.codes, plain.codes)  # view 0 is the image as it is
    distinct = [len({g.tobytes() for g in grids}) for grids in _grids(part)]
    assert sum(d >= 2 for d in distinct) >= 0.9 * len(distinct) and sum(d == 4 for d in distinct) >= len(distinct) / 3, \
        distinct
    # the same seed for the same images elsewhere: the same grids; another seed: other grids
    moved = tmp_path / "moved"
    shutil.copytree(world.data, moved, ignore=shutil.ignore_patterns(".earlyfusion-cache"))
    again = D.prepare(world.cfg([str(moved)], augment_views=4, augment_scale=0.5, cache_dir=str(tmp_path / "b")),
                      world.vocab, world.vq, context_len=64, seed=0).parts[0]
    assert np.array_equal(_grids(again), _grids(part))
    other = D.prepare(world.cfg(augment_views=4, augment_scale=0.5, cache_dir=str(tmp_path / "b")), world.vocab, world.vq,
                      context_len=64, seed=1).parts[0]
    assert np.array_equal(other.codes, part.codes) and not np.array_equal(other.views, part.views)
    # in pixels every view is another image
    from earlyfusion.training.data.augment import Augment

    src = next((world.data / "train").glob("*.png"))
    px = Augment(views=4, min_scale=0.8, flip=True, seed=0).pixels(src, 16)
    assert len(px) == 4 and all(not torch.equal(px[i], px[j]) for i in range(4) for j in range(i))


def test_flips_only_mirror(world):
    """With crops of the whole image, an augmented view is view 0 or its mirror image, and both occur."""
    from earlyfusion.training.data.augment import Augment

    src = next((world.data / "train").glob("*.png"))
    views = Augment(views=12, min_scale=1.0, flip=True, seed=0).pixels(src, 16)
    mirrored = [torch.equal(v, views[0].flip(-1)) for v in views[1:]]
    assert all(m or torch.equal(v, views[0]) for m, v in zip(mirrored, views[1:]))
    assert mirrored == [view % 2 == 1 for view in range(1, 12)]  # the odd-numbered views
    assert all(torch.equal(v, views[0]) for v in Augment(views=5, min_scale=1.0, flip=False, seed=0).pixels(src, 16))


def test_mirror_caption_exchanges_whole_words():
    from earlyfusion.training.data.augment import Augment, parse_swap

    a = Augment(views=2, min_scale=1.0, flip=True, seed=0, swap=parse_swap("left:right,east:West"))
    assert a.mirror_caption("a red circle at the top left and a blue square on the right") == \
        "a red circle at the top right and a blue square on the left"
    assert a.mirror_caption("Left of the leftmost house, facing east") == "Right of the leftmost house, facing west"
    assert a.mirror_caption("") == "" and Augment(2, 1.0, True, 0).mirror_caption("on the left") == "on the left"
    assert parse_swap("none") == () and parse_swap(" left : right ") == (("left", "right"),)
    for bad in ("left", "left:right:up", "left:left", "left:right,right:up", "left:1", "le ft:right"):
        with pytest.raises(ValueError, match="augment-flip-words"):
            parse_swap(bad)
    with pytest.raises(ValueError, match="augment-flip-words"):
        D.DataConfig(["x"], augment_flip_words="left")


def test_mirrored_views_show_mirrored_captions_and_key_the_resume(world, tmp_path):
    """With crops of the whole image, view 1 is the mirror image and its documents carry the caption with left and
    right exchanged; view 0 keeps the caption; without words to exchange, both show the caption."""
    train = world.data / "train"
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                for line in (train / "metadata.jsonl").read_text().splitlines()}
    assert any("left" in c or "right" in c for c in captions.values())
    kw = dict(augment_views=2, augment_scale=1.0, augment_flip=True, cache_dir=str(tmp_path / "c"))
    b = world.batches([str(train)], context_len=64, batch_size=4, seed=1, reading_ratio=1.0, **kw)
    part = b.data.parts[0]
    assert part.mirrored == (False, True)
    v = world.vocab
    swapped = 0
    for i in range(len(part)):
        text, mirrored_text = v.decode_text(part.caption(i, 0).tolist()), v.decode_text(part.caption(i, 1).tolist())
        want = " ".join({"left": "right", "right": "left"}.get(w, w) for w in text.split())
        assert mirrored_text == want and text in captions.values()
        swapped += text != mirrored_text
    assert swapped > 0
    # every drawn document carries the caption of the view it shows
    for _ in range(2 * len(part)):
        (p, item, variant, view), doc = b._draw()
        assert doc.tolist() == D.pair_document(v, part.image(item, view), part.caption(item, view), variant).tolist()
    plain = world.batches([str(train)], context_len=64, batch_size=4, seed=1, augment_flip_words="none", **kw)
    assert plain.data.parts[0].mirror_captions is None
    assert all(np.array_equal(plain.data.parts[0].caption(i, 1), part.caption(i, 0)) for i in range(len(part)))
    with pytest.raises(UserError, match="resume"):
        plain.load_state_dict(json.loads(json.dumps(b.state_dict())))


def test_copy_reference_holds_the_augmented_views_training_saw(world, tmp_path):
    """eval's copy rate compares drawings with every grid a run trained on: with augmented views those views too,
    and the captions of mirrored views join the training captions (a scene seen mirrored is not novel)."""
    from earlyfusion.copies import training_grids
    from earlyfusion.evaluate import _recorded_augment
    from earlyfusion.training.data.augment import NO_AUGMENT

    train = str(world.data / "train")
    options = {"augment_views": 3, "augment_scale": 1.0, "augment_flip": True, "augment_flip_words": "left:right"}
    cfg = world.cfg([train], cache_dir=str(tmp_path / "c"), **options)
    part = D.prepare(cfg, world.vocab, world.vq, context_len=64, seed=5).parts[0]
    augment = _recorded_augment({"train": {"seed": 5, "data": options}})
    assert augment == cfg.augment(5) and _recorded_augment({}) == NO_AUGMENT
    ref = training_grids([train], vocab=world.vocab, image_tokenizer=world.vq, cache_dir=str(tmp_path / "c"),
                         augment=augment)
    assert len(ref.codes) == len(ref.srcs) == 3 * len(part)
    trained = {g.tobytes() for g in _grids(part).reshape(-1, part.codes.shape[1]).astype(np.int64)}
    assert {row.numpy().tobytes() for row in ref.codes} == trained
    assert sum("mirrored" in s for s in ref.srcs) == len(part)  # view 1 of each image
    texts = [json.loads(line)["text"] for line in (world.data / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {augment.mirror_caption(t) for t in texts} <= set(ref.captions) and set(texts) <= set(ref.captions)
    plain = training_grids([train], vocab=world.vocab, image_tokenizer=world.vq, cache_dir=str(tmp_path / "c"))
    assert len(plain.codes) == len(part) and set(plain.captions) == set(texts)


def test_augmentation_settings_key_the_code_cache(world, tmp_path):
    n = len(list((world.data / "train").glob("*.png")))
    cache = str(tmp_path / "cache")

    def encoded(seed=0, **kw) -> int:
        return D.prepare(world.cfg(cache_dir=cache, **kw), world.vocab, world.vq, context_len=64, seed=seed).images_encoded

    assert encoded() == n and encoded(seed=3) == 0  # unaugmented codes do not depend on the seed
    assert encoded(augment_views=3) == n and encoded(augment_views=3) == 0
    assert encoded(augment_views=4) == n  # every setting is its own entry
    assert encoded(augment_views=3, augment_scale=0.6) == n
    assert encoded(augment_views=3, augment_flip=True) == n
    assert encoded(augment_views=3, seed=1) == n
    assert encoded() == 0 and encoded(augment_views=3) == 0 and encoded(augment_views=3, augment_flip=True) == 0


def test_each_pair_shows_every_view_once_in_k_epochs_and_resumes_exactly(world, tmp_path):
    K = 3
    aug = world.batches(seed=2, augment_views=K, cache_dir=str(tmp_path / "c"))
    plain = world.batches(seed=2, cache_dir=str(tmp_path / "c"))
    p = next(i for i, part in enumerate(aug.data.parts) if part.kind == "pairs")
    n = len(aug.data.parts[p])
    seen: dict[int, list[int]] = {}
    for _ in range(K * n):
        desc, doc = aug._draw()
        want, _ = plain._draw()
        assert desc[:3] == want[:3]  # augmentation picks the grid, never the order, the direction or the dropout
        if desc[0] == p:
            seen.setdefault(desc[1], []).append(desc[3])
            part = aug.data.parts[p]
            img = world.vocab.image_span(part.image(desc[1], desc[3]).reshape(world.vocab.grid))
            assert any(doc[i:i + len(img)].tolist() == img for i in range(len(doc)))
    full = [views for views in seen.values() if len(views) >= K]
    assert full and all(sorted(views[:K]) == list(range(K)) for views in full)
    # exact resume of the augmented stream
    a = world.batches(seed=4, augment_views=K, cache_dir=str(tmp_path / "c"))
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(3)]
    fresh = world.batches(seed=4, augment_views=K, cache_dir=str(tmp_path / "c"))
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(UserError, match="resume"):
        world.batches(seed=4, cache_dir=str(tmp_path / "c")).load_state_dict(state)


def test_augment_options_are_validated():
    D.DataConfig(["x"], augment_views=D.MAX_AUGMENT_VIEWS, augment_scale=0.1, augment_flip=True)
    for bad in ({"augment_views": 0}, {"augment_views": D.MAX_AUGMENT_VIEWS + 1}, {"augment_flip": True},
                {"augment_scale": 0.5}, {"augment_views": 2, "augment_scale": 0.05},
                {"augment_views": 2, "augment_scale": 1.5}, {"augment_views": 2, "augment_scale": float("nan")}):
        with pytest.raises(ValueError, match="augment"):
            D.DataConfig(["x"], **bad)


def test_a_caption_that_does_not_fit_is_an_error_before_encoding(world, tmp_path):
    """prepare(fit_captions=True): the longest caption with one image must fit; the error names the length needed."""
    v = world.vocab
    caps = [json.loads(line)["text"] for line in (world.data / "train" / "metadata.jsonl").read_text().splitlines()]
    need = max(len(ids) for ids in v.encode_texts(caps)) + v.tokens_per_image + 4
    cache = tmp_path / "cache"
    with pytest.raises(D.ContextTooShort, match=f"needs {need}") as e:
        D.prepare(world.cfg(cache_dir=str(cache)), v, world.vq, context_len=need - 1, fit_captions=True)
    assert e.value.need == need and "metadata.jsonl" in e.value.where
    assert not cache.exists()  # nothing was encoded
    data = D.prepare(world.cfg(cache_dir=str(cache)), v, world.vq, context_len=need, fit_captions=True)
    assert data.longest_pair == need and not data.truncated["pairs"]
    # without fit_captions the caption is cut and counted, as before
    assert D.prepare(world.cfg(cache_dir=str(cache)), v, world.vq, context_len=need - 1).truncated["pairs"] >= 1
