"""Sharded decoder training (``train --sharding fsdp``) on two CPU processes (gloo): the same losses as one process,
half the memory per process, exact resume after a kill, resume on another number of processes, and a run that
loads like any other.

Two processes are started with torch.distributed.run (``accelerate launch --cpu --num_processes 2`` without
mpirun starts one process): each joins a gloo group and accelerate, told the run is on CPUs
(ACCELERATE_USE_CPU), is multi-CPU. The attention kernel is pinned so that every process and every run compute
with the same one.

Run as a script (``python tests/test_fsdp.py RECIPE OUT``, under torch.distributed.run or not) this file is the
probe the memory test starts: it trains one step of a cut-down Chameleon shape and writes, per process, the bytes
its weights, gradients and AdamW state hold and its peak resident memory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from conftest import TinyPipeline, cli_status, run_cli, tiny_train_argv
from earlyfusion.core.checkpoint import latest_good, load_json, step_dirs
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.training.data.runs import load_run
from earlyfusion.training.lm_inputs import freeze_to_image_head, mask_to_image_head
from earlyfusion.training.lm_train import make_optimizer
from earlyfusion.training.memory import MiB, held_bytes, planned_bytes, recipe_bytes, recipe_table
from earlyfusion.training.sharding import SHARDED_DIR, shard_decoder, zero_grad_rows_outside

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
TOLERANCE = 1e-5
"""Largest relative difference of a step's loss (and gradient norm) between one process and two sharded ones: the
sums of the two processes' shares round differently from one process's sum (seen: about 2e-7)."""
ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "EARLYFUSION_ATTENTION": "library"}
MEASURED_RSS = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc then maps every allocation over 128 KiB on its own and unmaps it when freed, so that resident memory is what
the process holds (by default it raises the threshold as large blocks are freed, and keeps freed memory resident)."""


def _env(**extra) -> dict:
    return {**os.environ, **ENV, **extra}


def _launch(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, args)]


def _train_argv(p: TinyPipeline, out: Path, *extra) -> list[str]:
    return _launch(2, "-m", "earlyfusion.cli", *tiny_train_argv(p, out, STEPS, "--sharding", "fsdp", *extra))


def _run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, cwd=REPO, env=_env(**env or {}), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a: list[dict], b: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert abs(x[k] - y[k]) <= TOLERANCE * max(1.0, abs(x[k])), (k, x["step"], x[k], y[k])


