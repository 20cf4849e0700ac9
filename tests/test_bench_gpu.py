"""bench/gpu.py (``make bench-gpu``) at tiny sizes on the CPU: every part runs and records its figures (MFU null
without a peak, the loss comparison skipped without a GPU), the Markdown section is written, and a failing part
is recorded while the others go on. Benchmarks are not tests: no time or ratio is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bench_module, positive

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    yield from bench_module("bench_gpu", "gpu.py")


def test_quick_run_on_cpu_records_every_part(gpu, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU even where a GPU is
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    assert list(r["parts"]) == list(gpu.PARTS)
    for name, part in r["parts"].items():
        assert part["status"] == "ok" and "error" not in part, (name, part.get("error"), part.get("traceback"))
    assert r["device"]["type"] == "cpu" and r["peak_tflops"] is None and r["compile"] is False

    mfu = r["parts"]["train_mfu"]
    assert mfu["shapes"]
    for shape in mfu["shapes"].values():
        for k in ("tokens_per_s", "model_tflops", "eager_tokens_per_s", "eager_step_s"):
            assert positive(shape[k]), (k, shape[k])
        assert shape["mfu"] is None and shape["eager_mfu"] is None  # no peak for a CPU
        assert shape["params"] > 0 and shape["flops_per_token"] > 6 * shape["flop_params"]

    tok, enc = r["parts"]["tokenizer_train"], r["parts"]["encode"]
    assert positive(tok["images_per_s"]) and positive(tok["step_s"]) and tok["batch"] >= 1
    assert positive(enc["images_per_s"]) and enc["batch"] >= 1
    assert enc["path"].startswith("earlyfusion encode")  # the command's own batch path, not the fallback

    gen = r["parts"]["image_generation"]
    assert len(gen["grids"]) == 2
    for name, g in gen["grids"].items():
        assert g["new_tokens"] == g["codes_per_image"] + 2
        for k in ("ours_images_per_s", "peer_images_per_s", "speedup"):
            assert positive(g[k]), (name, k, g[k])

    losses = r["parts"]["losses"]
    assert len(losses["cpu_losses"]) == losses["steps"] and all(positive(x) for x in losses["cpu_losses"])
    assert losses["comparison"] == "skipped" and losses["device_losses"] is None

    section = (tmp_path / gpu.SECTION_NAME).read_text()
    assert section.startswith(f"## {r['device']['name']}\n")
    for words in ("Decoder training", "Image tokenizer", "Image generation", "comparison skipped"):
        assert words in section, words
    assert "Failed parts" not in section
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([gpu.JSON_NAME, gpu.SECTION_NAME])  # nothing else


def test_a_failing_part_is_recorded_and_the_next_runs(gpu, tmp_path, monkeypatch):
    def broken(ctx, rec):
        rec["measured_before_failing"] = 1.0
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setitem(gpu.RUNNERS, "tokenizer_train", broken)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu.main(["--quick", "--device", "cpu", "--parts", "tokenizer_train,encode", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    failed, enc = r["parts"]["tokenizer_train"], r["parts"]["encode"]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: no such kernel"
    assert failed["measured_before_failing"] == 1.0 and failed["traceback"]
    assert enc["status"] == "ok" and positive(enc["images_per_s"])
    assert "Failed parts: `tokenizer_train`: RuntimeError: no such kernel" in (tmp_path / gpu.SECTION_NAME).read_text()


def test_shapes_peaks_and_loss_comparison(gpu):
    """What only a GPU run reaches: the full-size shapes, the peak table, the loss tolerance."""
    import gpu_device  # beside gpu.py, which put bench/ on the path
    import gpu_losses

    shapes = gpu.train_shapes(quick=False)
    assert set(shapes) == {"base", "1b"}
    assert 0.9e9 < shapes["1b"][0].num_params() < 1.2e9
    assert shapes["1b"][0].head_dim == 128 and shapes["1b"][2] <= shapes["1b"][0].max_seq_len
    assert shapes["base"][2] <= shapes["base"][0].max_seq_len
    assert gpu_device.peak_for_name("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert gpu_device.peak_for_name("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_device.peak_for_name("NVIDIA H200")[0] == 989.0
    assert gpu_device.peak_for_name("NVIDIA GH200 480GB")[1] == "GH200"
    assert gpu_device.peak_for_name("NVIDIA L40")[0] == 181.0 and gpu_device.peak_for_name("NVIDIA L4")[0] == 121.0
    assert gpu_device.peak_for_name("Tesla T4") is None
    import torch

    assert gpu.peak_tflops(torch.device("cpu"), None)[0] is None
    assert gpu.peak_tflops(torch.device("cpu"), 100.0) == (100.0, "--peak-tflops")
    ok = gpu_losses.compare_losses([5.0, 4.0, 3.0], [5.0, 4.0 + 1e-5, 3.0])
    assert ok["comparison"] == "ok" and ok["worst_step"] == 2
    bad = gpu_losses.compare_losses([5.0, 4.0, 3.0], [5.0, 4.0, 3.01])
    assert bad["comparison"] == "mismatch" and bad["worst_step"] == 3


def test_device_sections_survive_the_cpu_bench_and_replace_their_own_device(gpu):
    """RESULTS.md keeps a section per device: the CPU bench's rewrite keeps them, a newer run of one device replaces
    that device's section only."""
    report = gpu.gpu_report if hasattr(gpu, "gpu_report") else __import__("gpu_report")
    h100 = f"## NVIDIA H100\n{report.MARK}\n\nMFU 40 %\n"
    h200 = f"## NVIDIA H200\n{report.MARK}\n\nMFU 50 %\n"
    cpu_bench = "# Benchmark results\n\n## Machine\n\nfigures\n"
    text = report.with_device_sections(cpu_bench, {"NVIDIA H100": h100, "NVIDIA H200": h200})
    assert text.startswith(cpu_bench.rstrip()) and h100 in text and h200 in text
    rewritten = report.with_device_sections("# Benchmark results\n\n## Machine\n\nnew figures\n",
                                            report.device_sections(text))
    assert "new figures" in rewritten and "\nfigures" not in rewritten.replace("new figures", "")
    assert report.device_sections(rewritten) == {"NVIDIA H100": h100, "NVIDIA H200": h200}
    newer = f"## NVIDIA H100\n{report.MARK}\n\nMFU 47 %\n"
    again = report.with_device_sections(rewritten, {**report.device_sections(rewritten), "NVIDIA H100": newer})
    assert "MFU 47 %" in again and "MFU 40 %" not in again and "MFU 50 %" in again
