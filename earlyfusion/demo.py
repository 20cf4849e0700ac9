"""``make demo``: the whole pipeline on the built-in data, through the real CLI, timed.

data shapes -> tokenizer train -> vocab build -> train (small) -> sample (a caption for a test image, an image
for a test caption; with conversations also an edit of a held-out picture) -> eval. The last stdout line is eval's
JSON object. ``--conversations N`` adds the built-in conversations (questions about one or two pictures, edits) to
the data, so that one model both captions, draws and converses (docs/conversations.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from earlyfusion.chat_eval import CONVERSATIONS_TEST, read_conversations
from earlyfusion.cli import main as cli
from earlyfusion.training.shapes_chat import EDIT_KINDS

DEMO_STEPS = 2400
CHAT_IMAGE_SIZE, CHAT_DOWNSAMPLE, CHAT_LR = 48, 16, 3e-4
"""With conversations: 48 px pictures and 16 px codes, so that each of the 3x3 codes covers one cell of the scene's
grid (one whole shape, or none) and a shape named in a question is one code to find; the decoder learns such codes
at a lower peak learning rate (at train's default it keeps answering every shape's attributes alike)."""


def _stage(name: str, argv: list[str], timings: dict) -> None:
    print(f"\n=== {name}: earlyfusion {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli(argv)
    timings[name] = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"demo: stage '{name}' failed (exit {rc})")
    print(f"--- {name} took {timings[name]:.0f} s", flush=True)


def _have_cxx() -> bool:
    """torch.compile on a CPU writes C++ and needs a compiler (inductor uses $CXX, else g++ or clang++)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the whole earlyfusion pipeline on the built-in data.")
    p.add_argument("--out", default="runs/demo", help="working directory (replaced)")
    p.add_argument("--num-images", type=int, default=10000, help="built-in data set size")
    p.add_argument("--tokenizer-steps", type=int, default=0, help="image tokenizer steps (0 = its default)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help="decoder steps (0 = the train default); the demo trains longer than the default, which leaves "
                        "the held-out loss still falling on this data")
    p.add_argument("--preset", default="small", help="decoder preset")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image tokenizer's and the decoder's training (the built-in data stays the same); "
                        "run several to see how much the figures vary")
    p.add_argument("--conversations", type=int, default=0,
                   help="also write and train on this many built-in conversations (questions about one or two "
                        "pictures, edits), and score the held-out ones; 0 = captions only")
    p.add_argument("--image-size", type=int, default=0,
                   help=f"side of the built-in pictures in pixels (0: data shapes' default, or {CHAT_IMAGE_SIZE} with "
                        "--conversations, where each image code then covers one cell of the scene grid)")
    p.add_argument("--downsample", type=int, default=0,
                   help=f"pixels per image code side (0: the tokenizer's default, or {CHAT_DOWNSAMPLE} with --conversations)")
    p.add_argument("--lr", type=float, default=0,
                   help=f"decoder peak learning rate (0: train's default, or {CHAT_LR:g} with --conversations)")
    p.add_argument("--image-positions", action="store_true",
                   help="train the decoder with image place embeddings (train --image-positions)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on at most this many test pairs (0 = all)")
    p.add_argument("--no-compile", action="store_true",
                   help="train the decoder eagerly (default: train --compile when a C++ compiler is found)")
    args = p.parse_args(argv)
    if args.conversations:
        args.image_size = args.image_size or CHAT_IMAGE_SIZE
        args.downsample = args.downsample or CHAT_DOWNSAMPLE
        args.lr = args.lr or CHAT_LR
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    compile_train = not args.no_compile and _have_cxx()
    if not compile_train:
        print("demo: training without --compile" + ("" if args.no_compile else " (no C++ compiler found: slower)"), flush=True)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    data, vq, vocab, lm = out / "data", out / "image_tokenizer", out / "vocab", out / "lm"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _stage("data", ["data", "shapes", "--out", str(data), "--num-images", str(args.num_images)] + size
           # with conversations, pairs and conversations only: the demo's interleaved and text documents teach
           # neither, and would take an eighth of the steps
           + (["--num-conversations", str(args.conversations), "--num-interleaved", "0", "--num-text", "0"]
              if args.conversations else []), timings)
    seed = ["--seed", str(args.seed)]
    _stage("tokenizer train", ["tokenizer", "train", "--data", str(data), "--out", str(vq)] + seed + size
           + (["--downsample", str(args.downsample)] if args.downsample else [])
           + (["--steps", str(args.tokenizer_steps)] if args.tokenizer_steps else []), timings)
    _stage("vocab", ["vocab", "build", "--image-tokenizer", str(vq), "--data", str(data), "--out", str(vocab)], timings)
    # the last step's weights: on this data the held-out loss still falls at the end, and choosing among the last
    # checkpoints by 500 val pairs picks by a difference smaller than their noise (README: "What make demo measured")
    _stage("train", ["train", "--data", str(data), "--image-tokenizer", str(vq), "--vocab", str(vocab), "--out", str(lm),
                     "--preset", args.preset, "--final", "last"] + seed + (["--steps", str(args.steps)] if args.steps else [])
           + (["--lr", str(args.lr)] if args.lr else []) + (["--image-positions"] if args.image_positions else [])
           + (["--compile"] if compile_train else []), timings)

    test_meta = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()[:1]]
    image, caption = data / "test" / test_meta[0]["file_name"], test_meta[0]["text"]
    _stage("sample caption", ["sample", "--checkpoint", str(lm), "--image", str(image), "--max-new-tokens", "40",
                              "--temperature", "0"], timings)
    _stage("sample image", ["sample", "--checkpoint", str(lm), "--prompt", caption, "--modality", "image",
                            "--num-samples", "4", "--out", str(out / "samples")], timings)
    edit = next((turns[0] for _, _, turns in read_conversations(data / CONVERSATIONS_TEST)[0]
                 if turns[-1].kind in EDIT_KINDS), None) if args.conversations else None
    if edit is not None:  # the first held-out edit: its picture and instruction
        image = next(x for k, x in edit.segments if k == "i")
        instruction = " ".join(x for k, x in edit.segments if k == "t")
        _stage("sample edit", ["sample", "--checkpoint", str(lm), "--image", image, "--prompt", instruction,
                               "--modality", "image", "--out", str(out / "edit")], timings)
    eval_argv = ["eval", "--checkpoint", str(lm), "--data", str(data), "--json"]
    if args.eval_limit:
        eval_argv += ["--limit", str(args.eval_limit)]
    _stage("eval", eval_argv, timings)

    total = time.perf_counter() - t0
    print("\n=== demo summary")
    for k, v in timings.items():
        print(f"  {k:<16} {v:6.0f} s")
    print(f"  {'total':<16} {total:6.0f} s")
    print(f"  sample sheets: {lm / 'samples'}, {lm / 'eval' / 'sheet.png'}, {out / 'samples'}")
    print(f"  reconstructions: {vq}; loss curves: {lm / 'loss_curves.png'}")
    print(json.dumps(json.loads((lm / "eval" / "figures.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
