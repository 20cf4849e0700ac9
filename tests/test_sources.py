"""Reading image-text sources: every good record comes through, every bad one is counted by reason."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.training.data import SkipReport, iter_dataset, iter_image_text


def craft_png(width: int, height: int) -> bytes:
    """A ~100-byte 1-bit PNG whose header claims width x height (a decompression bomb when huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))

N_GOOD_PNG = 12


def make_bad_corpus(root):
    """An imagefolder with good images and one record of every bad kind. Returns (good texts, bad reasons)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines: list[bytes] = []
    good: list[str] = []

    def row(name, text):
        lines.append(json.dumps({"file_name": name, "text": text}).encode())

    for i in range(N_GOOD_PNG):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / f"good{i}.png")
        row(f"good{i}.png", f"good {i}")
        good.append(f"good {i}")
    # good but unusual: CMYK JPEG, 16-bit PNG, a 4000x4000 photo, an image in a sub-folder
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    row("cmyk.jpg", "cmyk")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "sixteen.png")
    row("sixteen.png", "sixteen")
    Image.new("L", (4000, 4000), 90).save(root / "huge.png")
    row("huge.png", "huge")
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "sub" / "nested.png")
    row("sub/nested.png", "nested")
    good += ["cmyk", "sixteen", "huge", "nested"]
    # bad images
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (root / "trunc.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    row("trunc.png", "truncated")
    (root / "zero.png").write_bytes(b"")
    row("zero.png", "zero")
    (root / "text.png").write_text("I am text\n")
    row("text.png", "text")
    (root / "bomb.png").write_bytes(craft_png(40000, 40000))
    row("bomb.png", "bomb")
    row("gone.png", "missing image")
    # bad metadata lines
    lines.append(b'{"file_name": "good0.png", "text": "oops"')              # malformed JSON
    lines.append(b'{"file_name": "good1.png", "text": "caf\xe9 \xff"}')     # invalid UTF-8
    lines.append(b'{"text": "no file name"}')                               # no file_name
    lines.append(b"")                                                         # blank line: not a record
    (root / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # BOM, CRLF: fine
    bad = {"truncated": 1, "empty_file": 1, "not_an_image": 1, "too_large": 1, "missing": 1,
           "bad_json": 1, "bad_utf8": 1, "bad_record": 1}
    return good, bad


def test_bad_corpus_counts_every_record(tmp_path):
    good, bad = make_bad_corpus(tmp_path / "data")
    report = SkipReport()
    out = list(iter_image_text(str(tmp_path / "data"), report=report, shrink_to=32))
    assert sorted(t for _, t in out) == sorted(good)  # every good record, exactly once
    assert all(img.mode == "RGB" for img, _ in out)
    assert dict(report.counts) == bad
    assert report.total == sum(bad.values()) and report.records == len(good) + report.total
    s = report.summary()
    assert s.startswith(f"skipped {report.total} of {report.records} records: ") and "1 bad_json" in s
    d = report.as_dict()
    assert d["by_reason"] == bad and "metadata.jsonl:" in d["examples"]["bad_json"][0]
    cmyk = dict((t, img) for img, t in out)["cmyk"]
    assert cmyk.getpixel((8, 8))[0] > 230


def test_strict_names_file_and_line(tmp_path):
    make_bad_corpus(tmp_path / "data")
    with pytest.raises(UserError, match=r"metadata\.jsonl:17 \(trunc\.png\).*truncated.*--strict"):
        list(iter_image_text(str(tmp_path / "data"), strict=True, shrink_to=32))


def test_splits_and_folder_without_metadata(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "d" / split).mkdir(parents=True)
        for i in range(3 if split == "train" else 2):
            Image.new("RGB", (6, 6), (i, 0, 0)).save(tmp_path / "d" / split / f"{i}.png")
    (tmp_path / "d" / "train" / "notes.txt").write_text("not listed, not an image extension")
    (tmp_path / "d" / "train" / "fake.jpg").write_text("text with an image extension")
    report = SkipReport()
    train = list(iter_image_text(str(tmp_path / "d"), report=report))
    assert len(train) == 3 and all(t is None for _, t in train)
    assert dict(report.counts) == {"not_an_image": 1}
    assert len(list(iter_image_text(str(tmp_path / "d"), split="test"))) == 2
    assert len(list(iter_image_text(str(tmp_path / "d" / "test")))) == 2
    with pytest.raises(UserError, match="no 'validation' split"):
        list(iter_image_text(str(tmp_path / "d"), split="validation"))


def test_shapes_output_reads_back(tmp_path):
    from earlyfusion.training.shapes import parse_caption
    from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd
    from earlyfusion.training.shapes_judge import recognise

    generate_cmd(ShapesConfig(out=str(tmp_path / "s"), num_images=15, num_interleaved=1, num_text=1))
    rows = list(iter_image_text(str(tmp_path / "s"), split="test"))
    assert len(rows) == 2 and all(recognise(img) == parse_caption(t) for img, t in rows)


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list(iter_image_text(str(tmp_path / "empty")))
    with pytest.raises(UserError, match="no such directory"):
        list(iter_image_text(str(tmp_path / "nope")))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        list(iter_image_text(str(tmp_path / "f.txt")))
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of its 1 records"):
        list(iter_image_text(str(tmp_path / "allbad")))


def test_datasets_rows_decoded_by_load_image():
    """The hub path, on an in-memory datasets.Dataset: bad image bytes are counted, not fatal."""
    datasets = pytest.importorskip("datasets")
    good = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(good, "PNG")
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"junk", "path": None},
                 {"bytes": good.getvalue()[:40], "path": None}],
         "caption": ["ok", "junk", "cut"]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))
    report = SkipReport()
    out = list(iter_dataset(ds, "img", "caption", report, "hub"))
    assert [t for _, t in out] == ["ok"] and out[0][0].getpixel((0, 0)) == (255, 255, 255)
    assert dict(report.counts) == {"not_an_image": 1, "truncated": 1}
    with pytest.raises(UserError, match="no image column 'image'"):
        list(iter_dataset(ds, "image", "caption", SkipReport(), "hub"))


def test_report_update_and_summary():
    a, b = SkipReport(), SkipReport()
    a.ok(5)
    a.add("truncated", "x:1")
    b.add("truncated", "y:2")
    b.add("bad_json", "y:3")
    a.update(b)
    assert a.summary() == "skipped 3 of 8 records: 2 truncated, 1 bad_json"
    assert SkipReport().summary() == "skipped 0 of 0 records"


def test_paths_outside_the_data_directory_are_skipped(tmp_path):
    """A metadata file_name or an interleaved image path that leaves the data directory (absolute, '..') is never
    opened: skipped and counted, unless the user allows it."""
    from earlyfusion.training.data.records import interleaved_records, pair_records

    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    rows = [{"file_name": "ok.png", "text": "a"}, {"file_name": str(outside), "text": "b"},
            {"file_name": "../secret.png", "text": "c"}, {"file_name": "/etc/hostname", "text": "d"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = SkipReport()
    got = list(pair_records(root, "text", report))
    assert [p.name for _, p, _ in got] == ["ok.png"]
    assert report.counts["outside_data_dir"] == 3
    assert len(list(pair_records(root, "text", SkipReport(), allow_outside=True))) == 4
    doc = root / "docs.jsonl"
    doc.write_text(json.dumps({"texts": ["x", None], "images": [None, "../secret.png"]}) + "\n"
                   + json.dumps({"texts": ["y", None], "images": [None, "ok.png"]}) + "\n")
    report = SkipReport()
    assert [segs[1][1] for _, segs in interleaved_records(doc, report)] == [str(root / "ok.png")]
    assert report.counts["outside_data_dir"] == 1
    with pytest.raises(UserError, match="outside"):
        list(pair_records(root, "text", SkipReport(strict=True)))
