"""Hand-written pieces of the decoder's training step, where torch's own would be slow on a CPU.

* ``embed``: the token embedding, whose backward sums rows with ``index_add_`` inside compiled graphs too;
  ``IndexAddEmbedding`` is an ``nn.Embedding`` that uses it (``model/compile.py`` swaps it in before compiling).
* ``blocked_attention``: causal attention computed block by block of queries with a written-out backward;
  ``BlockedAttention`` is the module that takes the place of the decoder's ``ScaledDotProduct``
  (``model/attention_plan.py`` times the two and keeps the faster).

Each gives the arithmetic of the torch function it replaces, up to rounding (tests/test_attention.py,
tests/test_decoder.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyfusion.model.masks import DocumentChunks, Mask

# Queries per block of ``blocked_attention``: a block sees only the keys up to its last query, so smaller blocks
# skip more of the causal triangle but make more, smaller products.
QUERY_BLOCK = 128


@torch.library.custom_op("earlyfusion::embedding_grad", mutates_args=())
def embedding_grad(grad: Tensor, tokens: Tensor, num_rows: int) -> Tensor:
    """The embedding table's gradient (num_rows, dim): each row of ``grad`` (…, dim) added into the row its token
    names. An opaque op so that torch.compile calls ``index_add_`` instead of its own lowering, which adds element
    by element with atomics and is many times slower on a CPU."""
    flat = grad.reshape(-1, grad.shape[-1])
    return flat.new_zeros(num_rows, flat.shape[1]).index_add_(0, tokens.reshape(-1), flat)


@embedding_grad.register_fake
def _(grad: Tensor, tokens: Tensor, num_rows: int) -> Tensor:
    return grad.new_empty(num_rows, grad.shape[-1])


class _Embed(torch.autograd.Function):
    @staticmethod
    def forward(weight: Tensor, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, weight)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, tokens = inputs
        ctx.save_for_backward(tokens)
        ctx.num_rows = weight.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (tokens,) = ctx.saved_tensors
        return embedding_grad(grad, tokens, ctx.num_rows), None


def embed(weight: Tensor, tokens: Tensor) -> Tensor:
    """``F.embedding(tokens, weight)`` whose backward sums rows with ``embedding_grad``."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _Embed.apply(weight, tokens)
    return F.embedding(tokens, weight)  # no backward to shape: spare decode steps the autograd.Function's overhead


class IndexAddEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose forward is ``embed``: the same lookup, with the backward compiled graphs need."""

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether ``module`` is a plain ``nn.Embedding`` (no padding index, max norm or sparse or scaled gradient)
        that an IndexAddEmbedding computes exactly."""
        return (type(module) is nn.Embedding and module.padding_idx is None and module.max_norm is None
                and not module.sparse and not module.scale_grad_by_freq)

    @classmethod
    def sharing(cls, embedding: nn.Embedding) -> IndexAddEmbedding:
        """One that holds ``embedding``'s own weight Parameter (nothing copied)."""
        new = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        new.weight = embedding.weight
        return new.train(embedding.training)

    def forward(self, tokens: Tensor) -> Tensor:
        return embed(self.weight, tokens)


def _allowed(mask: Tensor | None, start: int, end: int, device: torch.device) -> Tensor:
    """(…, end - start, end) bool: which of keys [0, end) the queries [start, end) may see."""
    if mask is None:
        return torch.ones(end - start, end, dtype=torch.bool, device=device).tril(diagonal=start)
    return mask[:, :, start:end, :end]


class _BlockedAttention(torch.autograd.Function):
    """``blocked_attention``'s arithmetic with a backward pass written out, so that the key and value gradients
    come out in the keys' own layout (autograd's product backward gives the key gradient transposed, which the
    QK-norm and RoPE backward kernels then read with gathers) and accumulate across blocks in fp32."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block: int) -> Tensor:
        T, scale = q.shape[2], q.shape[-1] ** -0.5
        acc = torch.promote_types(q.dtype, torch.float32)  # the softmax's precision: fp32, or fp64 for fp64 inputs
        # scores in fp32 even under bf16 autocast (bf16 scores would perturb the attention weights by a few per cent,
        # where the library kernel accumulates them in fp32); this product is one of the kernel's six per block
        qa, ka = q.to(acc), k.to(acc)
        outs, weights = [], []
        for start in range(0, T, block):
            end = min(start + block, T)
            scores = (qa[:, :, start:end] @ ka[:, :, :end].transpose(-1, -2)) * scale
            scores = scores.masked_fill(~_allowed(mask, start, end, q.device), float("-inf"))
            p = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, H, end - start, end)
            outs.append(p @ v[:, :, :end])
            weights.append(p)
        ctx.block = block
        ctx.save_for_backward(q, k, v, *weights)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, *weights = ctx.saved_tensors
        T, scale, block = q.shape[2], q.shape[-1] ** -0.5, ctx.block
        grad_out = grad_out.to(v.dtype)
        acc = torch.promote_types(q.dtype, torch.float32)
        # written without in-place slice updates: each block's key/value gradient is padded to T and summed, the
        # query gradient concatenated, which torch.compile turns into single passes instead of whole-tensor copies
        dqs, dk, dv = [], None, None
        for i, start in enumerate(range(0, T, block)):
            end = min(start + block, T)
            p, go = weights[i], grad_out[:, :, start:end]
            dp, pf = (go @ v[:, :, :end].transpose(-1, -2)).to(acc), p.to(acc)
            ds = (pf * (dp - (dp * pf).sum(-1, keepdim=True)) * scale).to(q.dtype)
            dqs.append(ds @ k[:, :, :end])
            pad = (0, 0, 0, T - end)
            dk_i = F.pad((ds.transpose(-1, -2) @ q[:, :, start:end]).to(acc), pad)
            dv_i = F.pad((p.transpose(-1, -2) @ go).to(acc), pad)
            dk, dv = (dk_i, dv_i) if dk is None else (dk + dk_i, dv + dv_i)
        dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block: int = QUERY_BLOCK) -> Tensor:
    """Causal attention, written out: for each block of ``block`` queries, scores against the keys up to the
    block's last query (the keys after it are masked for every query of the block, so they are never computed),
    softmax in fp32, then the weighted sum of values; the backward pass likewise, block by block.

    q (B, H, T, hd), k/v (B, KV, T, hd) with H a multiple of KV; ``mask`` (B, 1, T, T) bool (True = may attend)
    restricts further (packed documents, padding) and must itself be causal, as ``causal_mask`` makes it; None
    means plain causal attention. Under autocast the scores and the softmax are fp32 and the other products run in
    the autocast dtype. On a CPU with fast bf16 products but no AMX, this trains faster in bf16 than the library
    kernel, whose bf16 path is no faster than its fp32 one; in fp32 it is usually slower. The same arithmetic as
    ``F.scaled_dot_product_attention`` up to rounding."""
    H = q.shape[1]
    if k.shape[1] != H:  # grouped-query heads: each key/value head serves H / KV query heads
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        return _BlockedAttention.apply(q, k, v, mask, block)


class BlockedAttention(nn.Module):
    """``blocked_attention`` in the place of the decoder's ``ScaledDotProduct`` (causal self-attention only: the
    decoder calls it for forward passes without a KV cache)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, is_causal: bool) -> Tensor:
        if isinstance(mask, DocumentChunks):
            return mask.attend(q, k, v, lambda q, k, v, m, _causal: blocked_attention(q, k, v, m))
        return blocked_attention(q, k, v, mask)
