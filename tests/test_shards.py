"""WebDataset tar shards: brace patterns, `data shard` (atomic), reading records as a stream with bad input counted,
truncated shards, member names that leave the archive. Also the helpers the encode and stream tests share."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli_status, run_cli
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vq_checkpoint import read_vq_config, save_vqvae, vq_fingerprint
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.training.data import SkipReport, expand_braces, iter_image_text, iter_texts, resolve_sources, tar_records
from earlyfusion.training.data.records import pair_records
from earlyfusion.training.data.tar_shards import read_tar, safe_member_name, split_key

# ---------------------------------------------------------------- helpers shared with test_encode / test_stream


def make_vq(path: Path, seed: int = 0, **changes) -> Path:
    """A tiny image tokenizer with random weights and an initialised codebook (so its codes are a pure function of the
    pixels, as a trained one's are)."""
    torch.manual_seed(seed)
    vq = VQVAE(replace(VQ_PRESETS["tiny"], **changes))
    for name, buf in vq.named_buffers():
        if name.endswith("initted"):
            buf.fill_(True)
    save_vqvae(vq, path)
    return path


def make_vocab(path: Path, vq: Path, texts: list[str], grid_tokens: bool = False) -> Path:
    cfg = read_vq_config(vq)
    Vocabulary.build(texts, codebook_size=cfg.codebook_size, grid=cfg.grid_size, image_tokenizer_fingerprint=vq_fingerprint(vq),
                     text_vocab_size=300, grid_tokens=grid_tokens).save(path)
    return path


def make_folder(root: Path, n: int = 30, seed: int = 0) -> Path:
    """An imagefolder of n small PNGs with captions of varied length."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": " ".join(["a red square"] * (1 + i % 4)) + f" {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- names


def test_brace_patterns_expand_in_order_with_padding():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(UserError):
        expand_braces("s/{x}.tar")


def test_member_names_and_keys_follow_webdataset():
    assert split_key("a/b.c.jpg") == ("a/b", "c.jpg") and split_key("000.PNG") == ("000", "png")
    assert safe_member_name("dir/000.png")
    for bad in ("/etc/passwd", "../x.png", "a/../../x.png", "x\x00.png", "C:/x.png", ""):
        assert not safe_member_name(bad), bad


# ---------------------------------------------------------------- data shard, read back


def test_data_shard_writes_complete_shards_that_read_back_as_the_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", 23)
    run_cli("data", "shard", "--data", folder, "--out", tmp_path / "tars", "--shard-size", 10)
    assert "{00000..00002}.tar" in capsys.readouterr().out
    tars = sorted(p.name for p in (tmp_path / "tars").iterdir() if not p.name.startswith("."))
    assert tars == ["00000.tar", "00001.tar", "00002.tar"]
    report = SkipReport()
    got = list(tar_records(str(tmp_path / "tars" / "{00000..00002}.tar"), "text", report))
    want = list(pair_records(folder, "text", SkipReport()))
    assert [(d, t) for _, d, t in got] == [(p.read_bytes(), t) for _, p, t in want]
    assert report.total == 0
    # a directory of tars is the same source; images decode through the usual reader
    assert [t for _, t in iter_image_text(str(tmp_path / "tars"))] == [t for _, _, t in want]
    assert list(iter_texts([str(tmp_path / "tars")])) == [t for _, _, t in want]
    rc, err = cli_status(capsys, ["data", "shard", "--data", folder, "--out", tmp_path / "tars"])
    assert_one_line_error(rc, err)


def test_a_shard_is_never_visible_half_written(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs", 12)
    from earlyfusion.training.data import shard_cmd
    calls = []

    def failing(tf, name, data):
        calls.append(name)
        if len(calls) == 15:  # inside the second shard
            raise OSError(28, "No space left on device")
        tarfile.TarFile.addfile(tf, _info(name, data), io.BytesIO(data))

    monkeypatch.setattr(shard_cmd, "_member", failing)
    with pytest.raises(OSError):
        shard_cmd.shard_cmd(shard_cmd.ShardConfig(data=str(folder), out=str(tmp_path / "tars"), shard_size=5))
    left = sorted(p.name for p in (tmp_path / "tars").iterdir() if p.name != ".lock")
    assert left == ["00000.tar"]  # the complete first shard only: no second shard, no temporary
    assert len(list(tar_records(str(tmp_path / "tars" / "00000.tar"), "text", SkipReport()))) == 5


def _info(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


# ---------------------------------------------------------------- hostile shards


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    good = png_bytes()
    path = write_tar(tmp_path / "bad.tar", [
        ("000.png", good), ("000.txt", b"fine"),
        ("001.jpg", good), ("001.json", json.dumps({"text": "from json"}).encode()),
        ("/abs/002.png", good),
        ("../003.png", good),
        ("004.txt", b"no image"),
        ("005.png", good), ("005.txt", b"\xff\xfe bad utf8"),
        ("006.png", good), ("006.json", b"{not json"),
        ("007.png", good), ("007.json", json.dumps({"text": 3}).encode()),
        ("008.webp", good),  # no caption: kept, caption None
    ])
    report = SkipReport()
    recs = list(read_tar(path, "text", report))
    assert [(w.rpartition(":")[2], t) for w, _, t in recs] == [("000.png", "fine"), ("001.jpg", "from json"),
                                                               ("008.webp", None)]
    assert dict(report.counts) == {"outside_data_dir": 2, "missing": 1, "bad_utf8": 1, "bad_json": 1, "bad_record": 1}
    with pytest.raises(UserError) as e:
        list(read_tar(path, "text", SkipReport(strict=True)))
    assert "/abs/002.png" in str(e.value)


def test_truncated_shards_are_counted_not_trusted(tmp_path):
    path = write_tar(tmp_path / "whole.tar", [(f"{i:03d}.{ext}", png_bytes(i) if ext == "png" else b"cap %d" % i)
                                              for i in range(4) for ext in ("png", "txt")])
    raw = path.read_bytes()
    members = list(tarfile.open(path))
    # cut inside the third record's image: tarfile fails reading it
    inside = tmp_path / "inside.tar"
    inside.write_bytes(raw[:members[4].offset_data + 100])
    report = SkipReport()
    assert [t for _, _, t in read_tar(inside, "text", report)] == ["cap 0", "cap 1"]
    assert dict(report.counts) == {"truncated": 1}
    # cut on a block boundary (tarfile sees a normal end): the missing end marker tells, the last record is dropped
    blocks = tmp_path / "blocks.tar"
    blocks.write_bytes(raw[:members[5].offset_data + 512])  # through record 2's caption, no end marker
    report = SkipReport()
    assert [t for _, _, t in read_tar(blocks, "text", report)] == ["cap 0", "cap 1"]
    assert dict(report.counts) == {"truncated_shard": 1}
    report = SkipReport()
    assert len(list(read_tar(path, "text", report))) == 4 and report.total == 0
    with pytest.raises(UserError):
        list(read_tar(blocks, "text", SkipReport(strict=True)))


def test_a_missing_shard_of_a_pattern_is_one_line(tmp_path, capsys):
    write_tar(tmp_path / "00000.tar", [("0.png", png_bytes()), ("0.txt", b"x")])
    rc, err = cli_status(capsys, ["vocab", "build", "--image-tokenizer", make_vq(tmp_path / "vq"), "--data",
                                  tmp_path / "{00000..00001}.tar", "--out", tmp_path / "vocab"])
    assert_one_line_error(rc, err)
    assert "00001.tar does not exist" in err


def test_sources_name_the_stream_kinds(tmp_path):
    (tmp_path / "t").mkdir()
    write_tar(tmp_path / "t" / "00000.tar", [("0.png", png_bytes()), ("0.txt", b"x")])
    (spec,) = resolve_sources([str(tmp_path / "t" / "{00000..00000}.tar") + ":0.5"])
    assert (spec.kind, spec.stream, spec.weight) == ("pairs", "tar", 0.5)
    (spec,) = resolve_sources([str(tmp_path / "t")])
    assert spec.stream == "tar"
