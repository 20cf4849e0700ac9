"""Files a user hands us that are damaged, or options past what a machine can hold: each is refused with one line
that names the file or option, never a traceback and never trusted silently.

* a vocabulary is checked against its MANIFEST.json on every load (and refused without one), in `train`,
  `sample` and `eval` alike; `vocab build` and `import chameleon` write the manifest;
* `train --resume` checks the run's own copies of its vocabulary and image tokenizer;
* a codebook or step count too large to hold, a 1x1 code grid, a seed `train` would refuse;
* a decoder command given an image tokenizer run; deeply nested JSON in metrics.jsonl or any JSON file;
* a vqgan.ckpt that is not a PyTorch checkpoint is called that, not "truncated";
* `eval` holds a lock on the directory it writes into.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TinyPipeline, assert_one_line_error, cli_status, tiny_train_argv
from earlyfusion.core.checkpoint import MANIFEST, CheckpointError, load_json, write_manifest
from earlyfusion.core.rundir import IMAGE_TOKENIZER_DIR, METRICS, VOCAB_DIR, WEIGHTS, run_lock
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.tokenizer.vocab_layout import LAYOUT_FILE, TOKENIZER_FILE
from earlyfusion.tokenizer.vqgan import CKPT
from earlyfusion.tokenizer.vqgan_import import read_meta_state
from earlyfusion.training.trainer import metrics_file

DEEP = "[" * 100000  # json recurses once per level: this exhausts Python's stack


def one_error(rc: int, err: str, *words) -> str:
    """Exit 2, no traceback, exactly one `earlyfusion: error:` line (log lines before it allowed) naming ``words``."""
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("earlyfusion: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert str(w) in lines[0], f"{w!r} not in: {lines[0]}"
    return lines[0]


def swap_two_ids(vocab_dir: Path) -> None:
    """Swap the ids of two text tokens in tokenizer.json: the file still parses and agrees with layout.json."""
    path = vocab_dir / TOKENIZER_FILE
    d = json.loads(path.read_text(encoding="utf-8"))
    vocab = d["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[100], by_id[101]
    vocab[a], vocab[b] = 101, 100
    path.write_text(json.dumps(d), encoding="utf-8")


@pytest.fixture()
def run_copy(tiny_pipeline: TinyPipeline, tmp_path) -> Path:
    out = tmp_path / "lm"
    shutil.copytree(tiny_pipeline.lm, out)
    return out


# ---------------------------------------------------------------- A: the vocabulary's manifest


def test_vocab_build_writes_a_manifest_of_its_files(tiny_pipeline: TinyPipeline, tmp_path):
    files = load_json(tiny_pipeline.vocab / MANIFEST)["files"]
    assert {TOKENIZER_FILE, LAYOUT_FILE} <= set(files)
    d = tmp_path / "v"
    shutil.copytree(tiny_pipeline.vocab, d)
    swap_two_ids(d)
    with pytest.raises(CheckpointError) as e:
        Vocabulary.load(d)
    assert str(d / TOKENIZER_FILE) in str(e.value) and "earlyfusion vocab build" in str(e.value)
    # without its manifest the swap would go unnoticed: a vocabulary without one is refused, saying how to rebuild it
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError) as e:
        Vocabulary.load(d)
    assert MANIFEST in str(e.value) and "run `earlyfusion vocab build` again" in str(e.value)
    # a manifest that lists neither file checks nothing: refused as well
    write_manifest(d, ["tokenizer_config.json"])
    with pytest.raises(CheckpointError, match="not listed"):
        Vocabulary.load(d)
    (d / MANIFEST).write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(CheckpointError, match=MANIFEST):
        Vocabulary.load(d)


@pytest.mark.parametrize("manifest", ["kept", "removed"])
def test_swapped_ids_are_refused_by_train_sample_and_eval(capsys, tiny_pipeline: TinyPipeline, tmp_path, run_copy,
                                                          manifest):
    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_pipeline.vocab, vocab)
    for d in (vocab, run_copy / VOCAB_DIR):
        swap_two_ids(d)
        if manifest == "removed":
            (d / MANIFEST).unlink()
    named = TOKENIZER_FILE if manifest == "kept" else MANIFEST
    argv = tiny_train_argv(tiny_pipeline, tmp_path / "new", 4)
    argv[argv.index("--vocab") + 1] = vocab
    rc, err = cli_status(capsys, argv)
    one_error(rc, err, vocab / named, "earlyfusion vocab build")
    rc, err = cli_status(capsys, ["sample", "--checkpoint", run_copy, "--prompt", "a", "--modality", "text"])
    one_error(rc, err, run_copy / VOCAB_DIR / named)
    rc, err = cli_status(capsys, ["eval", "--checkpoint", run_copy, "--data", tiny_pipeline.data])
    one_error(rc, err, run_copy / VOCAB_DIR / named)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["truncated", "not json", "deep"])
def test_tokenizer_json_that_tokenizers_cannot_parse_is_one_line(capsys, tiny_pipeline: TinyPipeline, tmp_path,
                                                                 damage):
    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_pipeline.vocab, vocab)
    raw = (vocab / TOKENIZER_FILE).read_text(encoding="utf-8")
    text = {"truncated": raw[: len(raw) // 2], "not json": "tokenizer\x00", "deep": DEEP}[damage]
    (vocab / TOKENIZER_FILE).write_text(text, encoding="utf-8")
    write_manifest(vocab)  # as if the file had been written so: only the parse can catch it
    argv = tiny_train_argv(tiny_pipeline, tmp_path / "new", 4)
    argv[argv.index("--vocab") + 1] = vocab
    rc, err = cli_status(capsys, argv)
    one_error(rc, err, vocab / TOKENIZER_FILE, "tokenizers")


def test_deep_layout_json_is_one_line(capsys, tiny_pipeline: TinyPipeline, tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_pipeline.vocab, vocab)
    (vocab / LAYOUT_FILE).write_text(DEEP, encoding="utf-8")
    write_manifest(vocab)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Vocabulary.load(vocab)


# ---------------------------------------------------------------- B: --resume checks the run's own copies


def _resume_argv(p: TinyPipeline, out: Path) -> list:
    return tiny_train_argv(p, out, 16, "--resume")


@pytest.mark.parametrize("where", ["vocab", "image_tokenizer", "no manifest"])
def test_resume_refuses_a_damaged_copy(capsys, tiny_pipeline: TinyPipeline, run_copy, where):
    if where == "vocab":
        swap_two_ids(run_copy / VOCAB_DIR)
        named = run_copy / VOCAB_DIR / TOKENIZER_FILE
    elif where == "image_tokenizer":
        weights = run_copy / IMAGE_TOKENIZER_DIR / WEIGHTS
        raw = bytearray(weights.read_bytes())
        raw[-1] ^= 0xFF  # one weight changed: same size, same header
        weights.write_bytes(bytes(raw))
        named = weights
    else:
        (run_copy / IMAGE_TOKENIZER_DIR / MANIFEST).unlink()
        named = run_copy / IMAGE_TOKENIZER_DIR / MANIFEST
    steps_before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    rc, err = cli_status(capsys, _resume_argv(tiny_pipeline, run_copy))
    one_error(rc, err, named, "--out")
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == steps_before


# ---------------------------------------------------------------- C: tracebacks


@pytest.mark.parametrize("extra, flag", [
    (["--codebook-size", "10000000000"], "--codebook-size"),
    (["--set", "codebook_size=10000000000"], "codebook_size"),
    (["--quantizer", "fsq", "--fsq-levels", "1000,1000,1000"], "fsq_levels"),
    (["--set", "latent_dim=100000000"], "latent_dim"),
    (["--width", "100000000"], "channels"),
    (["--image-size", "4"], "2x2"),
    (["--steps", "99999999999999999999999"], "--steps"),
    (["--sheet-every", "99999999999999999999999"], "--sheet-every"),
])
def test_tokenizer_train_options_beyond_a_machine(capsys, tiny_pipeline: TinyPipeline, tmp_path, extra, flag):
    out = tmp_path / "vq"
    rc, err = cli_status(capsys, ["tokenizer", "train", "--data", tiny_pipeline.data, "--out", out, "--preset", "tiny",
                                  *extra])
    assert_one_line_error(rc, err)
    assert flag in err
    assert not out.exists()


@pytest.mark.parametrize("extra, flag", [
    (["--steps", "99999999999999999999999"], "--steps"),
    (["--warmup-steps", str(10 ** 12)], "--warmup-steps"),
    (["--eval-every", str(10 ** 12)], "--eval-every"),
    (["--seed", "-5"], "--seed"),
])
def test_train_options_beyond_a_machine(capsys, tiny_pipeline: TinyPipeline, tmp_path, extra, flag):
    argv = tiny_train_argv(tiny_pipeline, tmp_path / "lm", 4)
    for k in range(0, len(extra), 2):  # replace the option where the base command gives it
        if extra[k] in argv:
            argv[argv.index(extra[k]) + 1] = extra[k + 1]
        else:
            argv += extra[k:k + 2]
    rc, err = cli_status(capsys, argv)
    assert_one_line_error(rc, err)
    assert flag in err


def test_sample_takes_the_seeds_train_takes(capsys, tiny_pipeline: TinyPipeline, tmp_path):
    for seed in ("-5", str(2 ** 40)):
        rc, err = cli_status(capsys, ["sample", "--checkpoint", tiny_pipeline.lm, "--prompt", "a", "--seed", seed])
        assert_one_line_error(rc, err)
        assert "--seed" in err


def test_decoder_commands_given_an_image_tokenizer(capsys, tiny_pipeline: TinyPipeline, tmp_path):
    vq = tiny_pipeline.vq
    step = sorted((vq / "checkpoints").iterdir())[-1]
    for given in (vq, step):
        rc, err = cli_status(capsys, ["export", "--checkpoint", given, "--out", tmp_path / "hf"])
        one_error(rc, err, given, "image tokenizer", "earlyfusion train")
        rc, err = cli_status(capsys, ["sample", "--checkpoint", given, "--prompt", "a", "--modality", "text"])
        one_error(rc, err, given, "image tokenizer")
        rc, err = cli_status(capsys, ["eval", "--checkpoint", given, "--data", tiny_pipeline.data,
                                      "--out", tmp_path / "eval"])
        one_error(rc, err, given, "image tokenizer")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()


def test_deeply_nested_json_files(tmp_path):
    """load_json (every JSON file of a run, a vocabulary, an image tokenizer) and the metrics cut of --resume."""
    for text in (DEEP, "1" * 5000):  # too deep for the stack; more digits than Python converts to an int
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(CheckpointError, match="x.json"):
            load_json(tmp_path / "x.json")
    run = tmp_path / "run"
    run.mkdir()
    good = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (run / METRICS).write_text("\n".join([good[0], DEEP, good[1], "9" * 5000, good[2]]) + "\n")
    metrics_file(run, 2)
    assert (run / METRICS).read_text().splitlines() == good[:2]


def test_resume_over_a_deeply_nested_metrics_line(capsys, tiny_pipeline: TinyPipeline, run_copy):
    with open(run_copy / METRICS, "a", encoding="utf-8") as f:
        f.write(DEEP + "\n")
    rc, err = cli_status(capsys, _resume_argv(tiny_pipeline, run_copy))
    assert rc == 0 and "Traceback" not in err, err
    steps = [json.loads(line).get("step") for line in (run_copy / METRICS).read_text().splitlines()]
    assert steps and max(steps) == 16


# ---------------------------------------------------------------- D: a vqgan.ckpt described truthfully


def _meta_dir(tmp_path: Path, content: bytes) -> Path:
    src = tmp_path / "meta"
    src.mkdir(exist_ok=True)
    (src / CKPT).write_bytes(content)
    return src


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content, words, not_words", [
    (pickle.dumps({"a": object()}), ["not a PyTorch checkpoint", "pickle"], ["truncated"]),
    (pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=2), ["not a PyTorch checkpoint", "pickle"], ["truncated"]),
    (b"PK\x03\x04" + os.urandom(64), ["truncated or corrupted"], ["non-tensor"]),
    (_torch_saved({"state_dict": {"w": torch.zeros(64)}})[:300], ["truncated or corrupted"], ["non-tensor"]),
    (_torch_saved({"layer": torch.nn.Linear(2, 2)}), ["non-tensor object", "torch.nn"], ["truncated"]),
    (b"", ["empty"], []),
])
def test_vqgan_ckpt_that_cannot_be_read(tmp_path, content, words, not_words):
    src = _meta_dir(tmp_path, content)
    with pytest.raises(Exception) as e:
        read_meta_state(src)
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) or "non-tensor" in msg, (type(e.value), msg)
    assert str(src / CKPT) in msg and len(msg.splitlines()) == 1
    for w in words:
        assert w in msg, msg
    for w in not_words:
        assert w not in msg, msg


def test_random_bytes_are_not_called_a_checkpoint(tmp_path):
    src = _meta_dir(tmp_path, b"\x00" + os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_meta_state(src)


# ---------------------------------------------------------------- eval's lock


def test_eval_holds_a_lock_on_its_output_directory(capsys, tiny_pipeline: TinyPipeline, tmp_path):
    out = tmp_path / "figures"
    with run_lock(out, "another eval"):
        rc, err = cli_status(capsys, ["eval", "--checkpoint", tiny_pipeline.lm, "--data", tiny_pipeline.data,
                                      "--out", out, "--limit", 2])
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written beside the holder's files
    one_error(rc, err, out, "in use", "another eval")


def test_manifests_and_headers_of_the_wrong_shape_are_one_error(tmp_path):
    """A manifest that is JSON but not a list of sizes and checksums, and a safetensors header nested too deeply, are
    CheckpointErrors (one line at the CLI), never a KeyError or RecursionError."""
    import torch

    from earlyfusion.core.checkpoint import CheckpointError, latest_good, load_weights, verify_dir

    step = tmp_path / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    for bad in ("[1, 2]", '{"files": {"a": {"size": "x"}}}', '{"files": {"a": {}}}'):
        (step / "MANIFEST.json").write_text(bad)
        with pytest.raises(CheckpointError, match="not a list of file sizes"):
            verify_dir(step)
        assert latest_good(tmp_path / "checkpoints") is None
    header = b"[" * 50000
    f = tmp_path / "deep.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_weights(f, torch.nn.Linear(2, 2))


def test_photo_judge_reads_only_inside_its_split(tmp_path):
    """The photograph judge reads a split by the data rules: a metadata row naming a file outside the split through a
    link is skipped, not opened."""
    from PIL import Image

    from earlyfusion.photo_judge import load_split

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "red").save(outside)
    split = tmp_path / "data" / "test"
    split.mkdir(parents=True)
    Image.new("RGB", (8, 8), "blue").save(split / "in.png")
    (split / "link.png").symlink_to(outside)
    (split / "metadata.jsonl").write_text('{"file_name": "in.png", "text": "a crop of the coins photograph"}\n'
                                          '{"file_name": "link.png", "text": "a crop of the coins photograph"}\n'
                                          + "[" * 100000 + "\n")
    images, labels, skipped = load_split(split, {"coins": "a crop of the coins photograph"}, 8)
    assert labels == ["coins"] and images.shape == (1, 3, 8, 8) and skipped == 2
