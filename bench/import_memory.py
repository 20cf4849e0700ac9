"""Peak memory of `earlyfusion import chameleon` against the size of the weights it converts.

Writes a Chameleon-7B-shaped checkpoint (dim 4096, hidden 11008, 32 heads, vocabulary 65536 with 8192 IMGIMG
image tokens) with as many layers as fit ``--size-gib`` of bf16 weights, in transformers' sharded format (random
weights, a synthetic tokenizer.json, a small VQGAN with an 8192-entry codebook), then runs the import in a
subprocess and reports its peak resident memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) beside
the weights' size and the peak of a child that only imports the same modules.

    python bench/import_memory.py                      # about 10 GiB of weights (needs twice that on disk)
    python bench/import_memory.py --size-gib 0.3 --dim 1024 --hidden 2752 --vocab 16384   # a quick check

Not a test: the full size takes minutes and tens of GiB of disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

GIB = 1 << 30
CODES = 8192


def tokenizer_json(vocab_size: int) -> dict:
    """Chameleon's order: <s> <pad> </s> <unk>, IMGIMG tokens 4..8195, <eoss>, <racm3:break>, bytes, filler."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from earlyfusion.tokenizer.chameleon_vocab import image_code_name

    names = ["<s>", "<pad>", "</s>", "<unk>", *(image_code_name(c) for c in range(CODES)), "<eoss>", "<racm3:break>"]
    names += [b for b in pre_tokenizers.ByteLevel.alphabet() if b not in names]
    names += [f"tok{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>"])
    return json.loads(tok.to_str())


def write_checkpoint(dst: Path, *, size_gib: float, dim: int, hidden: int, heads: int, vocab: int,
                     shard_gib: float = 2.0) -> tuple[int, int]:
    """Sharded bf16 safetensors + index + config.json + tokenizer.json; returns (layers, bytes of weights)."""
    from transformers import ChameleonConfig

    dst.mkdir(parents=True)
    per_layer = 2 * (4 * dim * dim + 3 * dim * hidden + 2 * dim + 4 * dim)  # bf16 bytes (q_norm/k_norm weight+bias)
    fixed = 2 * (2 * vocab * dim + dim)
    layers = max(1, round((size_gib * GIB - fixed) / per_layer))
    hd = dim // heads
    tok = tokenizer_json(vocab)
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    vmap = {t: i for t, i in tok["model"]["vocab"].items()}
    ChameleonConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=heads, vocabulary_map=vmap,
                    bos_token_id=0, eos_token_id=2, pad_token_id=1).save_pretrained(str(dst))

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rand(vocab, dim)
        yield "lm_head.weight", rand(vocab, dim)
        yield "model.norm.weight", torch.ones(dim, dtype=torch.bfloat16)
        for i in range(layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{n}.weight", rand(dim, dim)
            for n in ("q_norm", "k_norm"):
                yield p + f"self_attn.{n}.weight", torch.ones(heads, hd, dtype=torch.bfloat16)
                yield p + f"self_attn.{n}.bias", torch.zeros(heads, hd, dtype=torch.bfloat16)
            yield p + "mlp.gate_proj.weight", rand(hidden, dim)
            yield p + "mlp.up_proj.weight", rand(hidden, dim)
            yield p + "mlp.down_proj.weight", rand(dim, hidden)
            yield p + "input_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(dim, dtype=torch.bfloat16)

    shards, current, size, total = [], {}, 0, 0
    for name, t in tensors():
        current[name] = t
        size += t.numel() * 2
        if size >= shard_gib * GIB:
            shards.append(current)
            current, total, size = {}, total + size, 0
    if current:
        shards.append(current)
        total += size
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    shards.clear()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return layers, total


def write_vqgan(dst: Path) -> None:
    """A small VQGAN with Chameleon's 8192-entry codebook (the decoder's memory is what is measured)."""
    from earlyfusion.tokenizer.vqgan import ChameleonVQGAN, VQGANConfig

    cfg = VQGANConfig(embed_dim=8, n_embed=CODES, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=8)
    dst.mkdir(parents=True)
    dd = {k: v for k, v in cfg.to_dict().items() if k not in ("embed_dim", "n_embed")}
    (dst / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
                                                                         "ddconfig": dd}}}))
    torch.save({"state_dict": ChameleonVQGAN(cfg).state_dict()}, dst / "vqgan.ckpt")


# A small Python process runs the command and reports its child's peak: measured from this (large) process, the
# child's figure would include this process's own memory, which the kernel hands on to a child at fork/exec.
_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def child_peak_gib(argv: list[str]) -> tuple[float, float]:
    """(peak resident memory of ``argv`` run as a child process in GiB, wall seconds)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], check=True, stdout=subprocess.PIPE, text=True).stdout
    return int(out.split()[-1]) / (1 << 20), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=10.0, help="bf16 weights to write (sets the layer count)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--shard-gib", type=float, default=2.0, help="size of each safetensors shard")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary directory, removed after)")
    args = ap.parse_args()
    if args.size_gib <= 0 or args.vocab < CODES + 262:
        ap.error(f"--size-gib must be positive and --vocab at least {CODES + 262}")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="import-memory-"))
    try:
        t0 = time.perf_counter()
        layers, nbytes = write_checkpoint(root / "model", size_gib=args.size_gib, dim=args.dim, hidden=args.hidden,
                                          heads=args.heads, vocab=args.vocab, shard_gib=args.shard_gib)
        write_vqgan(root / "vqgan")
        print(f"wrote {layers} layers, {nbytes / GIB:.2f} GiB of bf16 weights in {time.perf_counter() - t0:.0f} s", flush=True)
        base, _ = child_peak_gib([sys.executable, "-c", "import earlyfusion.convert, transformers, tokenizers"])
        peak, wall = child_peak_gib([sys.executable, "-m", "earlyfusion.cli", "import", "chameleon", "--model",
                                     str(root / "model"), "--vqgan", str(root / "vqgan"), "--out", str(root / "run")])
        report = {"weights_gib": round(nbytes / GIB, 3), "layers": layers, "peak_rss_gib": round(peak, 3),
                  "baseline_rss_gib": round(base, 3), "peak_over_weights": round(peak / (nbytes / GIB), 3),
                  "largest_shard_gib": round(max(p.stat().st_size for p in (root / "model").glob("*.safetensors")) / GIB, 3),
                  "import_seconds": round(wall, 1)}
        print(json.dumps(report))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
