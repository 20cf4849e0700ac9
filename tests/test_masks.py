"""Packed rows attended document by document (model/masks.py): where the rows are cut, and that the result and its
gradients are those of the dense block-diagonal mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from earlyfusion.model import masks
from earlyfusion.model.attention_plan import use_attention
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.model.kernels import blocked_attention
from earlyfusion.model.masks import DocumentChunks, causal_mask, document_chunks


def ids_of(*lengths_per_row: tuple[int, ...]) -> torch.Tensor:
    """doc_ids rows made of documents of the given lengths (a trailing -1 document stands for padding)."""
    rows = []
    for lengths in lengths_per_row:
        rows.append(torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]))
    return torch.stack(rows)


def spans(chunks: DocumentChunks) -> list[list[tuple[int, int, bool]]]:
    return [[(s, e, m is None) for s, e, m in row] for row in chunks.rows]


def test_rows_are_cut_at_document_boundaries_into_chunks_of_a_minimum_length():
    # row 0: two long documents; row 1: short documents merged up to 256, a short tail joining the chunk before it
    doc_ids = ids_of((300, 300, 424), (100, 100, 100, 300, 300, 24, 100))
    chunks = document_chunks(doc_ids)
    assert spans(chunks) == [[(0, 300, True), (300, 600, True), (600, 1024, True)],
                             [(0, 300, False), (300, 600, True), (600, 1024, False)]]
    s, e, mask = chunks.rows[1][0]
    assert torch.equal(mask, causal_mask(1, 300, 0, torch.device("cpu"), doc_ids=doc_ids[1:2, 0:300]))


@pytest.mark.parametrize("doc_ids", [
    ids_of((100, 156, 100, 156)),  # rows shorter than two chunks: one dense call is faster
    ids_of((600, 424)),  # two chunks that would still cost 0.51 of the dense work
    ids_of((1024,), (1024,)),  # nothing to cut
], ids=["short-row", "too-little-saved", "one-document"])
def test_the_dense_mask_is_kept_where_cutting_does_not_pay(doc_ids):
    assert document_chunks(doc_ids) is None


def qkv(B, H, KV, T, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, hd, generator=g, dtype=torch.float64).requires_grad_() for h in (H, KV, KV)]


@pytest.mark.parametrize("kernel", ["library", "blocked"])
def test_chunked_attention_equals_the_dense_mask_with_gradients(kernel):
    doc_ids = ids_of((300, 40, 40, 200, 200, 244), (260, 264, 250, 250))
    B, T = doc_ids.shape
    chunks = document_chunks(doc_ids)
    assert chunks is not None
    q, k, v = qkv(B, 4, 2, T, 8)
    dense = causal_mask(B, T, 0, torch.device("cpu"), doc_ids=doc_ids)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    if kernel == "library":
        ours = chunks.attend(q, k, v, lambda q, k, v, m, c: F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=c, enable_gqa=True))
    else:
        ours = chunks.attend(q, k, v, lambda q, k, v, m, c: blocked_attention(q, k, v, m))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["library", "blocked"])
def test_a_decoder_on_long_packed_rows_gives_the_dense_masks_logits_and_gradients(kernel, monkeypatch):
    """The decoder takes the chunked path on its own for long packed rows; switching chunking off (the dense mask)
    gives the same logits and weight gradients."""
    V, T, lengths = 53, 768, ((256, 256, 256), (100, 156, 256, 200, 56))
    doc_ids = ids_of(*lengths)
    positions = torch.cat([torch.cat([torch.arange(n) for n in lens]) for lens in lengths])
    positions = positions.view(2, T)
    tokens = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    calls = []
    real = masks.document_chunks
    results = []
    for share in (masks.CHUNKED_SHARE, 0.0):
        monkeypatch.setattr(masks, "CHUNKED_SHARE", share)
        torch.manual_seed(0)
        model = Decoder(DecoderConfig.from_preset("tiny", V, n_kv_heads=2, max_seq_len=T))
        use_attention(model, kernel)
        calls.append(real(doc_ids) is not None)
        logits = model(tokens, positions=positions, doc_ids=doc_ids)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert calls == [True, False]  # chunked, then dense
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)
