"""TritonAttentionBackend against dense causal attention (torch SDPA) over each full sequence.

The cache starts filled with NaN, so a slot the backend reads without having written it
(or without the prefix having been put there) poisons the output. Without CUDA the kernels
run in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is imported; see
tests/test_triton_kernels.py).
"""


import torch

import pytest

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from pipeline_infer.cache.kv_pool import KVPool  # noqa: E402
from pipeline_infer.forward_batch import ForwardBatch  # noqa: E402
from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pipeline_infer.kernels.triton.decode_attention import _decode_split_kernel  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.layers import attention as attention_layer  # noqa: E402
from pipeline_infer.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cpu" if is_interpreted(_decode_split_kernel) else "cuda"
NUM_LAYERS = 2


class Sequences:
    """Dense K/V of a few sequences, and their pages in a KV pool, grown step by step."""

    def __init__(self, pool: KVPool, gen: torch.Generator):
        self.pool, self.gen = pool, gen
        self.k: list[list[torch.Tensor]] = []  # [seq][layer] -> [len, Hkv, D]
        self.v: list[list[torch.Tensor]] = []
        self.pages: list[list[int]] = []

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(DEVICE)

    def add_cached(self, prefix_len: int) -> None:
        """A sequence whose first prefix_len tokens are already in the cache (a radix hit)."""
        p = self.pool
        self.k.append([self.rand(prefix_len, p.num_kv_heads, p.head_dim) for _ in range(NUM_LAYERS)])
        self.v.append([self.rand(prefix_len, p.num_kv_heads, p.head_dim) for _ in range(NUM_LAYERS)])
        self.pages.append([])
        self._reserve(len(self.k) - 1, prefix_len)
        slots = self.slots(len(self.k) - 1, 0, prefix_len)
        for layer in range(NUM_LAYERS):
            kf, vf = p.view_flat(layer)
            kf[slots], vf[slots] = self.k[-1][layer].to(kf.dtype), self.v[-1][layer].to(vf.dtype)

    def _reserve(self, b: int, length: int) -> None:
        need = self.pool.pages_for(length) - len(self.pages[b])
        if need > 0:
            got = self.pool.allocator.alloc(need)
            assert got is not None
            self.pages[b] += got

    def slots(self, b: int, start: int, end: int) -> torch.Tensor:
        ps = self.pool.page_size
        pos = torch.arange(start, end)
        return (torch.tensor(self.pages[b], dtype=torch.int64)[pos // ps] * ps + pos % ps).to(DEVICE)

    def step(self, extend_lens: list[int]) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        """A batch adding extend_lens[b] tokens to sequence b; returns it and the new K/V of layer 1."""
        prefix_lens = [self.k[b][0].shape[0] for b in range(len(extend_lens))]
        new_k, new_v, locs, positions = [], [], [], []
        for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
            self._reserve(b, p + e)
            nk = [self.rand(e, self.pool.num_kv_heads, self.pool.head_dim) for _ in range(NUM_LAYERS)]
            nv = [self.rand(e, self.pool.num_kv_heads, self.pool.head_dim) for _ in range(NUM_LAYERS)]
            self.k[b] = [torch.cat([old, n]) for old, n in zip(self.k[b], nk)]
            self.v[b] = [torch.cat([old, n]) for old, n in zip(self.v[b], nv)]
            new_k.append(nk[1])
            new_v.append(nv[1])
            locs.append(self.slots(b, p, p + e))
            positions.append(torch.arange(p, p + e))
        max_pages = max(len(pg) for pg in self.pages) + 1
        table = torch.zeros((len(extend_lens), max_pages), dtype=torch.int32)
        for b in range(len(extend_lens)):
            table[b, : len(self.pages[b])] = torch.tensor(self.pages[b], dtype=torch.int32)
        t = sum(extend_lens)
        batch = ForwardBatch(
            input_ids=torch.zeros(t, dtype=torch.int64, device=DEVICE),
            positions=torch.cat(positions).to(DEVICE),
            extend_lens=extend_lens,
            prefix_lens=prefix_lens,
            page_table=table.to(DEVICE),
            out_cache_loc=torch.cat(locs),
            logits_indices=torch.tensor([t - 1], device=DEVICE),
        )
        return batch, torch.cat(new_k), torch.cat(new_v)


def dense_reference(seqs: Sequences, q: torch.Tensor, batch: ForwardBatch, scale: float, layer: int) -> torch.Tensor:
    out, row = [], 0
    for b, (p, e) in enumerate(zip(batch.prefix_lens, batch.extend_lens)):
        qb = q[row : row + e].transpose(0, 1)  # [Hq, e, D]
        group = q.shape[1] // seqs.k[b][layer].shape[1]
        kb = seqs.k[b][layer].repeat_interleave(group, dim=1).transpose(0, 1)
        vb = seqs.v[b][layer].repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.arange(p + e, device=q.device)[None, :] <= (p + torch.arange(e, device=q.device))[:, None]
        out.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale).transpose(0, 1))
        row += e
    return torch.cat(out)


