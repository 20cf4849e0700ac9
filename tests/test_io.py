"""Checkpoint IO: crash-safe directories, corruption detection, fallback, state without pickle."""

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from earlyfusion.core.checkpoint import (
    CheckpointError, atomic_dir, latest_good, load_state, load_weights, prune, save_json, save_state,
    save_weights, step_dir, step_dirs, verify_dir,
)

REPO = Path(__file__).resolve().parents[1]


def _write_ckpt(root: Path, step: int, value: float) -> Path:
    d = step_dir(root, step)
    with atomic_dir(d) as tmp:
        save_weights(tmp / "model.safetensors", {"w": torch.full((64, 64), value)})
        save_json(tmp / "config.json", {"step": step})
    return d


def test_atomic_dir_writes_manifest_and_verifies(tmp_path):
    d = _write_ckpt(tmp_path, 10, 1.0)
    assert (d / "MANIFEST.json").is_file()
    verify_dir(d)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000010"]


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    good = _write_ckpt(tmp_path, 10, 1.0)
    with pytest.raises(RuntimeError):
        with atomic_dir(step_dir(tmp_path, 20)) as tmp:
            save_weights(tmp / "model.safetensors", {"w": torch.zeros(3)})
            raise RuntimeError("killed mid-write")
    assert step_dirs(tmp_path) == [good]
    assert latest_good(tmp_path) == good


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    """Kill a writer process while it writes a large checkpoint; the old one stays complete."""
    _write_ckpt(tmp_path, 10, 1.0)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from earlyfusion.core.checkpoint import atomic_dir, save_weights, step_dir
        from pathlib import Path
        with atomic_dir(step_dir(Path({str(tmp_path)!r}), 20)) as tmp:
            print("writing", flush=True)
            for i in range(200):
                save_weights(tmp / f"part{{i}}.safetensors", {{"w": torch.randn(256, 256)}})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    good = latest_good(tmp_path)
    assert good is not None and good.name == "step-00000010"
    verify_dir(good)
    prune(tmp_path, keep=2)  # clears the torn temporary directory
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_truncated_weights_detected_and_fallback(tmp_path):
    old = _write_ckpt(tmp_path, 10, 1.0)
    new = _write_ckpt(tmp_path, 20, 2.0)
    f = new / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_dir(new)
    assert latest_good(tmp_path) == old


def test_corrupted_byte_detected(tmp_path):
    d = _write_ckpt(tmp_path, 10, 1.0)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        verify_dir(d)


def test_truncated_safetensors_load_names_file(tmp_path):
    f = tmp_path / "model.safetensors"
    save_weights(f, {"weight": torch.zeros(4, 4)})
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=str(f.name)):
        load_weights(f, torch.nn.Linear(4, 4, bias=False))


def test_strict_load_reports_mismatch(tmp_path):
    f = tmp_path / "model.safetensors"
    save_weights(f, torch.nn.Linear(4, 3).state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(f, torch.nn.Linear(4, 5))
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(f, torch.nn.Sequential(torch.nn.Linear(4, 3)))


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _write_ckpt(tmp_path, s, float(s))
    prune(tmp_path, keep=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000004", "step-00000003"]


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        model(torch.randn(2, 5)).sum().backward()
        opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 3, "data": {"epoch": 1, "cursor": [1, 2]}}
    save_state(tmp_path, "state", state)
    back = load_state(tmp_path, "state")
    opt2 = torch.optim.AdamW(torch.nn.Linear(5, 3).parameters(), lr=1e-3, betas=(0.9, 0.95))
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
    assert torch.equal(back["rng"], state["rng"]) and back["step"] == 3 and back["data"] == state["data"]


def test_no_pickle_in_load_paths():
    """No torch.load without weights_only=True, and no pickle module, anywhere in the package code."""
    offenders = []
    for pkg in ("tokenizer", "model", "training", "sampling"):
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords):
                        offenders.append(f"{path}:{node.lineno} torch.load without weights_only=True")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                    if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                        offenders.append(f"{path}:{node.lineno} imports pickle")
    assert not offenders, "\n".join(offenders)


def test_prune_never_keeps_a_corrupted_checkpoint_over_a_good_one(tmp_path):
    for s in (1, 2, 3):
        _write_ckpt(tmp_path, s, float(s))
    (step_dir(tmp_path, 3) / "model.safetensors").write_bytes(b"\0" * 10)
    prune(tmp_path, keep=1)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-00000002"]  # the newest good one stays
    verify_dir(step_dir(tmp_path, 2))


def test_prune_deletes_nothing_when_no_checkpoint_verifies(tmp_path):
    for s in (1, 2, 3):
        _write_ckpt(tmp_path, s, float(s))
        (step_dir(tmp_path, s) / "model.safetensors").write_bytes(b"\0" * 10)
    prune(tmp_path, keep=1)
    assert len(step_dirs(tmp_path)) == 3
