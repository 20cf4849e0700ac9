"""`earlyfusion encode`: code shards + manifest (fingerprint, counts, checksums), the same codes from a folder or its tar
shards, from one process or two, a killed encode finished by running it again, wrong pairings refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli_status, run_cli
from earlyfusion.core.checkpoint import sha256_file
from earlyfusion.core.rundir import run_lock
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_checkpoint import vq_fingerprint
from earlyfusion.training.data import DataConfig, iter_texts, training_batches
from earlyfusion.training.data.code_shards import CodeSet, ShardReader, codes_dtype, write_code_shard
from test_shards import make_folder, make_vocab, make_vq, png_bytes, write_tar

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    folder = make_folder(root / "imgs", 26)
    (folder / "broken.png").write_bytes(png_bytes()[:60])  # listed: counted as truncated
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "broken"}) + "\n")
    run_cli("data", "shard", "--data", folder, "--out", root / "tars", "--shard-size", 10)
    return root, folder, make_vq(root / "vq")


def _manifest(codes: Path) -> dict:
    return json.loads((codes / "manifest.json").read_text())


def test_encode_writes_shards_and_a_manifest_that_checks_them(corpus, tmp_path):
    root, folder, vq = corpus
    out = tmp_path / "codes"
    run_cli("encode", "--data", root / "tars" / "{00000..00002}.tar", "--image-tokenizer", vq, "--out", out)
    m = _manifest(out)
    assert m["image_tokenizer"] == vq_fingerprint(vq) and m["codes_dtype"] == "uint16" and m["grid"] == [4, 4]
    assert m["records"] == 26 and m["skipped"] == {"truncated": 1}
    assert [s["records"] for s in m["shards"]] == [10, 10, 6]
    assert [sum(s["skipped"].values()) for s in m["shards"]] == [0, 0, 1]
    for s in m["shards"]:
        assert sha256_file(out / s["name"]) == s["sha256"] and (out / s["name"]).stat().st_size == s["bytes"]
    codes = CodeSet.open(out)
    grids, captions = codes.reader(0).read(0, 3)
    assert [g.shape for g in grids] == [(4, 4)] * 3 and captions[0] == "a red square 0"
    assert all(int(g.max()) < 32 for g in grids)
    # the folder itself gives the same shards (same records, same order, same codes)
    run_cli("encode", "--data", folder, "--image-tokenizer", vq, "--out", tmp_path / "from_folder", "--shard-size", 10,
            "--batch-size", 3, "--workers", 2)
    assert [s["sha256"] for s in _manifest(tmp_path / "from_folder")["shards"][:2]] == \
        [s["sha256"] for s in m["shards"][:2]]


def test_a_killed_encode_finishes_by_running_it_again(corpus, tmp_path, caplog):
    root, _, vq = corpus
    out = tmp_path / "codes"
    argv = ["encode", "--data", root / "tars", "--image-tokenizer", vq, "--out", out]
    run_cli(*argv)
    whole = _manifest(out)
    # as a kill leaves it: shard 1 never written, no manifest yet, a temporary of a dead process
    for name in ("shard-000001.safetensors", "shard-000001.json", "manifest.json"):
        (out / name).unlink()
    (out / ".shard-000001.safetensors.tmp-999999999").write_bytes(b"half")
    caplog.set_level("INFO", logger="earlyfusion")
    run_cli(*argv)
    assert "2 of 3 shard(s) were encoded by an earlier run" in caplog.text
    assert _manifest(out) == whole
    assert not list(out.glob(".*tmp*"))


def test_two_processes_encode_disjoint_shards_to_the_same_result(corpus, tmp_path):
    root, _, vq = corpus
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("encode", "--data", root / "tars", "--image-tokenizer", vq, "--out", one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "earlyfusion.cli", "encode", "--data", str(root / "tars"),
                                       "--image-tokenizer", str(vq), "--out", str(two), "--workers", "1"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    a, b = _manifest(one), _manifest(two)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["records"] == b["records"] and a["skipped"] == b["skipped"]


def test_codes_of_another_tokenizer_in_out_are_refused(corpus, tmp_path, capsys):
    root, _, vq = corpus
    out = tmp_path / "codes"
    run_cli("encode", "--data", root / "tars", "--image-tokenizer", vq, "--out", out)
    other = make_vq(tmp_path / "other", seed=1)
    rc, err = cli_status(capsys, ["encode", "--data", root / "tars", "--image-tokenizer", other, "--out", out])
    assert_one_line_error(rc, err)
    assert "image tokenizer" in err
    with run_lock(out, "another encode"):
        rc, err = cli_status(capsys, ["encode", "--data", root / "tars", "--image-tokenizer", vq, "--out", out])
    assert_one_line_error(rc, err)
    assert "in use by" in err


def test_code_dtype_is_narrow_only_where_the_codebook_fits(tmp_path):
    assert codes_dtype(65536) == np.uint16 and codes_dtype(65537) == np.int32
    big = [np.full((2, 3), 70000, np.int64), np.arange(4).reshape(2, 2)]
    rec = write_code_shard(tmp_path, "shard-000000.safetensors", big, ["x", None], {"codes_dtype": "int32"})
    grids, captions = ShardReader(tmp_path / rec["name"], np.dtype("int32")).read(0, 2)
    assert grids[0].tolist() == big[0].tolist() and grids[1].shape == (2, 2) and captions == ["x", ""]


def test_a_tar_cut_short_is_counted(corpus, tmp_path):
    _, _, vq = corpus
    tar = write_tar(tmp_path / "00000.tar", [(f"{i}.{e}", png_bytes(i) if e == "png" else b"c") for i in range(3)
                                             for e in ("png", "txt")])
    raw, last = tar.read_bytes(), list(tarfile.open(tar))[-1]
    tar.write_bytes(raw[:last.offset_data + 512])  # cut after the last member: no end-of-archive marker
    run_cli("encode", "--data", tar, "--image-tokenizer", vq, "--out", tmp_path / "codes")
    m = _manifest(tmp_path / "codes")
    assert m["skipped"] == {"truncated_shard": 1} and m["records"] == 2


def test_grid_tokens_keep_each_image_grid_through_encode_and_stream(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = [(16, 8), (8, 16), (16, 16), (12, 16)] * 3
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (20 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    vq = make_vq(tmp_path / "vq")
    run_cli("encode", "--data", folder, "--image-tokenizer", vq, "--out", tmp_path / "codes", "--grid-tokens")
    m = _manifest(tmp_path / "codes")
    assert m["grid_tokens"] and m["grids"] == [[2, 4], [4, 2], [4, 3], [4, 4]]
    grids, _ = CodeSet.open(tmp_path / "codes").reader(0).read(0, 4)
    assert [g.shape for g in grids] == [(2, 4), (4, 2), (4, 4), (4, 3)]
    # the captions of code shards are text for the BPE, as a folder's are
    assert list(iter_texts([str(tmp_path / "codes")])) == [f"picture {i}" for i in range(len(sizes))]
    vocab = Vocabulary.load(make_vocab(tmp_path / "vocab", vq, ["picture"] * 20, grid_tokens=True))
    batches = training_batches(DataConfig(sources=[str(tmp_path / "codes")]), vocab=vocab, image_tokenizer=vq,
                               context_len=64, batch_size=2, seed=0)
    assert batches.data.grids == [(2, 4), (4, 2), (4, 3), (4, 4)]
    batch = next(batches)
    assert int((batch["tokens"] == vocab.row_end).sum()) > 0