def make_pool(page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> KVPool:
    pool = KVPool(NUM_LAYERS, 20 + 700 // page_size, page_size, num_kv_heads, head_dim, dtype, DEVICE)
    for layer in range(NUM_LAYERS):
        pool.k_cache[layer].fill_(float("nan"))
        pool.v_cache[layer].fill_(float("nan"))
    return pool


@pytest.mark.parametrize(
    "page_size,num_q_heads,num_kv_heads,head_dim", [(16, 4, 2, 64), (1, 7, 1, 64), (4, 8, 1, 128)]
)
def test_mixed_batch_then_decode_steps_match_dense_attention(
    page_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    gen = torch.Generator().manual_seed(page_size * 100 + num_q_heads)
    pool = make_pool(page_size, num_kv_heads, head_dim)
    # 16 SMs: a 4-sequence decode batch is too small to fill them, so the backend splits the KV.
    backend = TritonAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim, num_sms=16)
    seqs = Sequences(pool, gen)
    for prefix in (0, 21, 30, 600):  # a new prompt, two radix hits, a long sequence in decode
        seqs.add_cached(prefix)
    scale = head_dim**-0.5

    # Step 1: prefill + chunked prefill + decode rows in one batch: the extend kernel.
    batch, k, v = seqs.step([9, 5, 1, 1])
    assert not batch.is_decode
    backend.plan(batch)
    q = seqs.rand(batch.num_tokens, num_q_heads, head_dim)
    out = backend.forward(q, k, v, 1, batch, scale)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_reference(seqs, q, batch, scale, 1), rtol=1e-4, atol=1e-4)
    kf, vf = pool.view_flat(1)
    assert torch.equal(kf[batch.out_cache_loc], k) and torch.equal(vf[batch.out_cache_loc], v)
    assert torch.isnan(pool.view_flat(0)[0][batch.out_cache_loc]).all(), "another layer's cache was written"

    # Steps 2-3: decode only, with the long sequence making the backend split the KV length.
    for _ in range(2):
        batch, k, v = seqs.step([1, 1, 1, 1])
        backend.plan(batch)
        assert batch.is_decode and batch.attn_metadata.num_kv_splits > 1
        q = seqs.rand(batch.num_tokens, num_q_heads, head_dim)
        out = backend.forward(q, k, v, 1, batch, scale)
        torch.testing.assert_close(out, dense_reference(seqs, q, batch, scale, 1), rtol=1e-4, atol=1e-4)


def test_plan_builds_int32_metadata() -> None:
    pool = make_pool(16, 2, 64)
    backend = TritonAttentionBackend(pool, 4, 2, 64)
    seqs = Sequences(pool, torch.Generator().manual_seed(0))
    seqs.add_cached(0)
    seqs.add_cached(40)
    batch, _, _ = seqs.step([7, 3])
    batch.page_table = batch.page_table.long()  # the backend converts what the runner gives it
    backend.plan(batch)
    md = batch.attn_metadata
    assert md.qo_indptr.tolist() == [0, 7, 10] and md.seq_lens.tolist() == [7, 43] and md.prefix_lens.tolist() == [0, 40]
    assert md.page_table.dtype == torch.int32 and md.max_extend_len == 7 and not md.is_decode
    # 4 q / 2 kv heads of 64: 32 tokens per extend block, so one block per sequence.
    assert md.block_seq.tolist() == [0, 1] and md.block_start.tolist() == [0, 0]
    for t in (md.qo_indptr, md.seq_lens, md.prefix_lens, md.block_seq, md.block_start):
        assert t.dtype == torch.int32
    batch, _, _ = seqs.step([1, 1])
    backend.plan(batch)
    assert batch.attn_metadata.is_decode and batch.attn_metadata.block_seq is None


def test_extend_work_list_with_several_blocks_and_empty_rows() -> None:
    # Qwen2.5-0.5B's heads (14 q / 2 kv, 9 tokens per block): a 40-token extend spans 5 blocks,
    # sequences adding nothing get none, and decode rows one each.
    gen = torch.Generator().manual_seed(3)
    pool = make_pool(16, 2, 64)
    backend = TritonAttentionBackend(pool, 14, 2, 64, num_sms=16)
    seqs = Sequences(pool, gen)
    for prefix in (5, 0, 30, 12):
        seqs.add_cached(prefix)
    batch, k, v = seqs.step([0, 40, 1, 0])
    backend.plan(batch)
    md = batch.attn_metadata
    assert md.block_seq.tolist() == [1] * 5 + [2] and md.block_start.tolist() == [0, 9, 18, 27, 36, 0]
    q = seqs.rand(batch.num_tokens, 14, 64)
    out = backend.forward(q, k, v, 1, batch, 64**-0.5)
    torch.testing.assert_close(out, dense_reference(seqs, q, batch, 64**-0.5, 1), rtol=1e-4, atol=1e-4)


def test_constructor_rejects_shapes_that_do_not_match_the_pool() -> None:
    pool = make_pool(16, 2, 64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TritonAttentionBackend(pool, 4, 1, 64)
    with pytest.raises(ValueError, match="multiple"):
        TritonAttentionBackend(pool, 3, 2, 64)


@pytest.mark.parametrize(
    "page_size,num_q_heads,num_kv_heads,head_dim,rotary_dim,dtype",
    [(16, 14, 2, 64, 64, torch.float32), (1, 4, 4, 128, 64, torch.float32), (16, 4, 2, 64, 64, torch.bfloat16)],
    ids=["gqa", "partial-rotary-page1", "bf16"],
)
def test_forward_with_rope_matches_rotary_then_forward(
    page_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype
) -> None:
    # Two pools with the same cached prefixes: one backend takes the fused path, the other
    # rotates first (the layer's unfused path) and stores with store_kv.
    gen = torch.Generator().manual_seed(page_size + num_q_heads + rotary_dim)
    pool = make_pool(page_size, num_kv_heads, head_dim, dtype)
    seqs = Sequences(pool, gen)
    for prefix in (0, 21, 300):
        seqs.add_cached(prefix)
    twin = make_pool(page_size, num_kv_heads, head_dim, dtype)
    for layer in range(NUM_LAYERS):
        twin.k_cache[layer].copy_(pool.k_cache[layer])
        twin.v_cache[layer].copy_(pool.v_cache[layer])
    fused = TritonAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim, num_sms=16)
    unfused = TritonAttentionBackend(twin, num_q_heads, num_kv_heads, head_dim, num_sms=16)
    rope = RotaryEmbedding(head_dim, rotary_dim, 1024, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)
    scale = head_dim**-0.5
    # The interpreter truncates fp32 -> bf16 where torch's rotary rounds (< 1 ulp).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)

    for extend_lens in ([9, 5, 1], [1, 1, 1]):  # a mixed extend step, then a decode step
        batch, _, _ = seqs.step(extend_lens)
        fused.plan(batch)  # the metadata depends on the batch only, so both backends share it
        t = batch.num_tokens
        qkv = seqs.rand(t, (num_q_heads + 2 * num_kv_heads) * head_dim).to(dtype)
        q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k, v = q.view(t, num_q_heads, head_dim), k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim)

        out = fused.forward_with_rope(q, k, v, rope, 1, batch, scale)
        q_rot, k_rot = rope(batch.positions, q, k)
        expected = unfused.forward(q_rot, k_rot, v, 1, batch, scale)

        assert out.shape == expected.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, **tol)
        for layer in range(NUM_LAYERS):  # every slot of both layers, the untouched NaN ones too
            torch.testing.assert_close(pool.k_cache[layer], twin.k_cache[layer], equal_nan=True, **tol)
            torch.testing.assert_close(pool.v_cache[layer], twin.v_cache[layer], equal_nan=True, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: PagedAttention takes the fused path on CUDA only")
def test_paged_attention_takes_the_fused_path_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # The layer as the model runs it (bf16, fused qkv in, Qwen2.5-0.5B heads) against its unfused path.
    gen = torch.Generator().manual_seed(11)
    pool, twin = make_pool(16, 2, 64, torch.bfloat16), make_pool(16, 2, 64, torch.bfloat16)
    seqs = Sequences(pool, gen)
    for prefix in (0, 40):
        seqs.add_cached(prefix)
    for layer in range(NUM_LAYERS):
        twin.k_cache[layer].copy_(pool.k_cache[layer])
        twin.v_cache[layer].copy_(pool.v_cache[layer])
    fused, unfused = TritonAttentionBackend(pool, 14, 2, 64), TritonAttentionBackend(twin, 14, 2, 64)
    rope = RotaryEmbedding(64, 64, 1024, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)
    attn = attention_layer.PagedAttention(1, 14, 2, 64, rope)
    calls = []
    fused_forward_with_rope = fused.forward_with_rope
    monkeypatch.setattr(fused, "forward_with_rope", lambda *a: calls.append(1) or fused_forward_with_rope(*a))
    for extend_lens in ([9, 1], [1, 1]):
        batch, _, _ = seqs.step(extend_lens)
        fused.plan(batch)
        qkv = seqs.rand(batch.num_tokens, (14 + 2 * 2) * 64).to(torch.bfloat16)
        batch.attn_backend = fused
        out = attn(qkv, batch)
        with monkeypatch.context() as m:  # the unfused path: rotary, then forward
            m.setattr(attention_layer, "use_triton", lambda x: False)
            batch.attn_backend = unfused
            expected = attn(qkv, batch)
        # Both paths rotate with the same code (rotary.rotate_heads), so this should be exact; the
        # tolerance allows a q/k element one bf16 ulp off, a few ulps once through attention.
        torch.testing.assert_close(out, expected, rtol=3e-2, atol=3e-2)
        for layer in range(NUM_LAYERS):
            torch.testing.assert_close(pool.k_cache[layer], twin.k_cache[layer], equal_nan=True, rtol=2**-7, atol=1e-5)
            torch.testing.assert_close(pool.v_cache[layer], twin.v_cache[layer], equal_nan=True, rtol=0, atol=0)
    assert len(calls) == 2
