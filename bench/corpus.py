"""Corpora larger than memory: the figures of docs/corpora.md, and the random code shards they are measured on.

    python bench/corpus.py make --images 1000000 --out /tmp/corpus-1m      # random code shards (+ image tokenizer, vocab)
    python bench/corpus.py loader --corpus /tmp/corpus-1m                  # stream alone: first batch, tokens/s, RSS
    python bench/corpus.py first-step --corpus /tmp/corpus-1m              # `earlyfusion train --steps 1`: wall, RSS
    python bench/corpus.py encode --images 2000 --out /tmp/enc32            # encode images/s against its stages alone

``make`` writes what ``earlyfusion encode`` would have written for a corpus of N images of 16x16 = 256 codes each
(codebook 1024, random codes, captions of 5-25 random words), with the real shard writer and manifest, and beside
it an image tokenizer of that grid (random weights: the stream never runs it; its fingerprint is what the manifest
names) and a vocabulary built for it. Random codes are as costly to stream as real ones: the stream never looks at
their values.

Each measurement prints one JSON line. Run them one at a time: the machine's cores are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

WORDS = ("a red blue green yellow purple small large circle square triangle on the left right top bottom of and "
         "photo picture image near far above below beside with").split()
PER_SHARD = 10_000
GRID = (16, 16)
CODEBOOK = 1024


def random_captions(rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(5, 26, n)
    words = rng.integers(0, len(WORDS), int(lengths.sum()))
    out, o = [], 0
    for k in lengths.tolist():
        out.append(" ".join(WORDS[w] for w in words[o:o + k].tolist()))
        o += k
    return out


def random_code_shards(out: Path, *, images: int, fingerprint: str, codebook_size: int, grid: tuple[int, int],
                       per_shard: int = PER_SHARD, seed: int = 0, empty_captions: float = 0.0,
                       block_records: int | None = None) -> dict:
    """A directory of code shards as `earlyfusion encode` writes it, of ``images`` random records; its manifest."""
    from earlyfusion.training.data.code_shards import (BLOCK_RECORDS, codes_dtype, shard_name, write_code_shard,
                                                       write_manifest)

    block_records = block_records or BLOCK_RECORDS
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    own = {"image_tokenizer": fingerprint, "grid_tokens": False, "codes_dtype": codes_dtype(codebook_size).name}
    names = []
    for i, a in enumerate(range(0, images, per_shard)):
        n = min(per_shard, images - a)
        codes = rng.integers(0, codebook_size, (n, *grid), dtype=np.int64)
        captions = random_captions(rng, n)
        for j in np.flatnonzero(rng.random(n) < empty_captions):
            captions[j] = None
        names.append(shard_name(i))
        write_code_shard(out, names[-1], list(codes), captions, {**own, "input": f"random {a}..{a + n - 1}",
                                                                  "skipped": {}}, block_records)
    return write_manifest(out, names, {**own, "codebook_size": codebook_size, "grid": list(grid),
                                       "block_records": block_records, "source": f"bench/corpus.py, seed {seed}"})


def make(args) -> dict:
    import torch

    from earlyfusion.core.checkpoint import atomic_dir, copy_dir
    from earlyfusion.core.rundir import CHECKPOINTS_DIR, IMAGE_TOKENIZER_DIR, VOCAB_DIR, write_decoder
    from earlyfusion.model.decoder import Decoder, DecoderConfig
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.tokenizer.vq_checkpoint import save_vqvae, vq_fingerprint
    from earlyfusion.tokenizer.vq_config import VQConfig
    from earlyfusion.tokenizer.vqvae import VQVAE

    root = Path(args.out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = replace(VQConfig(), image_size=GRID[0] * 16, downsample=16, patch_size=16, channels=(16,), latent_dim=16,
                  codebook_size=CODEBOOK, codebook_dim=8, norm_groups=4)
    save_vqvae(VQVAE(cfg), root / "vq")
    fp = vq_fingerprint(root / "vq")
    rng = np.random.default_rng(1)
    Vocabulary.build(random_captions(rng, 5000), codebook_size=CODEBOOK, grid=GRID, image_tokenizer_fingerprint=fp,
                     text_vocab_size=512).save(root / "vocab")
    m = random_code_shards(root / "codes", images=args.images, fingerprint=fp, codebook_size=CODEBOOK, grid=GRID)
    # a tiny decoder (the tiny preset's width and depth) with a context of 1024 tokens, which no preset has: the
    # first step then costs little beside the data, and `train --init-from` takes its shape
    vocab = Vocabulary.load(root / "vocab")
    dcfg = DecoderConfig.from_preset("tiny", vocab.vocab_size, max_seq_len=1024)
    with atomic_dir(root / "init" / CHECKPOINTS_DIR / "step-00000000") as tmp:
        write_decoder(tmp, Decoder(dcfg), {"decoder": dcfg.to_dict()})
    copy_dir(root / "vocab", root / "init" / VOCAB_DIR)
    copy_dir(root / "vq", root / "init" / IMAGE_TOKENIZER_DIR)
    size = sum(s["bytes"] for s in m["shards"])
    return {"images": m["records"], "shards": len(m["shards"]), "bytes": size, "seconds": time.perf_counter() - t0}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader(args) -> dict:
    """The stream alone, in this process: time to open it and draw its first batch, then tokens/s, and peak RSS."""
    t0 = time.perf_counter()
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.training.data import DataConfig, training_batches

    root = Path(args.corpus)
    vocab = Vocabulary.load(root / "vocab")
    rss0 = _rss_mb()
    t1 = time.perf_counter()
    cfg = DataConfig(sources=[str(root / "codes")], loader_workers=args.workers)
    batches = training_batches(cfg, vocab=vocab, image_tokenizer=root / "vq", context_len=args.context_len,
                               batch_size=args.batch_size, seed=0, fit_captions=True)
    next(batches)
    first = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    took = time.perf_counter() - t2
    tokens = args.batches * args.batch_size * args.context_len
    return {"images": batches.data.parts[0].__len__(), "first_batch_s": first, "tokens_per_s": tokens / took,
            "batches": args.batches, "batch_size": args.batch_size, "context_len": args.context_len,
            "workers": args.workers, "rss_after_imports_mb": rss0, "peak_rss_mb": _rss_mb(),
            "imports_s": t1 - t0, "state_bytes": len(json.dumps(batches.state_dict()))}


def first_step(args) -> dict:
    """`earlyfusion train --steps 1` on the corpus: wall-clock seconds to the end of step 1 (the metrics line) and the
    process's peak RSS."""
    root = Path(args.corpus)
    out = Path(args.run)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --run")
    argv = [sys.executable, "-m", "earlyfusion.cli", "train", "--data", str(root / "codes"), "--init-from",
            str(root / "init"), "--out", str(out), "--context-len", str(args.context_len), "--steps", "1",
            "--batch-size", str(args.batch_size), "--eval-every", "0",
            "--warmup-steps", "0", "--loader-workers", str(args.workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.01)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(err[-2000:])
    if first is None:
        first = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"first_step_s": first, "total_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "context_len": args.context_len, "batch_size": args.batch_size}


ENCODE_PRESETS = {32: "default", 256: "photo256"}  # --size: the image tokenizer preset encoded with (random weights)


def encode(args) -> dict:
    """Encode images/s at --size px (32: the ``default`` tokenizer, 4x4 codes; 256: ``photo256``, 16x16 codes) against
    its two stages alone, each as encode runs it: decode + resize in the same pool of processes (--workers, default
    one per core) handing pixels back to this process, and the image tokenizer's forward on ready pixels in batches
    of encode's --batch-size on this process's torch threads. Repeated --repeat times, interleaved (the machine's load
    falls on all three alike); medians."""
    import multiprocessing

    import torch

    from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, save_vqvae
    from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
    from earlyfusion.tokenizer.vqvae import VQVAE
    from earlyfusion.training.data.encode import DECODE_CHUNK, decode_chunk, one_thread
    from earlyfusion.training.data.records import SkipReport, pair_records

    root = Path(args.out)
    data = root / "data"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "earlyfusion.cli", "data", "shapes", "--out", str(data), "--num-images",
                        str(args.images), "--image-size", str(args.size), "--num-interleaved", "0", "--num-text", "0"],
                       check=True, stdout=subprocess.DEVNULL)
        torch.manual_seed(0)
        vq = VQVAE(VQ_PRESETS[ENCODE_PRESETS[args.size]])
        for name, buf in vq.named_buffers():
            if name.endswith("initted"):
                buf.fill_(True)
        save_vqvae(vq, root / "vq")
    paths = [str(p) for _, p, _ in pair_records(data / "train", "text", SkipReport())]
    workers = args.workers or os.cpu_count() or 1
    vq = load_vqvae(root / "vq").eval()
    batch = args.batch_size
    chunks = [(paths[a:a + DECODE_CHUNK], paths[a:a + DECODE_CHUNK], vq.cfg.image_size, vq.cfg.downsample, None)
              for a in range(0, len(paths), DECODE_CHUNK)]
    rates: dict[str, list[float]] = {"decode": [], "forward": [], "encode": []}
    for _ in range(args.repeat):
        with multiprocessing.get_context("fork").Pool(workers, one_thread) as pool:
            t = time.perf_counter()
            pixels = [p for chunk in pool.starmap(decode_chunk, chunks) for p, _ in chunk]
            rates["decode"].append(len(paths) / (time.perf_counter() - t))
        x = torch.from_numpy(np.stack(pixels))
        with torch.inference_mode():
            vq.encode(x[:batch])
            t = time.perf_counter()
            for a in range(0, len(x), batch):
                vq.encode(x[a:a + batch])
        rates["forward"].append(len(x) / (time.perf_counter() - t))
        out = root / f"codes-{time.time_ns()}"
        res = subprocess.run([sys.executable, "-m", "earlyfusion.cli", "encode", "--data", str(data), "--image-tokenizer",
                              str(root / "vq"), "--out", str(out), "--shard-size", "1000000", "--workers", str(workers),
                              "--batch-size", str(batch)],
                             check=True, capture_output=True, text=True)
        rates["encode"].append(float(re.search(r"\(([\d.]+) images/s", res.stdout).group(1)))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    return {"size": args.size, "preset": ENCODE_PRESETS[args.size], "images": len(paths), "batch_size": batch,
            "workers": workers, "torch_threads": torch.get_num_threads(),
            **{f"{k}_per_s": v for k, v in med.items()}, "encode_vs_slowest": med["encode"] / min(med["decode"],
                                                                                                   med["forward"]),
            "runs": {k: [float(f"{r:.3g}") for r in v] for k, v in rates.items()}, "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make")
    m.add_argument("--images", type=int, required=True)
    m.add_argument("--out", required=True)
    for name in ("loader", "first-step"):
        s = sub.add_parser(name)
        s.add_argument("--corpus", required=True)
        s.add_argument("--context-len", type=int, default=1024)
        s.add_argument("--batch-size", type=int, default=8)
        s.add_argument("--workers", type=int, default=0)
        if name == "loader":
            s.add_argument("--batches", type=int, default=50)
        else:
            s.add_argument("--run", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--images", type=int, default=5000)
    e.add_argument("--out", required=True)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--repeat", type=int, default=3)
    e.add_argument("--size", type=int, default=32, choices=sorted(ENCODE_PRESETS),
                   help="image side in pixels: 32 (default tokenizer) or 256 (photo256)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass, as encode --batch-size")
    args = p.parse_args()
    fn = {"make": make, "loader": loader, "first-step": first_step, "encode": encode}[args.what]
    print(json.dumps({"what": args.what, **fn(args)}))


if __name__ == "__main__":
    main()