@pytest.fixture(scope="module")
def runs(tiny_pipeline: TinyPipeline, tmp_path_factory) -> SimpleNamespace:
    """One process without sharding and two sharded processes, the same 20 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    one, two = root / "one", root / "two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EARLYFUSION_ATTENTION", "library")
        run_cli(*tiny_train_argv(tiny_pipeline, one, STEPS))
    log = _run(_train_argv(tiny_pipeline, two)).stderr
    return SimpleNamespace(root=root, one=one, two=two, log=log)


def test_two_sharded_processes_match_one_process(runs):
    """Losses and gradient norms (the global norm: clipping reduces the sharded gradients over the processes)."""
    assert "memory per process:" in runs.log and "a 1/2 shard of each on each of 2 processes" in runs.log
    _assert_close(_records(runs.one), _records(runs.two))
    ckpt = latest_good(runs.two / "checkpoints")
    assert ckpt.name == f"step-{STEPS:08d}"
    shards = sorted(p.name for p in (ckpt / SHARDED_DIR).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert set(load_json(ckpt / "MANIFEST.json")["files"]) >= {f"{SHARDED_DIR}/{n}" for n in shards}


def test_kill_and_resume_is_exact(tiny_pipeline: TinyPipeline, runs):
    killed = runs.root / "killed"
    proc = subprocess.Popen(_train_argv(tiny_pipeline, killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(d.name == "step-00000008" for d in step_dirs(killed / "checkpoints")):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its step-8 checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes
        proc.wait()
    assert 8 <= int(latest_good(killed / "checkpoints").name.rpartition("-")[2]) < STEPS
    _run(_train_argv(tiny_pipeline, killed, "--resume"))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _records(killed)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in _records(runs.two)]


@pytest.mark.parametrize("sharding", ["fsdp", "none"])
def test_resume_on_one_process(tiny_pipeline: TinyPipeline, runs, sharding, tmp_path):
    """A checkpoint of two sharded processes continues on one (DCP reshards the weights and AdamW's state)."""
    out = tmp_path / "run"
    shutil.copytree(runs.two, out)
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
    assert latest_good(out / "checkpoints").name == "step-00000016"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EARLYFUSION_ATTENTION", "library")
        run_cli(*tiny_train_argv(tiny_pipeline, out, STEPS, "--sharding", sharding), "--resume")
    _assert_close(_records(runs.two), _records(out))


def test_sharded_run_loads_like_any_other(runs):
    """load_run reads the run's model.safetensors; its logits are those of the weights in the sharded state."""
    ckpt = latest_good(runs.two / "checkpoints")
    run = load_run(runs.two)
    consolidated = Decoder(DecoderConfig.from_dict(load_json(ckpt / "config.json")["decoder"]))
    state = {"model": consolidated.state_dict()}
    dcp.load(state, checkpoint_id=ckpt / SHARDED_DIR, no_dist=True)  # one process reads every shard
    consolidated.load_state_dict(state["model"])
    tokens = torch.randint(0, consolidated.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(run.decoder.eval()(tokens), consolidated.eval()(tokens))
    assert torch.equal(load_run(ckpt).decoder.output.weight, consolidated.output.weight)


def test_image_head_under_sharding_changes_only_image_rows(tiny_pipeline: TinyPipeline, runs):
    out = runs.root / "head"
    _run(_launch(2, "-m", "earlyfusion.cli", "train", "--data", tiny_pipeline.data, "--init-from", runs.one,
                 "--trainable", "image-head", "--out", out, "--steps", 4, "--batch-size", 4, "--warmup-steps", 2,
                 "--eval-every", 0, "--checkpoint-every", 4, "--lr", 3e-3, "--sharding", "fsdp"))
    before, after = load_run(runs.one), load_run(out)
    rows = before.vocab.image_range
    for name, w in after.decoder.state_dict().items():
        old = before.decoder.state_dict()[name]
        if name == "output.weight":
            assert torch.equal(w[:rows.start], old[:rows.start]) and torch.equal(w[rows.stop:], old[rows.stop:])
            assert not torch.equal(w[rows.start:rows.stop], old[rows.start:rows.stop])
        else:
            assert torch.equal(w, old), name


def test_compile_with_sharding_is_one_line(tiny_pipeline: TinyPipeline, tmp_path, capsys):
    rc, err = cli_status(capsys, tiny_train_argv(tiny_pipeline, tmp_path / "lm", 2, "--sharding", "fsdp", "--compile"))
    assert rc == 2 and "--compile does not work with --sharding fsdp" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- memory

# A cut-down Chameleon-7B: its head size, vocabulary and proportions of MLP to attention, a 16th of its width
CUT_DOWN = dict(dim=512, n_layers=8, n_heads=4, hidden_dim=1376, vocab_size=8192, max_seq_len=64)


def _probe(kind: str, nproc: int, out: Path) -> list[dict]:
    args = [Path(__file__), kind, out]
    argv = _launch(nproc, *args) if nproc > 1 else [sys.executable, *map(str, args)]
    _run(argv, MEASURED_RSS)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_two_sharded_processes_hold_half_the_memory(tmp_path):
    """Weights + gradients + AdamW state per process (the local shards' bytes, measured in each process after a
    step): about half of one process's, and what ``planned_bytes`` announced before the step; peak RSS growth
    near ``recipe_bytes``."""
    one = _probe("full", 1, tmp_path / "one")[0]
    two = _probe("full", 2, tmp_path / "two")
    for rank in two:
        ratio = rank["held"]["total"] / one["held"]["total"]
        assert 0.48 <= ratio <= 0.52, (ratio, rank, one)
    for rank in [one, *two]:
        assert rank["held"]["weights"] == rank["planned"]["weights"] and rank["held"]["grads"] == rank["planned"]["grads"]
        assert abs(rank["held"]["optimizer"] / rank["planned"]["optimizer"] - 1) < 0.001  # + AdamW's step scalars
    for rank in [one, *two]:  # the sharded ones' peak includes the whole model as built, before it was sharded
        assert 0.9 <= rank["rss"] / rank["recipe"]["total"] <= 1.3, rank


@pytest.mark.parametrize("kind", ["lora", "image-head"])
def test_recipe_memory_matches_peak_rss(kind, tmp_path):
    if kind == "lora":
        pytest.importorskip("peft")
    rank = _probe(kind, 1, tmp_path / kind)[0]
    assert abs(rank["held"]["total"] / rank["recipe"]["total"] - 1) < 0.01, rank
    # the process really holds at least that; the peak above it is activations and the runtime's own allocations,
    # which at this cut-down size are as large as these recipes' small trained parts and vary with the machine's load
    assert rank["rss"] >= 0.9 * rank["recipe"]["total"], rank


def test_docs_memory_table_is_the_computed_one():
    doc = (REPO / "docs" / "several-gpus.md").read_text(encoding="utf-8")
    assert recipe_table(DecoderConfig.from_preset("chameleon-7b")) in doc


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss() -> int:
    """Resident memory now (the peak so far can be higher: imports that freed what they used)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def probe(kind: str, out: Path) -> None:
    """One training step of the ``CUT_DOWN`` shape under ``kind`` (full, lora, image-head), sharded when started
    as several processes; writes what the process held to OUT/rank{R}.json."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = DecoderConfig(**CUT_DOWN)
    if kind == "lora":
        import peft  # before the baseline: importing it takes memory too
    before = _rss()
    if kind == "lora":
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the frozen base
        model = Decoder(cfg)
        torch.set_default_dtype(torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["qkv", "proj", "gate_up", "down"]))
    else:
        model = Decoder(cfg)
    if kind == "image-head":
        freeze_to_image_head(model)
    if world > 1:
        shard_decoder(model, torch.device("cpu"))
    planned = planned_bytes(model)
    optimizer = make_optimizer(model, SimpleNamespace(trainable="all", weight_decay=0.1, lr=1e-3))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2 * world, 17), generator=g)[2 * rank:2 * rank + 2]
    with torch.autocast("cpu", torch.bfloat16, enabled=kind == "lora"):
        loss = model(tokens[:, :-1]).float().logsumexp(-1).mean()
    loss.backward()
    if kind == "image-head" and world > 1:
        zero_grad_rows_outside(model.output.weight, range(4096, 8192))
    elif kind == "image-head":
        mask_to_image_head(model, range(4096, 8192))
    optimizer.step()
    held = held_bytes(model, optimizer)
    result = {"planned": planned.to_dict(), "held": held.to_dict(), "rss": _peak_rss() - before,
              "recipe": recipe_bytes(cfg, kind, world).to_dict(), "world": world}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    print(f"rank {rank}: held {held.total / MiB:.1f} MiB, peak RSS growth {result['rss'] / MiB:.1f} MiB, "
          f"recipe {result['recipe']['total'] / MiB:.1f} MiB")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    probe(sys.argv[1], Path(sys.argv[2]))
