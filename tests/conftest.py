"""Shared fixtures: a tiny end-to-end pipeline built once per test session through the real CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# --mixed-precision auto would pick bf16 on some hosts and fp32 on others: the suite runs the fp32 branch
# everywhere (exact-resume and parity tests compare fp32 numbers); tests of the bf16 branch force it.
os.environ.setdefault("EARLYFUSION_FAST_BF16", "0")
# Training times two attention kernels and keeps the faster; under a loaded test machine the choice could differ
# between two runs that tests compare number for number: the suite pins it (tests of the choice unpin it).
os.environ.setdefault("EARLYFUSION_ATTENTION", "library")


@dataclass
class TinyPipeline:
    data: Path
    vq: Path
    vocab: Path
    lm: Path | None = None


def run_cli(*argv) -> None:
    from earlyfusion.cli import main

    rc = main([str(a) for a in argv])
    assert rc == 0, f"earlyfusion {' '.join(map(str, argv))} exited {rc}"


def tiny_train_argv(p: TinyPipeline, out: Path, steps: int = 12, *extra) -> list:
    return ["train", "--data", p.data, "--image-tokenizer", p.vq, "--vocab", p.vocab, "--out", out,
            "--preset", "tiny", "--steps", steps, "--batch-size", 4, "--warmup-steps", 2, "--eval-every", 0,
            "--checkpoint-every", 4, "--lr", 3e-3, *extra]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    """Built-in data (16 px) -> tiny image tokenizer -> vocabulary -> tiny decoder run."""
    root = tmp_path_factory.mktemp("pipeline")
    p = TinyPipeline(data=root / "data", vq=root / "vq", vocab=root / "vocab")
    run_cli("data", "shapes", "--out", p.data, "--num-images", 160, "--image-size", 16, "--seed", 1,
            "--num-interleaved", 20, "--num-text", 20)
    run_cli("tokenizer", "train", "--data", p.data, "--out", p.vq, "--preset", "tiny", "--steps", 30)
    run_cli("vocab", "build", "--image-tokenizer", p.vq, "--data", p.data, "--out", p.vocab, "--text-vocab-size", 300)
    p.lm = root / "lm"
    run_cli(*tiny_train_argv(p, p.lm, 12))
    return p


def cli_status(capsys, argv) -> tuple[int, str]:
    """(exit status, stderr) of one `earlyfusion` command run in this process; argparse's refusals included."""
    from earlyfusion.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err):
    """Exit status 2, exactly one `earlyfusion: error:` line on stderr, no traceback."""
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("earlyfusion: error: "), err
    assert "Traceback" not in err


def bench_module(name: str, file: str):
    """A bench/ script imported as a module for the duration of a test module (bench/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def positive(x) -> bool:
    """A measured figure: a finite positive float."""
    import math

    return isinstance(x, float) and math.isfinite(x) and x > 0
