"""The transformers engine's per-sequence attention (service/engines/varlen_attention.py) against plain attention
computed sequence by sequence in float64, on packed batches shaped as transformers' continuous batching packs them:
decoding sequences (one query), whole prompts, chunked prefills and prompts whose prefix came from the cache."""

from __future__ import annotations

import math
from itertools import accumulate

import pytest

torch = pytest.importorskip("torch")

from service.engines import varlen_attention  # noqa: E402

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M's geometry: grouped heads, 3 queries per key/value head


def reference(q, k, v, scale):
    """q: [heads, lq, dim]; k, v: [kv_heads, lk, dim]; the last lq keys are the queries' own positions."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    lq, lk = q.shape[1], k.shape[1]
    scores = q @ k.transpose(1, 2) * scale
    allowed = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + lk - lq)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v  # [heads, lq, dim]


def packed(shapes, dtype, seed=0):
    """shapes: (queries, keys) per sequence. Returns query, key, value as transformers passes them, and cu_seq_lens."""
    g = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
    query = torch.randn(1, HEADS, total_q, DIM, generator=g).to(dtype)
    # The cache hands keys back as a transposed view of a [keys, kv_heads, dim] gather: keep that striding.
    key = torch.randn(total_k, KV_HEADS, DIM, generator=g).to(dtype).transpose(0, 1).unsqueeze(0)
    value = torch.randn(total_k, KV_HEADS, DIM, generator=g).to(dtype).transpose(0, 1).unsqueeze(0)
    cu_q = torch.tensor([0, *accumulate(s[0] for s in shapes)], dtype=torch.int32)
    cu_k = torch.tensor([0, *accumulate(s[1] for s in shapes)], dtype=torch.int32)
    return query, key, value, cu_q, cu_k


BATCHES = {
    "one decoding sequence": [(1, 77)],
    "decoding only, mixed lengths": [(1, 5), (1, 130), (1, 64), (1, 1)],
    "long decodes beside short ones": [(1, 40), (1, varlen_attention.LONG_DECODE_KEYS + 90), (1, 700), (1, 3)],
    "whole prompts": [(17, 17), (64, 64)],
    "chunked prefill and cached prefix beside decodes": [(1, 33), (48, 1078), (1, 600), (20, 52), (1, 2)],
    "padding sequences with no queries": [(1, 9), (5, 5), (0, 0), (0, 0)],
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_matches_per_sequence_attention(name, dtype, tolerance):
    shapes = BATCHES[name]
    query, key, value, cu_q, cu_k = packed(shapes, dtype)
    scale = 1 / math.sqrt(DIM)
    varlen_attention._last = None
    out, weights = varlen_attention.varlen_attention(None, query, key, value, None, scaling=scale,
                                                     cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    assert weights is None
    assert out.shape == (1, query.shape[2], HEADS, DIM) and out.dtype == dtype
    qb, kb = cu_q.tolist(), cu_k.tolist()
    for i, (lq, _) in enumerate(shapes):
        if lq == 0:
            continue
        want = reference(query[0, :, qb[i]:qb[i + 1]], key[0, :, kb[i]:kb[i + 1]], value[0, :, kb[i]:kb[i + 1]], scale)
        got = out[0, qb[i]:qb[i + 1]].transpose(0, 1).double()
        assert torch.allclose(got, want, atol=tolerance, rtol=tolerance), (name, i, (got - want).abs().max().item())


def test_every_layer_of_a_pass_reuses_the_plan_and_a_new_batch_gets_a_new_one():
    query, key, value, cu_q, cu_k = packed([(1, 7), (1, 9)], torch.float32)
    varlen_attention._last = None
    varlen_attention.varlen_attention(None, query, key, value, None, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    first = varlen_attention._last
    varlen_attention.varlen_attention(None, query, key, value, None, cu_seq_lens_q=cu_q.clone(), cu_seq_lens_k=cu_k.clone())
    assert varlen_attention._last is first
    query, key, value, cu_q, cu_k = packed([(1, 8), (1, 9)], torch.float32)
    varlen_attention.varlen_attention(None, query, key, value, None, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k)
    assert varlen_attention._last is not first


def test_refuses_a_call_outside_continuous_batching():
    query, key, value, _, _ = packed([(3, 3)], torch.float32)
    with pytest.raises(ValueError, match="continuous batching"):
        varlen_attention.varlen_attention(None, query, key, value, None)
