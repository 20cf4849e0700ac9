"""The sampling loop: text, images (with classifier-free guidance) and interleaved output.

One loop serves every direction. Prompts of different lengths are left-padded (``valid=False``, positions
from the running count of real tokens), read in one prefill into a preallocated ``KVCache``, then one
token per step is fed back; the prompt is never recomputed and nothing is reallocated per step.

Classifier-free guidance (LlamaGen style): N samples run as 2N rows in one batch, ``[cond; uncond]``,
sharing one forward pass and one cache. The unconditional prompt is ``[bos]`` (training drops the
caption of some drawing examples, giving ``[bos, boi, codes, eoi, eos]``). Where the next token is an
image code the logits are mixed, ``cond + (s - 1)·(cond - uncond)`` (= ``uncond + s·(cond - uncond)``,
exactly ``cond`` at s = 1), one token is drawn per pair and appended to both rows; elsewhere the
conditional logits are used as they are.

Public API: ``SamplingConfig``, ``generate(decoder, vocab, prompts, config, vq=..., stream=...)`` →
``list[Sample]``; ``caption_images`` and ``draw_captions`` for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.runtime import autocast, mixed_precision
from earlyfusion.model.decode_plan import decode_plan
from earlyfusion.sampling.processors import (
    IdLayout,
    Modality,
    RowState,
    Rules,
    SamplerParams,
    allowed_grids,
    check_sampler_settings,
    rules_for,
    sample_next,
)
from earlyfusion.tokenizer.image_span import OUTSIDE, SpanGrammar
from earlyfusion.tokenizer.preprocess import to_pil

Prompt = str | Sequence[str | Tensor]
"""A prompt: plain text, or segments in order (text and (h, w) code grids)."""
Stream = Callable[[int, str], None]
"""Called as ``stream(sample_index, text_piece)`` while sampling; an image shows as ``[image k]``."""

IMAGE_PLACEHOLDER = "[image {}]"
# A moderate guidance scale: larger scales amplify a small model's noise into wrong shapes.
DEFAULT_CFG = 1.5
DEFAULT_TEXT_TOKENS = 128
MAX_SAMPLES = 4096


@dataclass
class SamplingConfig:
    """What to sample and how."""

    modality: Literal["text", "image", "auto"] = "text"
    """text: text only; image: one image per sample; auto: the model may open image spans itself."""
    num_samples: int = 1
    """Samples per prompt (at most 4096); they are sampled together as one batch."""
    cfg: float | None = None
    """Classifier-free guidance scale for image codes (1 = none); default 1.5 when images are sampled. Raise it if
    images ignore the prompt, lower it if they come out distorted. Not with --modality text."""
    seed: int = 0
    """Random seed: the same seed and inputs give the same output."""
    max_new_tokens: int | None = None
    """Most tokens to generate; default 128 for text, one image (h*w+2) for image, the rest of the context for auto."""
    temperature: float = 0.7
    """Text temperature; 0 = greedy."""
    top_k: int = 20
    """Text top-k; 0 = no limit."""
    top_p: float = 1.0
    """Text nucleus probability; 1 = no limit."""
    image_temperature: float = 0.5
    """Image-code temperature; 0 = greedy (every sample of a prompt then draws the same image). Raise it for more
    varied images, lower it for images closer to the prompt."""
    image_top_k: int | None = None
    """Image-code top-k; default half the codebook; 0 = no limit."""
    image_top_p: float = 1.0
    """Image-code nucleus probability; 1 = no limit."""
    compile: bool = False
    """Compile the per-token decoder step with torch.compile: decoding gets faster, but compiling takes a while
    the first time (less once inductor's on-disk cache has it) and needs a C++ compiler on a CPU. Worth it for
    long or many samples.
    How each step runs (compiled or not, threads) is timed once per model and batch size and the fastest kept."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto = the decoder runs under bf16 autocast where bf16 products are fast (a GPU with bf16; a CPU with AMX or
    AVX512-BF16), fp32 elsewhere; logits are sampled in fp32 either way. Use no for fp32 results."""

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"--mixed-precision must be one of auto, no, bf16, got {self.mixed_precision!r}")
        if not _is_int(self.num_samples) or not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"--num-samples must be an integer from 1 to {MAX_SAMPLES}, got {self.num_samples}")
        if not _is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64:
            raise ValueError(f"--seed must be an integer in [-2**63, 2**64), got {self.seed}")
        if self.cfg is not None:
            if self.modality == "text":
                raise ValueError("--cfg guides image codes; it cannot be used with --modality text "
                                 "(use --modality image or auto, or drop --cfg)")
            if not math.isfinite(self.cfg) or self.cfg < 0:
                raise ValueError(f"--cfg must be a finite number >= 0 (1 = no guidance), got {self.cfg}")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise ValueError(f"--max-new-tokens must be an integer of at least 1, got {self.max_new_tokens}")
        check_sampler_settings(self.temperature, self.top_k, self.top_p, "--")
        image_top_k = 0 if self.image_top_k is None else self.image_top_k  # None: half the codebook, chosen later
        check_sampler_settings(self.image_temperature, image_top_k, self.image_top_p, "--image-")

    @property
    def guidance(self) -> float:
        if self.cfg is not None:
            return self.cfg
        return 1.0 if self.modality == "text" else DEFAULT_CFG

    def text_params(self) -> SamplerParams:
        return SamplerParams(self.temperature, self.top_k, self.top_p)

    def image_params(self, codebook_size: int) -> SamplerParams:
        k = max(1, codebook_size // 2) if self.image_top_k is None else self.image_top_k
        return SamplerParams(self.image_temperature, k, self.image_top_p)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Sample:
    """One generated continuation."""

    prompt: int
    """Index of the prompt it continues."""
    ids: list[int]
    """Generated token ids (the prompt excluded; a final eos included)."""
    segments: list[str | Tensor] = field(default_factory=list)
    """The output in order: text and (h, w) code grids."""
    images: list = field(default_factory=list)
    """Decoded images (PIL), one per code grid, when a VQ decoder was given."""
    stop: str = "length"
    """Why it stopped: "eos", "image" (image mode: its image is complete), "stop" (one of the ``stop`` ids) or
    "length"."""

    @property
    def text(self) -> str:
        """The text, with ``[image k]`` (1-based) where each image is."""
        parts, k = [], 0
        for s in self.segments:
            if isinstance(s, str):
                parts.append(s)
            else:
                k += 1
                parts.append(IMAGE_PLACEHOLDER.format(k))
        return "".join(parts)


# ---------------------------------------------------------------- prompts


def encode_prompt(vocab, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: ``[bos, ...segments]`` exactly as training documents start (no eos)."""
    segments = [prompt] if isinstance(prompt, str) else list(prompt)
    segments = [s for s in segments if not (isinstance(s, str) and s == "")]
    return list(vocab.encode_document(segments, bos=True, eos=False))


