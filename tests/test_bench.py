"""Smoke test of bench/run.py: every measurement function runs on the tiny presets and returns positive
numbers, and the report carries the interface keys. Benchmarks are not tests: no time or ratio is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import bench_module, positive

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the smoke test only checks that the code runs, and 2-thread OpenMP regions crawl when
    the shared cores are oversubscribed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench():
    yield from bench_module("bench_run", "run.py")


def test_ceilings_positive(bench):
    assert positive(bench.matmul_gflops(128, repeats=2))
    assert positive(bench.copy_gbps(4, repeats=2))


def test_train_and_decode_tiny(bench):
    r = bench.bench_train("tiny", batch=2, seq_len=16, warmup=1, iters=2, ceiling=bench.MatmulCeiling(64),
                          compile=False)  # train --compile is covered in test_lm_train
    for k in ("ours_tokens_per_s", "peer_tokens_per_s", "ours_gflops", "speedup", "ours_ceiling_fraction_alongside",
              "best_ceiling_fraction_alongside"):
        assert positive(r[k]), (k, r[k])
    assert r["best_mode"] == "eager" and r["best_speedup"] == r["speedup"]
    assert r["parity_max_abs_logit_diff"] < 1e-3  # the peer really is the same model
    d = bench.bench_decode("tiny", batches=(1, 2), prompt_len=4, new_tokens=4, warmup=0, iters=1,
                           ceiling=bench.CopyCeiling(1), compile=False)  # --compile is covered in test_sampling
    for B in (1, 2):
        for k in ("ours", "ours_raw", "peer"):
            assert positive(d[f"b{B}_{k}_tokens_per_s"])
        assert d[f"b{B}_best_mode"] == "eager" and d[f"b{B}_best_speedup"] == d[f"b{B}_speedup"]
        assert positive(d[f"b{B}_ours_gbps"]) and positive(d[f"b{B}_bandwidth_fraction_alongside"])
        # tiny's steps run on one thread at these batches, so the peer is timed on one thread as well
        assert positive(d[f"b{B}_peer_1thread_tokens_per_s"]) and positive(d[f"b{B}_best_speedup_vs_peer_1thread"])


def test_images_tiny(bench):
    g = bench.bench_image_generation("tiny", "tiny", prompt_len=3, num_samples=2, warmup=0, iters=1)
    for k in ("s_per_image_cfg", "s_per_image_nocfg", "cfg_cost_ratio", "images_per_s_cfg_2"):
        assert positive(g[k]), k
    t = bench.bench_image_tokenizer("tiny", batch=2, warmup=0, iters=1)
    assert positive(t["encode_images_per_s"]) and positive(t["decode_images_per_s"])


def test_report_has_interface_keys(bench, tmp_path):
    results = {"argv": "", "machine": bench.machine_info(2), "load_before": "0", "load_after": "0",
               "busy_before": [], "busy_after": [], "settings": {"decode_batches": [1], "image_prompt_len": 3},
               "ceilings": {"matmul_gflops": 10.0, "matmul_n": 64, "copy_gbps": 5.0, "copy_mb": 1, "repeats": 1},
               "train": {}, "decode": {},
               "image_generation": {"preset": "tiny", "vq_preset": "tiny", "codes_per_image": 16, "cfg_scale": 3.0,
                                    "num_samples": 2, "iters": 1, "s_per_image_cfg": 0.2, "s_per_image_nocfg": 0.1,
                                    "cfg_cost_ratio": 2.0, "images_per_s_cfg_2": 4.0}}
    results["machine"]["fast_bf16"] = False
    results["interface"] = bench.interface(results)
    assert set(results["interface"]) == set(bench.INTERFACE_KEYS) | {"bf16_available"}
    assert results["interface"]["bf16_available"] is False
    assert results["interface"]["train_speedup_small"] is None  # not run, not invented
    assert results["interface"]["cfg_cost_ratio"] == 2.0
    text = bench.render(results)
    for k in bench.INTERFACE_KEYS:
        assert k in text
    assert "| 2 | ≤ 1.3 | **no** |" in text  # a missed target is reported as missed
    json.dumps(results["interface"])  # plain numbers / null


def test_report_bf16_rows(bench):
    """On a host with fast bf16: the two bf16 keys are ours bf16 ÷ ours fp32 and the bf16 ceiling fraction of base."""
    train = {"params": 1e6, "batch": 1, "seq_len": 8, "vocab_size": 10, "iters": 1, "best_mode": "eager",
             "ours_tokens_per_s": 100.0, "peer_tokens_per_s": 80.0, "speedup": 1.25, "best_speedup": 1.25,
             "best_gflops": 1.0, "best_tokens_per_s": 100.0, "best_ceiling_fraction_alongside": 0.8}
    bf16 = {**train, "ours_tokens_per_s": 150.0, "best_tokens_per_s": 150.0, "best_speedup": 1.1,
            "best_ceiling_fraction_alongside": 0.3}
    results = {"argv": "", "machine": {**bench.machine_info(2), "fast_bf16": True, "cpu_bf16_features": ["avx512_bf16"]},
               "load_before": "0", "load_after": "0", "busy_before": [], "busy_after": [],
               "settings": {"decode_batches": [1], "image_prompt_len": 3},
               "ceilings": {"matmul_gflops": 10.0, "matmul_bf16_gflops": 25.0, "matmul_n": 64, "copy_gbps": 5.0,
                            "copy_mb": 1, "repeats": 1},
               "train": {"base": train}, "train_bf16": {"base": bf16}, "decode": {}}
    ifc = bench.interface(results)
    assert ifc["bf16_available"] is True
    assert ifc["train_bf16_speedup_base"] == 1.5 and ifc["train_bf16_ceiling_fraction_base"] == 0.3
    results["interface"] = ifc
    text = bench.render(results)
    assert "AVX512-BF16" in text and "| 1.5 | ≥ 2.0 | **no** |" in text and "| 0.3 | ≥ 0.4 | **no** |" in text
    assert "Training under bf16 autocast" in text


def test_bf16_rows_and_pinned_modes_run(bench):
    """The bf16 training row (both sides under the same autocast, bf16 ceiling) and the decode modes run."""
    import torch

    r = bench.bench_train("tiny", batch=2, seq_len=16, warmup=0, iters=1, compile=False, precision="bf16",
                          ceiling=bench.MatmulCeiling(64, torch.bfloat16))
    assert r["precision"] == "bf16" and positive(r["ours_tokens_per_s"]) and positive(r["peer_tokens_per_s"])
    assert positive(r["best_ceiling_fraction_alongside"])
    d = bench.bench_decode("tiny", batches=(1,), prompt_len=4, new_tokens=4, warmup=0, iters=1, compile=False, bf16=True)
    for k in ("ours", "mode_eager", "bf16_ours", "ours_raw", "peer"):
        assert positive(d[f"b1_{k}_tokens_per_s"]), k
    assert d["b1_plan_eager"] == "eager" and d["b1_fastest_mode"] in ("ours", "mode_eager", "bf16_ours")


def test_image_scale_tiny(bench):
    """Packed training (several documents per row, the dense mask built once per forward, the peer on the same packed
    rows giving the same logits) and batched image generation with CFG, ours and the peer, at toy sizes."""
    r = bench.bench_packed_train("tiny", seq_len=64, batch=2, grid=(3, 3), codebook_size=32, warmup=0, iters=1,
                                 ceiling=bench.MatmulCeiling(64))
    for k in ("ours_tokens_per_s", "peer_tokens_per_s", "ours_gflops", "ours_dense_gflops", "speedup",
              "ours_ceiling_fraction_alongside", "peer_ceiling_fraction_alongside"):
        assert positive(r[k]), (k, r[k])
    assert r["docs_per_row"] > 1 and 0 < r["fill"] <= 1
    assert r["attention_len"] < r["seq_len"] and r["ours_gflops"] < r["ours_dense_gflops"]
    assert r["attention"] == {"chunks": 0, "mask_builds": 1} and r["n_layers"] > 1  # short rows: one dense mask
    assert r["parity_max_abs_logit_diff"] < 1e-3  # the peer masks the same documents
    long = bench.bench_packed_train("tiny", seq_len=1024, batch=2, grid=(16, 16), codebook_size=32, warmup=0, iters=1)
    assert long["attention"]["chunks"] > 2 and long["attention"]["mask_builds"] == 0  # image-sized documents: cut
    assert long["parity_max_abs_logit_diff"] < 1e-3 and long["speedup"] > 0
    g = bench.bench_image_scale("tiny", grids=((2, 2), (3, 3)), num_samples=2, prompt_len=3, codebook_size=32,
                                warmup=0, iters=1)
    assert set(g["grids"]) == {"2x2", "3x3"}
    for name, x in g["grids"].items():
        assert x["new_tokens"] == x["codes_per_image"] + 2
        for k in ("ours_images_per_s", "peer_images_per_s", "speedup"):
            assert positive(x[k]), (name, k, x[k])
    results = {"argv": "", "machine": {**bench.machine_info(2), "fast_bf16": False}, "load_before": "0",
               "load_after": "0", "busy_before": [], "busy_after": [],
               "settings": {"decode_batches": [1], "image_prompt_len": 3},
               "ceilings": {"matmul_gflops": 10.0, "matmul_n": 64, "copy_gbps": 5.0, "copy_mb": 1, "repeats": 1},
               "train": {}, "decode": {}, "train_packed": {"tiny_64": r}, "image_scale": g}
    results["interface"] = bench.interface(results)
    assert set(results["interface"]) == set(bench.INTERFACE_KEYS) | {"bf16_available"}  # no new interface keys
    text = bench.render(results)
    assert "Training at image scale" in text and "Image generation at image scale" in text
