"""Which keys each query may see: the causal mask, and packed rows attended document by document.

A packed training row holds several documents, each attending only to itself. The dense way computes every
query against every earlier key of the row and masks what crosses a document boundary: at a context of 1024 with
documents of about 260 tokens (a 16×16-code image and its caption) four fifths of that work is thrown away.
``document_chunks`` cuts such rows at document boundaries into chunks of at least ``MIN_CHUNK`` tokens and
``DocumentChunks.attend`` runs the attention kernel on each chunk alone (plain causal attention where a chunk is
one document), which gives the same result without the masked work. Each chunk is one kernel call, whose fixed
cost outweighs the saving for short rows and short chunks, so rows shorter than two chunks keep the dense mask, and
longer ones too unless the chunks leave at most ``CHUNKED_SHARE`` of the dense work (docs/several-gpus.md has the
timings behind both numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_CHUNK = 256  # tokens: documents shorter than this are attended together with their neighbours, masked
CHUNKED_SHARE = 0.4  # the most of the dense work that the chunks may cost for chunking to be chosen

# (q, k, v, mask, is_causal) -> attention output: the library kernel or the blocked one
Kernel = Callable[[Tensor, Tensor, Tensor, Tensor | None, bool], Tensor]


def causal_mask(B: int, T: int, start: int, device: torch.device, *, doc_ids: Tensor | None = None,
                keys: Tensor | None = None) -> Tensor:
    """(B, 1, T, start+T) bool: query ``start + i`` may see key j <= start + i, of its own document when
    ``doc_ids`` (B, T) is given (start 0), and only keys allowed by ``keys`` (B, 1, start+T). Every query
    may see itself, so padding queries never have an all-masked row (which would give NaN)."""
    S = start + T
    q_pos = torch.arange(start, S, device=device)
    k_pos = torch.arange(S, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    allowed = allowed.expand(B, T, S)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if keys is not None:
        allowed = allowed & keys
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])
    return allowed[:, None]  # (B, 1, T, S)


@dataclass(frozen=True, eq=False)
class DocumentChunks:
    """Packed rows cut at document boundaries: for each row, its chunks in order as (start, end, mask), where
    mask is None for a chunk of one document (plain causal attention) and the chunk's own ``causal_mask`` for
    one of several short documents. Passed to the attention modules in the place of a dense mask."""

    rows: tuple[tuple[tuple[int, int, Tensor | None], ...], ...]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kernel: Kernel) -> Tensor:
        """q (B, H, T, hd), k/v (B, KV, T, hd) -> (B, H, T, hd): ``kernel`` on each chunk alone."""
        out = []
        for b, chunks in enumerate(self.rows):
            parts = [kernel(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], m, m is None)
                     for s, e, m in chunks]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)


# what the attention modules take as their mask: a dense bool mask, packed rows' chunks, or None (no mask)
Mask = Tensor | DocumentChunks | None


def document_chunks(doc_ids: Tensor) -> DocumentChunks | None:
    """The chunks of packed rows ``doc_ids`` (B, T), or None where the dense mask is the faster way (short rows,
    short documents). Reads ``doc_ids`` on the host: for eager forwards only."""
    B, T = doc_ids.shape
    if T < 2 * MIN_CHUNK:
        return None
    ids = doc_ids.cpu()
    starts = ids[:, 1:] != ids[:, :-1]
    rows, work, split = [], 0, False
    for b in range(B):
        edges = (torch.nonzero(starts[b]).flatten() + 1).tolist() + [T]
        spans, begin, docs = [], 0, 0
        for end in edges:
            docs += 1
            if end - begin >= MIN_CHUNK or end == T:
                spans.append([begin, end, docs])
                begin, docs = end, 0
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_CHUNK:  # a short tail joins the chunk before it
            tail = spans.pop()
            spans[-1][1] += tail[1] - tail[0]
            spans[-1][2] += tail[2]
        split = split or len(spans) > 1
        work += sum((e - s) ** 2 for s, e, _ in spans)
        rows.append(tuple((s, e, None if n == 1 else causal_mask(1, e - s, 0, doc_ids.device,
                                                                  doc_ids=doc_ids[b:b + 1, s:e]))
                          for s, e, n in spans))
    if not split or work > CHUNKED_SHARE * B * T * T:
        return None
    return DocumentChunks(tuple(rows))
