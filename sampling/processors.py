"""Decoding rules as small composable logits processors, and the text/image sampler.

A processor is a callable ``(logits (B, V) float, state: RowState) -> logits (B, V)`` that masks
forbidden ids with ``-inf``. Processors run on the raw (or CFG-mixed) logits, *before* temperature,
top-k and top-p, so a forbidden id can never be drawn whatever the sampling settings.

The rules (issue 5):

* ``BanIds``: ids that are never generated (pad, bos).
* ``ImageSpan``: inside an image span only image-code ids; after exactly h·w codes the end-image id
  is forced; outside a span neither image codes nor end-image can appear.
* ``ImageFits``: begin-image is banned where h·w + 2 tokens (begin, codes, end) no longer fit in the
  row's remaining budget (the model's context and max-new-tokens).
* ``TextOnly``: no begin-image at all (so no image ids either, with ``ImageSpan``).
* ``ImageOnly``: the first generated token is begin-image (then ``ImageSpan`` drives the span).

``RowState`` tracks, per row, whether it is inside an image span and how many codes it has emitted.
The ids come from a vocabulary-like object (``tokenizer.vocab.Vocabulary``): bos, eos, pad, boi,
eoi, image_start, codebook_size, tokens_per_image; no id is a literal here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

NEG_INF = float("-inf")
Modality = Literal["text", "image", "auto"]


class IdLayout(Protocol):
    """What the rules need to know about the vocabulary (``tokenizer.vocab.Vocabulary`` satisfies it)."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    image_start: int
    codebook_size: int
    tokens_per_image: int


# ---------------------------------------------------------------- per-row state


@dataclass
class RowState:
    """Where each row of a sampling batch stands. All tensors are (B,)."""

    in_image: Tensor
    """bool: an image span is open (begin-image emitted, end-image not yet)."""
    codes: Tensor
    """long: image codes emitted in the currently open span."""
    length: Tensor
    """long: tokens in the row so far (prompt + generated, padding excluded)."""
    finished: Tensor
    """bool: the row stopped (end of sequence, end of its image in image mode, or out of budget)."""
    step: int
    """Tokens generated so far (the same for every row)."""
    max_new_tokens: int
    context: int
    """The model's maximum sequence length."""

    @classmethod
    def from_prompts(cls, prompts: Sequence[Sequence[int]], layout: IdLayout, max_new_tokens: int, context: int,
                     device: torch.device | str = "cpu") -> "RowState":
        """State after reading each prompt; a prompt may end inside an open image span (continuation)."""
        in_image, codes = [], []
        for ids in prompts:
            opened, n = False, 0
            for t in ids:
                if t == layout.boi:
                    opened, n = True, 0
                elif t == layout.eoi:
                    opened, n = False, 0
                elif opened:
                    n += 1
            in_image.append(opened)
            codes.append(n)
        return cls(
            in_image=torch.tensor(in_image, dtype=torch.bool, device=device),
            codes=torch.tensor(codes, dtype=torch.long, device=device),
            length=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
            finished=torch.zeros(len(prompts), dtype=torch.bool, device=device),
            step=0, max_new_tokens=max_new_tokens, context=context,
        )

    def remaining(self) -> Tensor:
        """(B,) long: how many more tokens each row may still append."""
        return torch.minimum(self.context - self.length, torch.full_like(self.length, self.max_new_tokens - self.step))

    def image_position(self, layout: IdLayout) -> Tensor:
        """(B,) bool: the next token of the row is an image code (sampled with the image settings)."""
        return self.in_image & (self.codes < layout.tokens_per_image)

    def update(self, tokens: Tensor, layout: IdLayout) -> None:
        """Record the token (B,) just appended to each unfinished row."""
        live = ~self.finished
        is_code = live & self.in_image & (tokens >= layout.image_start) & (tokens < layout.image_start + layout.codebook_size)
        self.codes = torch.where(is_code, self.codes + 1, self.codes)
        opened = live & (tokens == layout.boi)
        closed = live & (tokens == layout.eoi)
        self.in_image = (self.in_image | opened) & ~closed
        self.codes = torch.where(opened | closed, torch.zeros_like(self.codes), self.codes)
        self.length = self.length + live.long()
        self.step += 1


Processor = Callable[[Tensor, RowState], Tensor]


def _force(logits: Tensor, rows: Tensor, token: int) -> Tensor:
    """Rows (B,) bool may only produce ``token``."""
    if not bool(rows.any()):
        return logits
    forced = torch.full_like(logits, NEG_INF)
    forced[:, token] = 0.0  # the only finite logit: drawn whatever the temperature / top-k / top-p
    return torch.where(rows[:, None], forced, logits)


# ---------------------------------------------------------------- the rules