class _TextStreamer:
    """Incremental detokenisation: emits only the new characters of each row's current text run, and the image
    placeholder where the grammar closes an image span."""

    def __init__(self, vocab, n: int, fn: Stream):
        self.vocab, self.fn = vocab, fn
        self.grammar = SpanGrammar.of(vocab)
        self.spans = [OUTSIDE] * n
        self.runs: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n
        self.images = [0] * n

    def push(self, i: int, t: int) -> None:
        v = self.vocab
        was, now = self.spans[i], self.grammar.advance(self.spans[i], t)
        self.spans[i] = now
        if now.open:
            if not was.open:  # a new span: the text after it is a new run
                self.runs[i], self.sent[i] = [], ""
        elif was.open:
            self.images[i] += 1
            self.fn(i, IMAGE_PLACEHOLDER.format(self.images[i]))
        elif not v.layout.text_start <= t < v.layout.text_end:  # special, image code or grid token
            return
        else:
            self.runs[i].append(t)
            text = v.decode_text(self.runs[i])
            if text.endswith("\ufffd") or not text.startswith(self.sent[i]):
                return  # an incomplete multi-byte character: wait for the next token
            self._emit(i, text)

    def _emit(self, i: int, text: str) -> None:
        piece, self.sent[i] = text[len(self.sent[i]):], text
        if piece:
            self.fn(i, piece)

    def flush(self) -> None:
        """Emit what is still held back (bytes that never completed a character)."""
        for i, run in enumerate(self.runs):
            text = self.vocab.decode_text(run) if run else ""
            if text.startswith(self.sent[i]):
                self._emit(i, text)


