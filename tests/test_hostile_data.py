"""Data written by a careless or hostile hand: symbolic links out of the data directory are skipped and counted,
never opened; over-long lines and captions and deeply nested JSON are skipped and counted, never parsed
unbounded; one enormous caption does not hold up `vocab build`; a full disk during `vocab build` is one line."""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli_status
from earlyfusion.cli import main
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.training import data as D
from earlyfusion.training.data import records as R
from earlyfusion.training.data import sources as S
from test_data import make_vocab, make_vq

NESTED = "[" * 100_000  # json.loads raises RecursionError on it, not JSONDecodeError


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> Path:
    return make_vq(tmp_path_factory.mktemp("hostile") / "vq")


def save_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def write_jsonl(path: Path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")


def linked_folder(tmp_path: Path, metadata: bool = True) -> Path:
    """DIR with four images, a link to one of them, a link to a PNG outside DIR and a link to /etc/passwd."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    save_png(outside / "secret.png", 99)
    root = tmp_path / ("meta" if metadata else "plain")
    root.mkdir()
    for i in range(4):
        save_png(root / f"good{i}.png", i)
    os.symlink("good0.png", root / "alias.png")
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink("/etc/passwd", root / "passwd.png")
    if metadata:
        write_jsonl(root / "metadata.jsonl", [{"file_name": f"good{i}.png", "text": f"good {i}"} for i in range(4)]
                    + [{"file_name": n, "text": n.split(".")[0]} for n in ("alias.png", "escape.png", "passwd.png")])
    return root


# ---------------------------------------------------------------- symbolic links


def test_links_out_of_the_folder_are_skipped_and_counted_in_metadata_and_listings(tmp_path):
    for metadata in (True, False):
        root = linked_folder(tmp_path, metadata)
        report = R.SkipReport()
        got = sorted(p.name for _, p, _ in R.pair_records(root, "text", report))
        assert got == ["alias.png", "good0.png", "good1.png", "good2.png", "good3.png"]
        assert dict(report.counts) == {"outside_data_dir": 2}
        # the escape hatch still takes them
        assert len(list(R.pair_records(root, "text", R.SkipReport(), allow_outside=True))) == 7
    with pytest.raises(UserError, match=r"escape.png leads through a symbolic link to .*secret.png, outside"):
        list(R.pair_records(tmp_path / "meta", "text", R.SkipReport(strict=True)))


def test_links_out_of_the_folder_are_never_opened(tmp_path, monkeypatch):
    opened = []
    real_load = S.load_image

    def spy(src, **kw):
        opened.append(Path(src).resolve())
        return real_load(src, **kw)

    monkeypatch.setattr(S, "load_image", spy)
    for metadata in (True, False):
        root = linked_folder(tmp_path, metadata)
        report = R.SkipReport()
        got = list(S.iter_image_text(str(root), report=report))
        assert len(got) == 5 and report.counts["outside_data_dir"] == 2 and report.good == 5
        assert opened and all(p.is_relative_to(root.resolve()) for p in opened)
        opened.clear()


def test_training_data_leaves_out_the_linked_file(tmp_path, vq):
    root = linked_folder(tmp_path)
    vocab = make_vocab([str(root)], vq)
    data = D.prepare(D.DataConfig([str(root)], cache_dir=str(tmp_path / "cache")), vocab, vq, context_len=64)
    (part,) = data.parts
    captions = sorted(vocab.decode_text(c.tolist()) for c in part.captions)
    assert captions == ["alias", "good 0", "good 1", "good 2", "good 3"]
    assert data.report.counts["outside_data_dir"] == 2


def test_interleaved_image_links_out_of_the_folder_are_skipped(tmp_path):
    root = linked_folder(tmp_path)
    doc = root / "interleaved.jsonl"
    write_jsonl(doc, [{"texts": ["x", None], "images": [None, "escape.png"]},
                      {"texts": ["y", None], "images": [None, "passwd.png"]},
                      {"texts": ["z", None], "images": [None, "alias.png"]}])
    report = R.SkipReport()
    got = [segs[1][1] for _, segs in R.interleaved_records(doc, report)]
    assert got == [str(root / "alias.png")] and dict(report.counts) == {"outside_data_dir": 2}


def test_a_metadata_file_linked_from_outside_is_not_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jsonl(outside / "metadata.jsonl", [{"file_name": "a.png", "text": "secret"}])
    root = tmp_path / "data"
    root.mkdir()
    save_png(root / "a.png", 0)
    os.symlink(outside / "metadata.jsonl", root / "metadata.jsonl")
    report = R.SkipReport()
    assert list(R.pair_records(root, "text", report)) == []
    assert dict(report.counts) == {"outside_data_dir": 1}


# ---------------------------------------------------------------- bounded lines and captions


def test_long_lines_and_captions_and_deep_nesting_are_skipped_and_counted(tmp_path, monkeypatch):
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(R.json, "loads", lambda s, *a, **kw: (parsed.append(len(s)), real_loads(s, *a, **kw))[1])
    long_line = json.dumps({"text": "x" * R.MAX_LINE_BYTES})
    root = tmp_path / "data"
    root.mkdir()
    save_png(root / "a.png", 0)
    write_jsonl(root / "metadata.jsonl", [
        {"file_name": "a.png", "text": "fine"},
        {"file_name": "a.png", "text": "y" * R.MAX_TEXT_CHARS},           # at the bound: kept
        {"file_name": "a.png", "text": "y" * (R.MAX_TEXT_CHARS + 1)},     # too_long (caption)
        json.dumps({"file_name": "a.png", "text": "z" * R.MAX_LINE_BYTES}),  # too_long (line)
        NESTED,                                                          # bad_json
    ])
    report = R.SkipReport()
    assert [len(t) for _, _, t in R.pair_records(root, "text", report)] == [4, R.MAX_TEXT_CHARS]
    assert dict(report.counts) == {"too_long": 2, "bad_json": 1}

    inter = tmp_path / "interleaved.jsonl"
    write_jsonl(inter, [NESTED, long_line, {"texts": ["ok", None], "images": [None, "data/a.png"]}])
    report = R.SkipReport()
    assert len(list(R.interleaved_records(inter, report))) == 1
    assert dict(report.counts) == {"bad_json": 1, "too_long": 1}

    text = tmp_path / "text.jsonl"
    write_jsonl(text, [NESTED, long_line, '{"text": ' + "1" * 5000 + "}", {"text": "ok"}])
    report = R.SkipReport()
    assert [t for _, t in R.text_records(text, report)] == ["ok"]
    assert dict(report.counts) == {"bad_json": 2, "too_long": 1}
    # the kind of a .jsonl is read past such lines too
    assert R.jsonl_kind(text) == "text" and R.jsonl_kind(inter) == "interleaved"

    txt = tmp_path / "text.txt"
    txt.write_text("a" * (R.MAX_LINE_BYTES + 1) + "\nok\n")
    report = R.SkipReport()
    assert [t for _, t in R.text_records(txt, report)] == ["ok"]
    assert dict(report.counts) == {"too_long": 1}

    assert parsed and max(parsed) <= R.MAX_LINE_BYTES  # the over-long lines were never handed to the parser


def test_long_csv_captions_are_skipped_and_counted(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    save_png(root / "a.png", 0)
    # csv refuses a field over 128 Ki characters itself; a longer caption is counted the same way
    (root / "metadata.csv").write_text("file_name,text\n" + f"a.png,\"{'y' * (R.MAX_TEXT_CHARS + 1)}\"\n"
                                       + f"a.png,\"{'z' * 200_000}\"\n" + "a.png,fine\n", encoding="utf-8")
    report = R.SkipReport()
    got = list(R.pair_records(root, "text", report))
    assert [t for _, _, t in got] == ["fine"] and got[0][0].startswith(f"{root / 'metadata.csv'}:4")
    assert dict(report.counts) == {"too_long": 2}


def test_one_endless_line_is_read_in_bounded_memory(tmp_path):
    p = tmp_path / "one.jsonl"
    with open(p, "wb") as f:
        for _ in range(16):
            f.write(b"[" * (1 << 20))
        f.write(b'\n{"text": "after"}\n')
    report = R.SkipReport()
    assert [t for _, t in R.text_records(p, report)] == ["after"]
    assert dict(report.counts) == {"too_long": 1} and report.examples["too_long"] == [f"{p}:1"]


# ---------------------------------------------------------------- vocab build


def test_vocab_build_skips_an_enormous_caption_quickly(tmp_path, vq, capsys):
    root = tmp_path / "data"
    root.mkdir()
    save_png(root / "a.png", 0)
    rows = [{"file_name": "a.png", "text": f"a red square number {i}"} for i in range(30)]
    rows.append({"file_name": "a.png", "text": "q" * 5_000_000})  # over the line bound
    write_jsonl(root / "metadata.jsonl", rows)
    # within the line bound but over the text bound: the BPE trainer alone would take minutes on it
    (root / "text.txt").write_text("a blue circle\n" + "ab" * 250_000 + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    rc, err = cli_status(capsys, ["vocab", "build", "--image-tokenizer", vq, "--data", root, "--out",
                                  tmp_path / "vocab", "--text-vocab-size", 300])
    assert rc == 0, err
    assert time.perf_counter() - t0 < 60
    assert Vocabulary.load(tmp_path / "vocab").layout.text_vocab_size > 0
    report = R.SkipReport()
    texts = list(D.iter_texts([str(root)], report=report))
    assert len(texts) == 31 and max(map(len, texts)) < R.MAX_TEXT_CHARS
    assert dict(report.counts) == {"too_long": 2}


def test_vocab_build_strict_on_deep_nesting_is_one_line(tmp_path, vq, capsys):
    root = tmp_path / "data"
    root.mkdir()
    save_png(root / "a.png", 0)
    write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": "fine"}, NESTED])
    argv = ["vocab", "build", "--image-tokenizer", vq, "--data", root, "--out", tmp_path / "vocab"]
    rc, err = cli_status(capsys, [*argv, "--strict"])
    assert_one_line_error(rc, err)
    assert "metadata.jsonl:2" in err and "nested too deeply" in err


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device", "v/tokenizer.json"),
                                     Exception("No space left on device (os error 28)")])
def test_vocab_build_disk_full_is_one_line_about_the_vocabulary(tmp_path, vq, capsys, monkeypatch, failure):
    root = tmp_path / "data"
    root.mkdir()
    save_png(root / "a.png", 0)
    write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": f"caption {i}"} for i in range(5)])

    def full(self, directory):
        raise failure

    monkeypatch.setattr(Vocabulary, "save", full)
    rc, err = cli_status(capsys, ["vocab", "build", "--image-tokenizer", vq, "--data", root, "--out",
                                  tmp_path / "vocab"])
    assert_one_line_error(rc, err)
    assert "No space left on device" in err and "vocab build again" in err
    assert "checkpoint" not in err and "--resume" not in err
    assert not (tmp_path / "vocab").exists()


def test_report_counts_every_reason_once(tmp_path):
    """The counts of the readers add up: every record considered is either good or counted by one reason."""
    root = linked_folder(tmp_path)
    with open(root / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(NESTED + "\n" + json.dumps({"file_name": "good1.png", "text": "w" * (R.MAX_TEXT_CHARS + 1)}) + "\n")
    report = R.SkipReport()
    got = list(R.pair_records(root, "text", report))
    report.ok(len(got))
    assert Counter(report.counts) == Counter({"outside_data_dir": 2, "bad_json": 1, "too_long": 1})
    assert report.good == 5 and report.records == 9


def test_tokenizer_and_vocabulary_commands_take_linked_files_only_when_allowed(tmp_path, capsys):
    """A hub download folder's files link into a shared cache: `tokenizer train`, `tokenizer eval` and `vocab build`
    leave them out by default and read them with --allow-outside-paths."""
    root = linked_folder(tmp_path)
    (root / "passwd.png").unlink()  # a link to a file that is not an image: not what this test is about
    report = R.SkipReport()
    assert len(list(S.iter_image_text(str(root), report=report))) == 5 and report.counts["outside_data_dir"] == 1
    assert len(list(S.iter_image_text(str(root), report=R.SkipReport(), allow_outside=True))) == 6
    texts = list(S.iter_texts([str(root)], R.SkipReport()))
    assert "escape" not in texts and "escape" in list(S.iter_texts([str(root)], R.SkipReport(), allow_outside=True))
    for command in (("tokenizer", "train"), ("tokenizer", "eval"), ("vocab", "build")):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "--allow-outside-paths" in capsys.readouterr().out
