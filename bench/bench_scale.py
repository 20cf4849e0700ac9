"""The decoder at image scale: training on packed rows of image-sized documents at long contexts, and batched
image generation with classifier-free guidance at 64 and 256 codes per image, ours against the peer on the
same weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import earlyfusion.model.decoder as decoder_module
from earlyfusion.model.decode_plan import decode_plan
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.model.masks import document_chunks
from earlyfusion.core.runtime import autocast
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.training.data.config import IGNORE
from earlyfusion.training.data.packing import LOOKAHEAD

from bench_decode import on_threads
from bench_machine import MatmulCeiling, alternate, log, median
from bench_models import VOCAB_FOR_PRESET, BenchLayout, build_pair, flops_per_token, peer_cfg_generate, text_prompts

# The photograph tokenizer's codebook (photo64: 8×8 codes, or 16×16 with --downsample 4): the image ids a
# decoder at image scale predicts over.
SCALE_CODEBOOK = VQ_PRESETS["photo64"].codebook_size
CAPTION_LEN = (4, 40)  # caption tokens of an image document, drawn uniformly
TEXT_DOC_LEN = (16, 256)  # tokens of a text-only document, drawn uniformly
IMAGE_DOC_SHARE = 2 / 3  # the rest of the stream is text-only documents, as in the data mixture


def scale_layout(preset: str, grid: tuple[int, int], codebook_size: int | None = None) -> BenchLayout:
    """The preset's text ids and the photograph codebook (``codebook_size`` overrides it), images of ``grid``."""
    n_text = VOCAB_FOR_PRESET.get(preset, VOCAB_FOR_PRESET["small"])[0]
    return BenchLayout(n_text, codebook_size or SCALE_CODEBOOK, grid)


# ---------------------------------------------------------------- packed rows


