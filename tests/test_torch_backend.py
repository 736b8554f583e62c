"""The torch attention backend against dense float64 attention, on a ragged mixed batch."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.kernels.attention.torch_backend import TorchAttentionBackend, split_by_length


def dense_reference(q, k, v, prefix_len, scale):
    """q [n, Hq, D] at positions prefix..prefix+n-1; k/v [prefix+n, Hkv, D]: causal attention in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qpos = torch.arange(q.shape[0])[:, None] + prefix_len
    kpos = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (7, 1)])
@pytest.mark.parametrize(
    "shapes",
    [
        # (prefix already cached, new tokens): decodes and extends with and without prefixes
        [(0, 9), (13, 1), (30, 5), (0, 1), (47, 1), (5, 20)],
        # prefills from position 0 only, ragged (the causal fast path without a mask)
        [(0, 9), (0, 33), (0, 2), (0, 17), (0, 40)],
    ],
    ids=["mixed", "prefills"],
)
def test_mixed_batch_matches_dense(page_size, hq, hkv, shapes):
    rng = random.Random(page_size * 100 + hq)
    torch.manual_seed(rng.randrange(1 << 30))
    D, layers = 16, 2
    pool = KVPool(layers, 1 + 400 // page_size + len(shapes), page_size, hkv, D, torch.float32, "cpu")
    backend = TorchAttentionBackend(pool, hq, hkv, D)

    full_k, full_v, page_lists, slots, positions = [], [], [], [], []
    for prefix, new in shapes:
        total = prefix + new
        pages = pool.allocator.alloc(-(-total // page_size))
        rng.shuffle(pages)  # pages need not be contiguous or ordered
        page_lists.append(pages)
        kk, vv = torch.randn(total, hkv, D), torch.randn(total, hkv, D)
        full_k.append(kk)
        full_v.append(vv)
        s = [pages[p // page_size] * page_size + p % page_size for p in range(total)]
        k_flat, v_flat = pool.view_flat(1)
        k_flat[s[:prefix]] = kk[:prefix]  # the cached prefix is already in the pool
        v_flat[s[:prefix]] = vv[:prefix]
        slots.extend(s[prefix:])
        positions.extend(range(prefix, total))

    table = torch.zeros(len(shapes), max(len(p) for p in page_lists), dtype=torch.int32)
    for b, p in enumerate(page_lists):
        table[b, : len(p)] = torch.tensor(p)
    T = sum(n for _, n in shapes)
    batch = ForwardBatch(
        input_ids=torch.zeros(T, dtype=torch.long),
        positions=torch.tensor(positions),
        extend_lens=[n for _, n in shapes],
        prefix_lens=[p for p, _ in shapes],
        page_table=table,
        out_cache_loc=torch.tensor(slots),
        logits_indices=torch.zeros(0, dtype=torch.long),
        attn_backend=backend,
    )
    backend.plan(batch)
    q = torch.randn(T, hq, D)
    new_k = torch.cat([k[p:] for k, (p, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[p:] for v, (p, _) in zip(full_v, shapes)])
    out = backend.forward(q, new_k, new_v, layer_id=1, batch=batch, scale=D**-0.5)
    assert torch.isfinite(out).all()

    start = 0
    for b, (prefix, new) in enumerate(shapes):
        ref = dense_reference(q[start : start + new], full_k[b], full_v[b], prefix, D**-0.5)
        torch.testing.assert_close(out[start : start + new].double(), ref, atol=1e-5, rtol=1e-5)
        start += new
    # the new K/V landed in their slots
    k_flat, _ = pool.view_flat(1)
    torch.testing.assert_close(k_flat[torch.tensor(slots)], new_k)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (7, 1)])
@pytest.mark.parametrize("lengths", [[1, 300, 7, 150, 64, 2, 299, 33, 120, 5, 260, 17], [40, 41, 39], [77]])
def test_decode_batch_matches_dense(page_size, hq, hkv, lengths):
    """A pure decode batch (the CPU's hot path): ragged lengths, length buckets, GQA groups."""
    rng = random.Random(page_size * 1000 + hq * 10 + len(lengths))
    torch.manual_seed(rng.randrange(1 << 30))
    D = 16
    pool = KVPool(1, 1 + sum(-(-n // page_size) for n in lengths), page_size, hkv, D, torch.float32, "cpu")
    backend = TorchAttentionBackend(pool, hq, hkv, D)
    k_flat, v_flat = pool.view_flat(0)
    full_k, full_v, page_lists, slots = [], [], [], []
    for total in lengths:
        pages = pool.allocator.alloc(-(-total // page_size))
        rng.shuffle(pages)
        page_lists.append(pages)
        kk, vv = torch.randn(total, hkv, D), torch.randn(total, hkv, D)
        full_k.append(kk)
        full_v.append(vv)
        s = [pages[p // page_size] * page_size + p % page_size for p in range(total)]
        k_flat[s[:-1]] = kk[:-1]
        v_flat[s[:-1]] = vv[:-1]
        slots.append(s[-1])
    table = torch.zeros(len(lengths), max(len(p) for p in page_lists), dtype=torch.int32)
    for b, p in enumerate(page_lists):
        table[b, : len(p)] = torch.tensor(p)
    B = len(lengths)
    batch = ForwardBatch(
        input_ids=torch.zeros(B, dtype=torch.long),
        positions=torch.tensor([n - 1 for n in lengths]),
        extend_lens=[1] * B,
        prefix_lens=[n - 1 for n in lengths],
        page_table=table,
        page_table_host=table.numpy(),
        out_cache_loc=torch.tensor(slots),
        logits_indices=torch.arange(B),
        attn_backend=backend,
    )
    backend.plan(batch)
    if len(lengths) > 3:
        assert len(batch.attn_metadata.groups) > 1  # lengths this ragged get buckets
    q = torch.randn(B, hq, D)
    new_k = torch.stack([k[-1] for k in full_k])
    new_v = torch.stack([v[-1] for v in full_v])
    out = backend.forward(q, new_k, new_v, layer_id=0, batch=batch, scale=D**-0.5)
    assert out.shape == (B, hq, D)
    for b, n in enumerate(lengths):
        ref = dense_reference(q[b : b + 1], full_k[b], full_v[b], n - 1, D**-0.5)
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_flat[torch.tensor(slots)], new_k)


def test_split_by_length_buckets_cover_rows_once():
    lens = [300, 5, 290, 10, 150, 8, 295, 12]
    buckets = split_by_length(list(range(len(lens))), lens, [1] * len(lens))
    assert sorted(r for b in buckets for r in b) == list(range(len(lens)))
    assert len(buckets) > 1
    assert all(max(lens[r] for r in b) - min(lens[r] for r in b) < 200 for b in buckets)
    assert split_by_length([3, 1], [0, 50, 0, 52], [1] * 4) == [[3, 1]]  # alike: one bucket, order kept
    assert split_by_length([], [], []) == []
    # prefills (new tokens = sequence length) of very different lengths get buckets too
    assert len(split_by_length(list(range(8)), lens, lens)) > 1


def test_additive_masks_reach_sdpa_in_the_query_dtype(monkeypatch):
    """SDPA's cuDNN path (the default on Hopper) reads a float32 mask given with a bf16 query as
    bf16 and attends wrongly without an error (pytorch/pytorch#191612; on an H200 every decode of
    a bf16 engine on this backend went astray): every float mask must be in the query's dtype."""
    from pipeline_infer.kernels.attention import select, torch_backend

    seen = []
    sdpa = torch_backend.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        seen.append((q.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch_backend.F, "scaled_dot_product_attention", recording_sdpa)
    hq, hkv, D = 4, 2, 16
    pool = KVPool(2, 64, 4, hkv, D, torch.bfloat16, "cpu")
    backend = TorchAttentionBackend(pool, hq, hkv, D)
    # decodes of ragged lengths (padded: a mask) and extends with a cached prefix (a mask)
    batch = select._batch(pool, [5, 30, 11, 6], [1, 1, 4, 9], torch.Generator().manual_seed(0))
    batch.attn_backend = backend
    backend.plan(batch)
    T = sum(batch.extend_lens)
    for layer in range(2):
        q = torch.randn(T, hq, D, dtype=torch.bfloat16)
        kv = torch.randn(T, hkv, D, dtype=torch.bfloat16)
        backend.forward(q, kv, kv, layer_id=layer, batch=batch, scale=D**-0.5)
    masks = [m for _, m in seen if m is not None]
    assert len(masks) >= 2 and all(m in (torch.bool, torch.bfloat16) for m in masks), seen
    assert torch.bfloat16 in masks  # the decodes' additive mask, converted
