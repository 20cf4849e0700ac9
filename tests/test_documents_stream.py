"""Text-only and interleaved corpora through `encode` and `train --data CODES`: the same documents as the in-memory
path, every record once per epoch, exact resume, bad records counted, documents whose images overflow refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli_status, run_cli
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.training.data import DataConfig, StreamedBatches, training_batches
from earlyfusion.training.data import stream as stream_module
from earlyfusion.training.data.code_shards import CodeSet
from earlyfusion.training.data.documents import prepare
from test_shards import make_vocab, make_vq, png_bytes

WORDS = "red green blue square circle small large left right top bottom a the and of".split()


def _sentence(rng, n) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """An interleaved .jsonl (1-3 images among texts; one image broken, one path outside the folder, one bad line)
    and a text .jsonl (one blank line), each encoded into code shards of 7 records; the tiny image tokenizer and a
    vocabulary."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(6):
        (root / "imgs" / f"{i}.png").write_bytes(png_bytes(i))
    (root / "imgs" / "broken.png").write_bytes(png_bytes(9)[:50])
    lines = []
    for i in range(20):
        texts, images = [], []
        for k in range(int(rng.integers(1, 4))):
            if rng.random() < 0.7:
                texts.append(_sentence(rng, int(rng.integers(2, 9))))
                images.append(None)
            texts.append(None)
            images.append(f"imgs/{int(rng.integers(0, 6))}.png")
        if rng.random() < 0.5:
            texts.append(_sentence(rng, 4))
            images.append(None)
        lines.append(json.dumps({"texts": texts, "images": images}))
    lines[3] = json.dumps({"texts": ["see", None], "images": [None, "imgs/broken.png"]})
    lines[8] = json.dumps({"texts": [None], "images": ["../outside.png"]})
    lines[12] = "{not json"
    (root / "interleaved.jsonl").write_text("\n".join(lines) + "\n")
    texts = [json.dumps({"text": _sentence(rng, int(rng.integers(3, 30)))}) for _ in range(15)]
    texts[5] = ""
    (root / "text.jsonl").write_text("\n".join(texts) + "\n")
    vq = make_vq(root / "vq")
    vocab = make_vocab(root / "vocab", vq, [" ".join(WORDS)] * 20)
    for name in ("interleaved", "text"):
        run_cli("encode", "--data", root / f"{name}.jsonl", "--image-tokenizer", vq, "--out", root / f"codes_{name}",
                "--shard-size", 7, "--workers", 0)
    return root, vq, Vocabulary.load(vocab)


def test_encode_keeps_documents_whole_and_counts_bad_records(corpora):
    root, vq, vocab = corpora
    m = json.loads((root / "codes_interleaved" / "manifest.json").read_text())
    assert m["kind"] == "interleaved" and m["records"] == 17
    assert m["skipped"] == {"bad_json": 1, "outside_data_dir": 1, "truncated": 1}
    assert [s["records"] for s in m["shards"]] == [6, 5, 6]  # lines 1-7, 8-14, 15-20, less the bad ones
    docs = CodeSet.open(root / "codes_interleaved").reader(0).documents_of(0, 5)
    first = json.loads((root / "interleaved.jsonl").read_text().splitlines()[0])
    images, texts = docs[0]
    assert len(images) == sum(x is not None for x in first["images"]) and len(texts) == len(images) + 1
    assert [t for t in texts if t] == [t for t in first["texts"] if t]
    assert all(g.shape == (4, 4) for g in images)
    t = json.loads((root / "codes_text" / "manifest.json").read_text())
    assert t["kind"] == "text" and t["records"] == 14 and t["skipped"] == {}  # a blank line is no record
    assert CodeSet.open(root / "codes_text").reader(0).documents_of(0, 1)[0][0] == []


def _documents_of_one_epoch(stream: StreamedBatches, monkeypatch) -> list[tuple[int, ...]]:
    """The documents drawn from the chunks of the first epoch (slots below the number of chunks), all of them."""
    seen = []
    original = stream_module._Chunk.take
    part = stream.spec.parts[0]

    def spy(self, spec, offset):
        out = original(self, spec, offset)
        if self.slot < len(part.chunks):
            seen.append(tuple(int(x) for x in out[2]))
        return out

    monkeypatch.setattr(stream_module._Chunk, "take", spy)
    for _ in range(1000):
        if len(seen) >= len(part):
            break
        next(stream)
    assert len(seen) == len(part)
    return seen


@pytest.mark.parametrize("kind,T", [("interleaved", 60), ("text", 16)])
def test_streamed_documents_are_the_in_memory_documents(corpora, kind, T, monkeypatch):
    """One epoch of the stream draws every document once, token for token the one the in-memory path builds from
    the .jsonl itself (text cut to the context the same way)."""
    root, vq, vocab = corpora
    stream = training_batches(DataConfig(sources=[str(root / f"codes_{kind}")]), vocab=vocab, image_tokenizer=vq,
                              context_len=T, batch_size=2, seed=0)
    assert stream.spec.parts[0].kind == kind
    streamed = _documents_of_one_epoch(stream, monkeypatch)
    memory = prepare(DataConfig(sources=[str(root / f"{kind}.jsonl")]), vocab, vq, context_len=T).parts[0].docs
    assert Counter(streamed) == Counter(tuple(int(x) for x in d) for d in memory)
    assert kind != "text" or any(len(d) == T for d in streamed)  # the cut ones are there, cut to the context


def test_a_mixture_of_interleaved_and_text_documents_resumes_exactly(corpora, tmp_path):
    root, vq, vocab = corpora
    cfg = DataConfig(sources=[str(root / "codes_interleaved") + ":0.6", str(root / "codes_text") + ":0.4"])

    def fresh():
        return training_batches(cfg, vocab=vocab, image_tokenizer=vq, context_len=64, batch_size=4, seed=3)

    a = fresh()
    for _ in range(5):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = fresh()
    b.load_state_dict(state)
    got = [next(b) for _ in range(3)]
    for x, y in zip(want, got):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_documents_whose_images_overflow_the_context_are_refused(corpora, capsys):
    root, vq, vocab = corpora
    most = max(s["most_image_tokens"] for s in json.loads((root / "codes_interleaved" / "manifest.json").read_text())
               ["shards"])
    with pytest.raises(Exception) as e:
        training_batches(DataConfig(sources=[str(root / "codes_interleaved")]), vocab=vocab, image_tokenizer=vq,
                         context_len=most, batch_size=2, seed=0)
    assert "document's images take" in str(e.value) and "--context-len" in str(e.value)
    training_batches(DataConfig(sources=[str(root / "codes_interleaved")]), vocab=vocab, image_tokenizer=vq,
                     context_len=most + 1, batch_size=2, seed=0)  # one more token: fits