def _documents(layout: BenchLayout, seq_len: int, g: torch.Generator) -> Iterator[list[int]]:
    """An endless stream of documents no longer than ``seq_len``: a captioned image ``[bos, caption, boi, codes,
    eoi, eos]`` or, for a third of them, ``[bos, text, eos]``."""

    def ints(lo: int, hi: int, n: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    def length(bounds: tuple[int, int], room: int) -> int:  # uniform in bounds, at most room
        hi = min(bounds[1], room)
        return int(torch.randint(min(bounds[0], hi), hi + 1, (1,), generator=g))

    while True:
        if float(torch.rand(1, generator=g)) < IMAGE_DOC_SHARE:
            room = seq_len - layout.tokens_per_image - 4  # bos, boi, eoi, eos
            caption = ints(layout.text_start, layout.image_start, length(CAPTION_LEN, room))
            codes = ints(layout.image_start, layout.vocab_size, layout.tokens_per_image)
            yield [layout.bos, *caption, layout.boi, *codes, layout.eoi, layout.eos]
        else:
            text = ints(layout.text_start, layout.image_start, length(TEXT_DOC_LEN, seq_len - 2))
            yield [layout.bos, *text, layout.eos]


def packed_rows(layout: BenchLayout, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """(batch, seq_len) tensors packed as training packs them (whole documents, first fit from a look-ahead,
    positions restarting per document, ``doc_ids``, the tail padded as one more segment): tokens, targets
    (IGNORE at each document's last token and on padding), positions, doc_ids; and ``segments``, the
    length of every document and padding tail (the attention a block-diagonal mask leaves)."""
    if layout.tokens_per_image + 4 > seq_len:
        raise ValueError(f"an image of {layout.tokens_per_image} codes does not fit a row of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    stream, pending = _documents(layout, seq_len, g), []
    tokens = torch.full((batch, seq_len), layout.pad, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros((batch, seq_len), dtype=torch.long)
    doc_ids = torch.full((batch, seq_len), -1, dtype=torch.long)
    segments: list[int] = []
    for r in range(batch):
        o, k = 0, 0
        while True:
            while len(pending) < LOOKAHEAD:
                pending.append(next(stream))
            i = next((i for i, d in enumerate(pending) if len(d) <= seq_len - o), None)
            if i is None:
                break
            doc = torch.tensor(pending.pop(i))
            n = len(doc)
            tokens[r, o:o + n] = doc
            targets[r, o:o + n - 1] = doc[1:]
            positions[r, o:o + n] = torch.arange(n)
            doc_ids[r, o:o + n] = k
            segments.append(n)
            o, k = o + n, k + 1
        if o < seq_len:
            positions[r, o:] = torch.arange(seq_len - o)
            segments.append(seq_len - o)
    return {"tokens": tokens, "targets": targets, "positions": positions, "doc_ids": doc_ids,
            "segments": torch.tensor(segments)}


@contextmanager
def counting_masks() -> Iterator[list[int]]:
    """Counts calls of the decoder's ``causal_mask`` (the (T × T) mask builder) inside the block: yields a
    one-element list holding the count."""
    count, original = [0], decoder_module.causal_mask

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    decoder_module.causal_mask = counted
    try:
        yield count
    finally:
        decoder_module.causal_mask = original


def packed_attention(model: Decoder, rows: dict[str, torch.Tensor]) -> dict:
    """How one forward over packed ``rows`` attends: ``chunks``, the number of chunks it attends document by
    document (``model.masks.document_chunks``; 0 where it keeps the dense mask), and ``mask_builds``, how many
    times it builds the dense block-diagonal mask."""
    with torch.no_grad(), counting_masks() as count:
        model(rows["tokens"], positions=rows["positions"], doc_ids=rows["doc_ids"])
    chunks = document_chunks(rows["doc_ids"])
    return {"chunks": 0 if chunks is None else sum(len(row) for row in chunks.rows), "mask_builds": count[0]}


def packed_parity(ours: Decoder, peer: torch.nn.Module, rows: dict[str, torch.Tensor]) -> float:
    """Max |logit difference| between ours (``doc_ids`` + ``positions``) and the peer given the same restarting
    ``position_ids`` on the first packed row. transformers derives its packed-sequence mask from them only
    without a cache, hence ``use_cache=False`` (its default builds one even in training)."""
    x, pos, docs = rows["tokens"][:1], rows["positions"][:1], rows["doc_ids"][:1]
    with torch.no_grad():
        a = ours.eval()(x, positions=pos, doc_ids=docs)
        b = peer.eval()(input_ids=x, position_ids=pos, use_cache=False).logits.float()
    return float((a - b).abs().max())


def _train_step(model: torch.nn.Module, logits_of: Callable[[], torch.Tensor], targets: torch.Tensor,
                precision: str) -> Callable[[], None]:
    """One forward + backward + fused AdamW step (the training loop's optimizer settings), the loss over the
    positions that have a target."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=True)
    model.train()

    def step() -> None:
        with autocast(precision, "cpu"):
            logits = logits_of()  # (B, T, V)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                        ignore_index=IGNORE).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_packed_train(preset: str, *, seq_len: int, batch: int, grid: tuple[int, int] = (16, 16), warmup: int,
                       iters: int, codebook_size: int | None = None, ceiling: MatmulCeiling | None = None,
                       peer: bool = True, precision: str = "no") -> dict:
    """Training tokens/s on packed rows of ``seq_len`` (captioned images of ``grid`` codes and text documents,
    several per row, ``doc_ids`` given: the block-diagonal causal mask), ours against the peer on the same
    weights and rows (the peer gets the restarting ``position_ids``, from which transformers builds its own
    packed-sequence mask), with ``ceiling`` timed in the same alternating rounds.

    tokens/s counts every row position (padding included). Model GFLOP/s counts attention within documents only
    (6N + 12·L·H·Q·T with T = Σd²/Σd over the row's documents and padding tail: what the mask leaves);
    ``*_dense_gflops`` counts it over the whole row (T = seq_len), the work a dense masked attention does."""
    layout = scale_layout(preset, grid, codebook_size)
    if peer:
        ours, hf = build_pair(preset, layout.vocab_size, max_seq_len=seq_len)
    else:
        torch.manual_seed(0)
        ours, hf = Decoder(DecoderConfig.from_preset(preset, layout.vocab_size, max_seq_len=seq_len)), None
    cfg = ours.config
    rows = packed_rows(layout, batch, seq_len)
    seg = rows["segments"].double()
    doc_len = float((seg * seg).sum() / seg.sum())  # the attention length each token sees on average, in flops
    out = {"preset": preset, "precision": "bf16" if precision == "bf16" else "fp32", "batch": batch,
           "seq_len": seq_len, "grid": list(grid), "codes_per_image": layout.tokens_per_image,
           "vocab_size": layout.vocab_size, "iters": iters, "params": cfg.num_params(),
           "docs_per_row": float((rows["doc_ids"].amax(dim=1) + 1).double().mean()),
           "fill": float((rows["doc_ids"] >= 0).double().mean()), "attention_len": doc_len,
           "flops_per_token": flops_per_token(cfg, doc_len), "flops_per_token_dense": flops_per_token(cfg, seq_len),
           "attention": packed_attention(ours, rows), "n_layers": cfg.n_layers}
    x, y, pos, docs = rows["tokens"], rows["targets"], rows["positions"], rows["doc_ids"]
    fns = {"ours": _train_step(ours, lambda: ours(x, positions=pos, doc_ids=docs), y, precision)}
    if hf is not None:
        out["parity_max_abs_logit_diff"] = packed_parity(ours, hf, rows)
        fns["peer"] = _train_step(hf, lambda: hf(input_ids=x, position_ids=pos, use_cache=False).logits, y, precision)
    if ceiling is not None:
        fns["ceiling"] = ceiling
    log(f"  packed training {preset}: {batch} × {seq_len}, {out['docs_per_row']:.1f} documents per row, "
        f"{len(fns)} ways, {warmup} warm-up + {iters} timed rounds")
    times = alternate(fns, warmup, iters)
    ceiling_times = times.pop("ceiling", None)
    for k, ts in times.items():
        tps = batch * seq_len / median(ts)
        out[f"{k}_step_s"] = median(ts)
        out[f"{k}_tokens_per_s"] = tps
        out[f"{k}_gflops"] = tps * out["flops_per_token"] / 1e9
        out[f"{k}_dense_gflops"] = tps * out["flops_per_token_dense"] / 1e9
    if hf is not None:
        out["speedup"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
    if ceiling_times is not None:
        out["matmul_gflops_alongside"] = ceiling.rate(median(ceiling_times))
        for k in times:
            out[f"{k}_ceiling_fraction_alongside"] = out[f"{k}_gflops"] / out["matmul_gflops_alongside"]
            out[f"{k}_dense_ceiling_fraction_alongside"] = out[f"{k}_dense_gflops"] / out["matmul_gflops_alongside"]
    return out


# ---------------------------------------------------------------- batched image generation with CFG


def bench_image_scale(preset: str = "small", *, grids: Sequence[tuple[int, int]] = ((8, 8), (16, 16)),
                      num_samples: int = 8, prompt_len: int = 12, cfg_scale: float | None = None,
                      codebook_size: int | None = None, warmup: int = 1, iters: int = 3,
                      precision: str = "no") -> dict:
    """Images/s (code grids, no VQ decode) of ``num_samples`` images of one caption drawn in one batch with
    classifier-free guidance, for each grid: ours (``sampling.generate.sample_tokens`` with the settings
    ``earlyfusion sample --modality image --cfg S --num-samples N`` gives it: image temperature, top-k half the
    codebook, unconditional prompt ``[bos]``, [cond; uncond] rows in one batch) against the peer's
    ``generate(guidance_scale=S, negative_prompt_ids=[bos] per row)`` on the same weights, sampling with the
    same temperature and top-k and exactly as many new tokens (``min_new_tokens = max_new_tokens``). Where our
    per-token steps run on one thread (``model.decode_plan``'s timed choice for the 2N rows), the peer is also
    timed on one thread (``peer_1thread``)."""
    from earlyfusion.sampling.generate import DEFAULT_CFG, SamplingConfig, sample_tokens

    cfg_scale = DEFAULT_CFG if cfg_scale is None else cfg_scale
    out: dict = {"preset": preset, "num_samples": num_samples, "prompt_len": prompt_len, "cfg_scale": cfg_scale,
                 "precision": "bf16" if precision == "bf16" else "fp32", "iters": iters, "grids": {}}
    for grid in grids:
        layout = scale_layout(preset, grid, codebook_size)
        span = layout.tokens_per_image + 2  # begin-image, h·w codes, end-image
        settings = SamplingConfig(modality="image", cfg=cfg_scale, num_samples=num_samples)
        text, image = settings.text_params(), settings.image_params(layout.codebook_size)
        ours, hf = build_pair(preset, layout.vocab_size, max_seq_len=prompt_len + span)
        ours.eval()
        hf.eval()
        rows = text_prompts(layout, 1, prompt_len).repeat(num_samples, 1)  # one caption, num_samples samples
        row_ids = rows.tolist()
        uncond = [[layout.bos] for _ in range(num_samples)]

        # both closures run before the next grid's models are built (alternate below)
        def ours_fn() -> None:
            g = torch.Generator().manual_seed(0)
            with autocast(precision, "cpu"):
                got, reasons = sample_tokens(ours, layout, row_ids, modality="image", max_new_tokens=span, text=text,
                                             image=image, generator=g, guidance=cfg_scale, uncond=uncond)
            assert all(len(o) == span for o in got) and all(r == "image" for r in reasons), reasons

        def peer_fn() -> None:
            neg = torch.full((num_samples, 1), layout.bos, dtype=torch.long)
            peer_cfg_generate(hf, rows, neg, span, image, cfg_scale, layout, precision, "cpu")

        fns = {"ours": ours_fn, "peer": peer_fn}
        plan = decode_plan(ours, 2 * num_samples, compile=False)  # what sample_tokens will run (timed once here)
        if plan.threads == 1:
            fns["peer_1thread"] = on_threads(1, peer_fn)
        log(f"  image generation {preset}: {num_samples} images of {grid[0]}×{grid[1]} codes, CFG {cfg_scale}, "
            f"{len(fns)} ways, {warmup} warm-up + {iters} timed rounds")
        times = alternate(fns, warmup, iters)
        r = {"codes_per_image": layout.tokens_per_image, "new_tokens": span, "vocab_size": layout.vocab_size,
             "plan": plan.mode}
        for k, ts in times.items():
            r[f"{k}_s"] = median(ts)
            r[f"{k}_images_per_s"] = num_samples / median(ts)
        r["speedup"] = r["ours_images_per_s"] / r["peer_images_per_s"]
        if "peer_1thread" in times:
            r["speedup_vs_peer_1thread"] = r["ours_images_per_s"] / r["peer_1thread_images_per_s"]
        out["grids"][f"{grid[0]}x{grid[1]}"] = r
    return out