# ---------------------------------------------------------------- the loop


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """tokens (R, T), valid (R, T) bool, positions (R, T) for rows aligned on the right."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long, device=device)
        valid[i, T - len(r):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens, valid, positions


def _context(decoder) -> int:
    return int(decoder.config.max_seq_len)


@torch.no_grad()
def sample_tokens(decoder, layout: IdLayout, prompts: Sequence[Sequence[int]], *, modality: Modality,
                  max_new_tokens: int, text: SamplerParams, image: SamplerParams,
                  generator: torch.Generator | None = None, guidance: float = 1.0,
                  uncond: Sequence[Sequence[int]] | None = None,
                  on_token: Callable[[int, int], None] | None = None,
                  compile: bool = False, grids: Sequence[tuple[int, int]] | None = None,
                  stop: Sequence[int] = ()) -> tuple[list[list[int]], list[str]]:
    """Sample continuations of token-id prompts; returns (generated ids per prompt, stop reason per prompt).

    ``uncond`` (one prompt per row of ``prompts``) turns on classifier-free guidance with scale ``guidance``:
    the batch is ``prompts + uncond`` and each pair shares every sampled token. ``on_token(row, id)`` is
    called for every token appended to a conditional row. How the per-token steps run (threads; with
    ``compile``, compiled or not, row-wise reductions or library products) is ``model.decode_plan``'s choice,
    timed once per model and batch size; the prefill stays eager on every thread. ``grids``: the (rows,
    columns) an image may take where the vocabulary has grid tokens (default: any it holds). ``stop``: ids that
    end a row besides ``</s>`` (reason "stop"; a conversation's ``<eot>``).
    """
    N = len(prompts)
    if N == 0:
        return [], []
    if uncond is not None and len(uncond) != N:
        raise ValueError("uncond needs one prompt per conditional prompt")
    context = _context(decoder)
    for p in prompts:
        if len(p) == 0:
            raise ValueError("empty prompt (it must start with bos)")
        if len(p) >= context:
            raise UserError(f"the prompt is {len(p)} tokens but the model's context is {context}; "
                            "shorten --prompt or use fewer --image")
    device = next(decoder.parameters()).device
    rows = list(prompts) + (list(uncond) if uncond is not None else [])
    R = len(rows)
    steps = min(max_new_tokens, context - min(len(p) for p in prompts))
    tokens, valid, positions = _left_pad(rows, layout.pad, device)
    cache = decoder.new_cache(R, max_len=tokens.shape[1] + steps)
    lengths = [len(r) for r in rows]  # real tokens per row: the position of the next one
    grammar = SpanGrammar.of(layout)
    state = RowState.from_prompts(prompts, grammar, max_new_tokens, context)
    stop_ids = {layout.eos} | ({layout.eoi} if modality == "image" else set()) | set(stop)

    logits = decoder(tokens, positions=positions, valid=valid, cache=cache)[:, -1].float()  # (R, V)
    rules = Rules(rules_for(modality, layout, grids), logits.shape[-1], device)
    plan = decode_plan(decoder, R, compile=compile, on_timing=log.info)
    out: list[list[int]] = [[] for _ in range(N)]
    reasons = ["length"] * N
    with plan.stepping(decoder) as step_fn:
        for step in range(steps):
            situations = state.situations(layout)
            drawing = [s.drawing(grammar) for s in situations]
            cond = logits[:N]
            if uncond is not None and any(drawing):
                mixed = cond + (guidance - 1.0) * (cond - logits[N:])
                if not all(drawing):
                    mixed = torch.where(torch.tensor(drawing, device=device)[:, None], mixed, cond)
                cond = mixed
            tok = sample_next(rules.apply(cond, situations), drawing, text, image, generator).tolist()  # N ids
            live = [not f for f in state.finished]
            tok = [t if is_live else layout.pad for t, is_live in zip(tok, live)]
            state.update(tok, layout)
            for i, t in enumerate(tok):
                if not live[i]:
                    continue
                out[i].append(t)
                if on_token is not None:
                    on_token(i, t)
                if t in stop_ids:
                    reasons[i] = "eos" if t == layout.eos else "image" if t == layout.eoi else "stop"
                    state.finished[i] = True
                elif state.remaining(i) <= 0:
                    state.finished[i] = True
            if all(state.finished) or step == steps - 1:
                break
            feed, feed_live = (tok, live) if uncond is None else (tok + tok, live + live)  # a pair shares its token
            pos = [min(n, context - 1) for n in lengths]  # finished rows feed padding (valid=False) at a legal position
            lengths = [n + is_live for n, is_live in zip(lengths, feed_live)]
            feed_valid = None if all(feed_live) else torch.tensor(feed_live, device=device)[:, None]
            feed_ids = torch.tensor(feed, device=device)[:, None]
            logits = step_fn(feed_ids, positions=torch.tensor(pos, device=device)[:, None], valid=feed_valid,
                             cache=cache)[:, -1].float()
    return out, reasons


def generate(decoder, vocab, prompts: Sequence[Prompt], config: SamplingConfig, *, vq=None,
             stream: Stream | None = None, grids: Sequence[tuple[int, int]] | None = None) -> list[Sample]:
    """Sample ``config.num_samples`` continuations of each prompt (prompt-major order).

    Images are decoded to PIL with ``vq`` when it is given. ``stream(sample_index, piece)`` receives
    text as it is produced (and ``[image k]`` when an image span closes). ``grids``: the (rows, columns) a
    drawn image may take where the vocabulary has grid tokens (one grid: every image has it; default: any
    grid the vocabulary holds).
    """
    return generate_ids(decoder, vocab, [encode_prompt(vocab, p) for p in prompts], config, vq=vq, stream=stream,
                        grids=grids)


def generate_ids(decoder, vocab, ids: Sequence[Sequence[int]], config: SamplingConfig, *, vq=None,
                 stream: Stream | None = None, grids: Sequence[tuple[int, int]] | None = None,
                 stop: Sequence[int] = ()) -> list[Sample]:
    """``generate`` from prompts already in ids (a conversation's, ``sampling.chat``); ``stop``: ids besides ``</s>``
    that end a sample (kept in its ids, left out of its segments)."""
    rows = [p for p in ids for _ in range(config.num_samples)]
    context = _context(decoder)
    grammar = SpanGrammar.of(vocab)
    grids = allowed_grids(grammar, grids)
    span = max(grammar.span_length(g) for g in grids)
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = {"text": DEFAULT_TEXT_TOKENS, "image": span, "auto": context}[config.modality]
    if config.modality == "image":
        if max_new < span:
            raise UserError(f"--max-new-tokens {max_new} cannot hold one image ({span} tokens: begin-image, "
                            f"up to {grammar.tokens_per_image} codes, end-image); raise it or leave it unset")
        longest = max(len(p) for p in ids)
        if longest + span > context:
            raise UserError(f"the prompt is {longest} tokens; with an image ({span} tokens) that exceeds the "
                            f"model's context of {context}; shorten --prompt")
    guidance = config.guidance
    uncond = [encode_prompt(vocab, []) for _ in rows] if guidance != 1.0 and config.modality != "text" else None
    device = next(decoder.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    streamer = _TextStreamer(vocab, len(rows), stream) if stream is not None else None
    precision, _ = mixed_precision(config.mixed_precision, device.type)
    with autocast(precision, device.type):
        out, reasons = sample_tokens(
            decoder, vocab, rows, modality=config.modality, max_new_tokens=max_new,
            text=config.text_params(), image=config.image_params(vocab.codebook_size),
            generator=generator, guidance=guidance, uncond=uncond,
            on_token=streamer.push if streamer is not None else None, compile=config.compile,
            grids=grids if grammar.grid_tokens else None, stop=stop,
        )
    if streamer is not None:
        streamer.flush()
    samples = [Sample(prompt=i // config.num_samples, ids=o, stop=r,
                      segments=vocab.decode_document(o[:-1] if r == "stop" else o, strict=False))
               for i, (o, r) in enumerate(zip(out, reasons))]
    if vq is not None:
        decode_images(vq, samples)
    return samples


@torch.no_grad()
def decode_images(vq, samples: Sequence[Sample]) -> None:
    """Fill ``sample.images`` with PIL images decoded from each sample's code grids (one VQ batch per grid shape)."""

    grids = [s for sample in samples for s in sample.segments if isinstance(s, Tensor)]
    if not grids:
        return
    device = next(vq.parameters()).device
    images: list = [None] * len(grids)
    for shape in dict.fromkeys(tuple(g.shape) for g in grids):
        idx = [k for k, g in enumerate(grids) if tuple(g.shape) == shape]
        pixels = vq.decode(torch.stack([grids[k] for k in idx]).to(device))  # (n, 3, H, W) in [-1, 1]
        for k, p in zip(idx, pixels):
            images[k] = to_pil(p.float().cpu())
    pil = iter(images)
    for sample in samples:
        sample.images = [next(pil) for s in sample.segments if isinstance(s, Tensor)]


# ---------------------------------------------------------------- helpers used by evaluation


def caption_images(decoder, vocab, codes: Sequence[Tensor], *, max_new_tokens: int = 64, device=None) -> list[str]:
    """Greedy text after each image (reading): prompt ``[bos, boi, codes, eoi]``."""
    cfg = SamplingConfig(modality="text", temperature=0.0, max_new_tokens=max_new_tokens)
    samples = generate(decoder, vocab, [[c] for c in codes], cfg)
    return [s.text.strip() for s in samples]


def draw_captions(decoder, vocab, vq, captions: Sequence[str], *, cfg: float = DEFAULT_CFG, seed: int = 0,
                  image_temperature: float | None = None, device=None, grids=None) -> list:
    """One image (PIL) per caption, sampled with classifier-free guidance (drawing); temperature None = the default;
    ``grids`` as for ``generate``."""
    extra = {} if image_temperature is None else {"image_temperature": image_temperature}
    config = SamplingConfig(modality="image", cfg=cfg, seed=seed, **extra)  # validated like any other
    return [s.images[0] for s in generate(decoder, vocab, list(captions), config, vq=vq, grids=grids)]
