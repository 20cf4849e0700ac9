"""`train --data CODES` streams: every record once per epoch over all lanes, a new order each epoch, the same batches
whatever the number of processes or workers, exact mid-epoch resume (one process, two gloo processes, across the
two), the run's own image tokenizer only, changed or missing shards refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli_status, run_cli
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_checkpoint import vq_fingerprint
from earlyfusion.training.data import DataConfig, StreamedBatches, training_batches
from earlyfusion.training.data import stream as stream_module
from earlyfusion.training.data.distributed import join
from test_shards import make_vocab, make_vq, png_bytes, write_tar

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_corpus", REPO / "bench" / "corpus.py")
corpus_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_bench)


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """60 random records in shards of 25, 25, 10 (codes of the tiny image tokenizer: 4x4 of 32), a tenth without
    caption; its vocabulary."""
    root = tmp_path_factory.mktemp("stream")
    vq = make_vq(root / "vq")
    corpus_bench.random_code_shards(root / "codes", images=60, per_shard=25, fingerprint=vq_fingerprint(vq),
                                    codebook_size=32, grid=(4, 4), empty_captions=0.1)
    vocab = make_vocab(root / "vocab", vq, corpus_bench.random_captions(np.random.default_rng(0), 200))
    return root, vq, Vocabulary.load(vocab)


def _stream(codes, **kw) -> StreamedBatches:
    root, vq, vocab = codes
    cfg = DataConfig(sources=[str(root / "codes")], loader_workers=kw.pop("workers", 0))
    b = training_batches(cfg, vocab=vocab, image_tokenizer=vq, context_len=kw.pop("context_len", 96),
                         batch_size=kw.pop("batch_size", 4), seed=kw.pop("seed", 0))
    if kw:  # one process's share, nothing gathered
        b = StreamedBatches(b.spec.parts, vocab, context_len=b.spec.T, batch_size=b.spec.B, reading_ratio=0.3,
                            cond_dropout=0.1, reading_image_loss=False, seed=b.spec.seed, local=True, **kw)
    return b


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_record_once_per_epoch_in_a_new_order(codes, tmp_path, monkeypatch):
    root, vq, vocab = codes
    corpus_bench.random_code_shards(tmp_path / "codes", images=60, per_shard=25, fingerprint=vq_fingerprint(vq),
                                    codebook_size=32, grid=(4, 4), block_records=8)  # 4 + 4 + 2 = 10 chunks, 4 lanes
    taken: list[tuple[int, int, int]] = []  # (slot, offset, record)
    original = stream_module._Chunk.take

    def spy(self, spec, offset):
        out = original(self, spec, offset)
        taken.append((self.slot, offset, out[0]))
        return out

    monkeypatch.setattr(stream_module._Chunk, "take", spy)
    b = training_batches(DataConfig(sources=[str(tmp_path / "codes")]), vocab=vocab, image_tokenizer=vq, context_len=96,
                         batch_size=4, seed=0)
    n_chunks = len(b.spec.parts[0].chunks)
    assert n_chunks == 10
    for _ in range(60):
        next(b)
    finished = {lane.lane + k * 4 for lane in b._engine.lanes for k in range(lane.cursor[0][0])}
    for epoch in range(2):
        slots = range(epoch * n_chunks, (epoch + 1) * n_chunks)
        assert set(slots) <= finished, "run longer: epoch not finished by every lane"
        records = Counter(rec for slot, _, rec in taken if slot in slots)
        assert sorted(records) == list(range(60)) and set(records.values()) == {1}
    order = [[rec for slot, _, rec in taken if slot // n_chunks == e] for e in range(2)]
    assert order[0] != order[1]
    assert len(set(taken)) == len(taken)  # nothing read twice


def test_batches_do_not_depend_on_processes_or_workers(codes):
    whole = _stream(codes, batch_size=4)
    halves = [_stream(codes, batch_size=4, rank=r, world=2) for r in range(2)]
    workers = _stream(codes, batch_size=4, workers=2)
    for _ in range(6):
        a = next(whole)
        parts = [next(h) for h in halves]
        assert _equal(a, {k: torch.cat([p[k] for p in parts]) for k in a})
        assert _equal(a, next(workers))
    assert (a["targets"] != -100).sum() > 0 and (a["modality"] == 1).sum() > 0


def test_exact_resume_mid_epoch_on_any_number_of_processes(codes):
    a = _stream(codes, batch_size=4)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON, as a checkpoint holds it
    assert state["batches"] == 5 and len(state["lanes"]) == 4
    rest = [next(a) for _ in range(4)]
    b = _stream(codes, batch_size=4)
    b.load_state_dict(state)
    assert all(_equal(x, next(b)) for x in rest)
    halves = [_stream(codes, batch_size=4, rank=r, world=2) for r in range(2)]
    w = _stream(codes, batch_size=4, workers=2)
    for s in (*halves, w):
        s.load_state_dict(state)
    for x in rest:
        parts = [next(h) for h in halves]
        assert _equal(x, {k: torch.cat([p[k] for p in parts]) for k in x})
        assert _equal(x, next(w))
    other = _stream(codes, batch_size=4, seed=1)
    with pytest.raises(UserError):
        other.load_state_dict(state)


def _worker(root: str, rank: int, out: str) -> None:
    """One of two gloo processes: 3 batches, the gathered state, 3 more; a fresh stream from that state, 3 batches."""
    join()
    vocab = Vocabulary.load(Path(root) / "vocab")
    cfg = DataConfig(sources=[str(Path(root) / "codes")])

    def stream():
        return training_batches(cfg, vocab=vocab, image_tokenizer=Path(root) / "vq", context_len=96, batch_size=4,
                                seed=0)

    a = stream()
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    later = [next(a) for _ in range(3)]
    b = stream()
    b.load_state_dict(state)
    resumed = [next(b) for _ in range(3)]
    torch.save({"first": first, "later": later, "resumed": resumed, "state": state}, Path(out) / f"rank{rank}.pt")


def test_two_gloo_processes_resume_exactly(codes, tmp_path):
    root = codes[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from test_stream import _worker; "
            f"_worker({str(root)!r}, int(sys.argv[1]), {str(tmp_path)!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    one = _stream(codes, batch_size=4)
    for i in range(3):
        assert _equal(r0["first"][i], r1["first"][i]) and _equal(r0["first"][i], next(one))
    assert r0["state"] == r1["state"] == one.state_dict()
    for i in range(3):
        assert _equal(r0["later"][i], r0["resumed"][i]) and _equal(r1["later"][i], r1["resumed"][i])
        assert _equal(r0["later"][i], next(one))


def test_codes_of_another_image_tokenizer_are_refused(codes, tmp_path):
    root, _, vocab = codes
    other = make_vq(tmp_path / "other", seed=3)
    other_vocab = Vocabulary.load(make_vocab(tmp_path / "vocab", other, ["a b c"] * 10))
    with pytest.raises(UserError) as e:
        training_batches(DataConfig(sources=[str(root / "codes")]), vocab=other_vocab, image_tokenizer=other,
                         context_len=96, batch_size=4, seed=0)
    assert "codes of image tokenizer" in str(e.value)
    grid_vocab = Vocabulary.load(make_vocab(tmp_path / "grid_vocab", codes[1], ["a b c"] * 10, grid_tokens=True))
    with pytest.raises(UserError) as e:
        training_batches(DataConfig(sources=[str(root / "codes")]), vocab=grid_vocab, image_tokenizer=codes[1],
                         context_len=96, batch_size=4, seed=0)
    assert "grid tokens" in str(e.value)


def test_changed_missing_or_truncated_shards_are_one_line(codes, tmp_path):
    src = codes[0] / "codes"
    for case in ("changed", "record", "missing", "truncated"):
        d = tmp_path / case
        shutil.copytree(src, d)
        shard = d / "shard-000000.safetensors"
        raw = bytearray(shard.read_bytes())
        if case == "changed":
            raw[-3] ^= 0xFF  # same size: its block's checksum tells when the block is read
            shard.write_bytes(bytes(raw))
        elif case == "record":
            record = d / "shard-000000.json"
            record.write_text(record.read_text().replace('"records": 25', '"records": 24'))
        elif case == "missing":
            shard.unlink()
        else:
            shard.write_bytes(bytes(raw[:-10]))
        with pytest.raises(UserError) as e:
            b = training_batches(DataConfig(sources=[str(d)]), vocab=codes[2], image_tokenizer=codes[1],
                                 context_len=96, batch_size=4, seed=0)
            for _ in range(30):
                next(b)
        assert "shard-000000" in str(e.value) and "\n" not in str(e.value), case
        assert {"changed": "block of records", "record": "differs from its checksum", "missing": "missing",
                "truncated": "bytes, but"}[case] in str(e.value), (case, str(e.value))


def test_tar_shards_are_encoded_before_training(tmp_path, codes):
    write_tar(tmp_path / "00000.tar", [("0.png", png_bytes()), ("0.txt", b"x")])
    with pytest.raises(UserError) as e:
        training_batches(DataConfig(sources=[str(tmp_path / "00000.tar")]), vocab=codes[2], image_tokenizer=codes[1],
                         context_len=96, batch_size=4, seed=0)
    assert "earlyfusion encode" in str(e.value)


def test_train_streams_code_shards_and_resumes_exactly(codes, tmp_path, capsys):
    root, vq, _ = codes
    argv = ["train", "--data", root / "codes", "--image-tokenizer", vq, "--vocab", root / "vocab", "--preset", "tiny",
            "--steps", 6, "--batch-size", 4, "--warmup-steps", 1, "--eval-every", 0, "--checkpoint-every", 3,
            "--keep-checkpoints", 3, "--lr", 3e-3]
    run_cli(*argv, "--out", tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    run_cli(*argv, "--out", tmp_path / "cut", "--resume")

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6
    other = make_vq(tmp_path / "other", seed=5)
    rc, err = cli_status(capsys, ["train", "--data", root / "codes", "--image-tokenizer", other, "--vocab",
                                  make_vocab(tmp_path / "v2", other, ["a b"] * 5), "--out", tmp_path / "x", "--preset",
                                  "tiny", "--steps", 2])
    assert_one_line_error(rc, err)


def test_a_code_shard_run_validates_on_its_held_out_split(codes, tmp_path, capsys):
    """CODES/val (encoded like the corpus) is the run's held-out split; a --val-split that is not there is one line."""
    root, vq, _ = codes
    shutil.copytree(root / "codes", tmp_path / "codes")
    corpus_bench.random_code_shards(tmp_path / "codes" / "val", images=12, per_shard=12, fingerprint=vq_fingerprint(vq),
                                    codebook_size=32, grid=(4, 4), seed=7)
    argv = ["train", "--data", tmp_path / "codes", "--image-tokenizer", vq, "--vocab", root / "vocab", "--preset", "tiny",
            "--steps", 4, "--batch-size", 4, "--warmup-steps", 1, "--eval-every", 2]
    run_cli(*argv, "--out", tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss_image" in r] == [2, 4]
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()
    rc, err = cli_status(capsys, [*argv, "--out", tmp_path / "run2", "--val-split", "dev"])
    assert_one_line_error(rc, err)
    assert "no held-out split 'dev'" in err and "encode" in err