class BanIds:
    """These ids are never generated."""

    def __init__(self, ids: Sequence[int]):
        self.ids = sorted(set(int(i) for i in ids))

    def __call__(self, logits: Tensor, state: RowState) -> Tensor:
        logits = logits.clone()
        logits[:, self.ids] = NEG_INF
        return logits


class ImageSpan:
    """Inside a span: image codes only, then end-image after exactly h·w codes. Outside: no codes, no end-image."""

    def __init__(self, layout: IdLayout):
        self.layout = layout

    def __call__(self, logits: Tensor, state: RowState) -> Tensor:
        L = self.layout
        V = logits.shape[-1]
        ids = torch.arange(V, device=logits.device)
        image_ids = (ids >= L.image_start) & (ids < L.image_start + L.codebook_size)  # (V,)
        drawing = state.image_position(L)  # (B,)
        # (B, V) allowed: image ids on drawing rows; everything but image ids and end-image elsewhere
        allowed = torch.where(drawing[:, None], image_ids[None, :], (~image_ids & (ids != L.eoi))[None, :])
        logits = logits.masked_fill(~allowed, NEG_INF)
        done = state.in_image & (state.codes >= L.tokens_per_image)
        return _force(logits, done, L.eoi)


class ImageFits:
    """Never open an image span that cannot be completed (h·w codes + begin + end) within the budget."""

    def __init__(self, layout: IdLayout):
        self.layout = layout

    def __call__(self, logits: Tensor, state: RowState) -> Tensor:
        no_room = ~state.in_image & (state.remaining() < self.layout.tokens_per_image + 2)
        if bool(no_room.any()):
            logits = logits.clone()
            logits[no_room, self.layout.boi] = NEG_INF
        return logits


class TextOnly:
    """Text mode: begin-image, end-image and image codes are never produced."""

    def __init__(self, layout: IdLayout):
        self.layout = layout

    def __call__(self, logits: Tensor, state: RowState) -> Tensor:
        L = self.layout
        logits = logits.clone()
        logits[:, [L.boi, L.eoi]] = NEG_INF
        logits[:, L.image_start:L.image_start + L.codebook_size] = NEG_INF
        return logits


class ImageOnly:
    """Image mode: the first generated token opens an image span (the loop stops at its end-image)."""

    def __init__(self, layout: IdLayout):
        self.layout = layout

    def __call__(self, logits: Tensor, state: RowState) -> Tensor:
        if state.step != 0:
            return logits
        return _force(logits, ~state.in_image, self.layout.boi)


def rules_for(modality: Modality, layout: IdLayout) -> list[Processor]:
    """The processors for a modality, in the order they are applied."""
    rules: list[Processor] = [BanIds([layout.pad, layout.bos])]
    if modality == "text":
        rules.append(TextOnly(layout))
    elif modality == "image":
        rules.append(ImageOnly(layout))
    rules += [ImageSpan(layout), ImageFits(layout)]
    return rules


def apply(processors: Sequence[Processor], logits: Tensor, state: RowState) -> Tensor:
    for p in processors:
        logits = p(logits, state)
    return logits


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplerParams:
    """How one kind of position (text or image code) is sampled."""

    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely ids; 0 = no limit."""
    top_p: float = 1.0
    """Keep the smallest set of ids whose probability reaches p (nucleus); 1 = no limit."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")


def _row_params(image_rows: Tensor, text: SamplerParams, image: SamplerParams, V: int):
    """Per-row temperature (B,), k (B,) and p (B,) chosen by position kind."""

    def pick(a, b, dtype):
        return torch.where(image_rows, torch.tensor(b, dtype=dtype, device=image_rows.device),
                           torch.tensor(a, dtype=dtype, device=image_rows.device))

    k_text = text.top_k if 0 < text.top_k < V else V
    k_image = image.top_k if 0 < image.top_k < V else V
    return (pick(text.temperature, image.temperature, torch.float32), pick(k_text, k_image, torch.long),
            pick(text.top_p, image.top_p, torch.float32))


def sample_next(logits: Tensor, image_rows: Tensor, text: SamplerParams, image: SamplerParams,
                generator: torch.Generator | None) -> Tensor:
    """Draw one id per row from masked logits (B, V); image rows use ``image`` settings, others ``text``."""
    logits = logits.float()
    B, V = logits.shape
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise RuntimeError("a row has every id masked; the decoding rules contradict each other")
    temp, k, p = _row_params(image_rows, text, image, V)
    greedy = temp == 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= k[:, None]  # top-k
    probs = torch.softmax(sorted_logits.masked_fill(drop, NEG_INF), dim=-1)  # (B, V)
    if bool((p < 1.0).any()):
        before = probs.cumsum(dim=-1) - probs  # probability mass of the strictly better ids
        probs = probs.masked_fill((before >= p[:, None]) & (rank > 0), 0.0)  # top-p (the best id always stays)
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into the sorted order; needs no normalising
    sampled = order.gather(-1, choice)[:, 0]
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
