"""A run directory has one writer: a second command writing into it is refused while the first runs (two real
processes), a dead holder's lock is taken over, and a directory holding anything of another run is refused unless
--resume continues it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from earlyfusion.core.errors import UserError
from earlyfusion.core.rundir import LOCK, check_fresh, run_lock
from conftest import TinyPipeline, assert_one_line_error, cli_status, run_cli, tiny_train_argv

HOLD = """
import sys, time
from earlyfusion.core.rundir import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        with pytest.raises(UserError, match=rf"in use by process {p.pid} \(test holder"):
            with run_lock(out, "second"):
                pass
    finally:
        p.kill()
        p.wait()
    with run_lock(out, "after a kill"):  # the kernel released the dead holder's lock: taken over
        assert f"process {os.getpid()}" in (out / LOCK).read_text()


def test_two_train_commands_into_one_directory(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    """A real `earlyfusion train` holds its --out: a second one started meanwhile exits 2 with one line."""
    out = tmp_path / "lm"
    argv = [str(a) for a in tiny_train_argv(tiny_pipeline, out, 100000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "earlyfusion", *argv], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK).is_file() and (out / LOCK).read_text().strip()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 4))
        assert_one_line_error(rc, err)
        assert f"in use by process {first.pid}" in err
        rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 4, "--resume"))
        assert_one_line_error(rc, err)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_leftovers_of_another_run_are_refused_unless_resumed(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    """A run directory that kept only its best model and final.json (its step checkpoints deleted) is still a run."""
    out = tmp_path / "lm"
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4))
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    (out / "final.json").write_text('{"checkpoint": "best"}')
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, out, 4, "--seed", 3))
    assert_one_line_error(rc, err)
    assert "already holds a run" in err and "--resume" in err
    run_cli(*tiny_train_argv(tiny_pipeline, out, 4, "--resume"))  # nothing to resume from: starts, as asked


def test_tokenizer_directory_without_checkpoints_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "vq"
    out.mkdir()
    (out / "config.json").write_text("{}")
    rc, err = cli_status(capsys, ["tokenizer", "train", "--data", tmp_path / "nodata", "--out", out, "--preset", "tiny"])
    assert_one_line_error(rc, err)
    assert (out / "config.json").read_text() == "{}"


def test_check_fresh(tmp_path):
    check_fresh(tmp_path / "new", resume=False)
    (tmp_path / "empty").mkdir()
    check_fresh(tmp_path / "empty", resume=False)
    (tmp_path / "empty" / LOCK).write_text("")
    check_fresh(tmp_path / "empty", resume=False)  # a lock alone is no run
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        check_fresh(tmp_path / "empty", resume=False)
    check_fresh(tmp_path / "empty", resume=True)


def test_split_names_must_exist_and_training_data_is_not_the_validation_data(tiny_pipeline: TinyPipeline, tmp_path,
                                                                              capsys):
    for extra, words in ((["--split", "nosuch"], "no 'nosuch' split"),
                         (["--split", "val"], "--split val is also the split"),
                         (["--val-split", "nosuch"], "no 'nosuch' split")):
        rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, tmp_path / extra[1], 2, *extra))
        assert_one_line_error(rc, err)
        assert words in err, err
    # named on purpose: allowed, with a warning
    run_cli(*tiny_train_argv(tiny_pipeline, tmp_path / "asked", 2, "--split", "val", "--val-split", "val"))
    assert "chosen on training data" in capsys.readouterr().err


def test_a_directory_made_for_the_lock_goes_when_nothing_was_written(tmp_path):
    """A command that fails before writing anything leaves no empty run directory behind; one that existed stays."""
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "new", "failing"):
            raise RuntimeError("failed")
    assert not (tmp_path / "new").exists()
    with run_lock(tmp_path / "written", "writing"):
        (tmp_path / "written" / "result.json").write_text("{}")
    assert (tmp_path / "written" / "result.json").is_file()
    (tmp_path / "kept").mkdir()
    with run_lock(tmp_path / "kept", "nothing"):
        pass
    assert (tmp_path / "kept").is_dir()
