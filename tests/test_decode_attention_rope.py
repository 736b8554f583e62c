"""decode_attention with `rope`: the rotary and the new token's K/V store inside the decode kernel.

Reference: rotate q and k with the torch rotary code, write k and v into the cache by index,
then the torch decode-attention reference. The new token's cache slot starts as NaN (as does
every unused slot), so a kernel that reads it before writing it, or writes it in the wrong
place, fails. q, k and v are strided views of one fused qkv projection, as the model passes
them. Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported).
"""


import torch

import pytest

pytest.importorskip("triton")

from pipeline_infer.kernels import reference as ref  # noqa: E402
from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pipeline_infer.kernels.triton import decode_attention as decode_module  # noqa: E402
from pipeline_infer.kernels.triton.decode_attention import DecodeRope, _decode_split_kernel, decode_attention  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETED = is_interpreted(_decode_split_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
MAX_POSITION = 2048


def _case(seed, seq_lens, page_size, hq, hkv, head_dim, rotary_dim, dtype):
    """Caches with every sequence's first len - 1 keys in shuffled pages (the rest NaN), and the step's inputs."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + sum(pages_per_seq) + 2
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    table = torch.zeros((len(seq_lens), max(pages_per_seq) + 1), dtype=torch.int32)
    shape = (num_pages, page_size, hkv, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    slots = []
    for b, n in enumerate(seq_lens):
        pages = torch.tensor([order.pop() for _ in range(pages_per_seq[b])])
        table[b, : len(pages)] = pages.to(torch.int32)
        pos = torch.arange(n - 1)
        k_cache[pages[pos // page_size], pos % page_size] = torch.randn(n - 1, hkv, head_dim, generator=gen).to(dtype)
        v_cache[pages[pos // page_size], pos % page_size] = torch.randn(n - 1, hkv, head_dim, generator=gen).to(dtype)
        slots.append(int(pages[(n - 1) // page_size]) * page_size + (n - 1) % page_size)
    qkv = torch.randn(len(seq_lens), (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    B = len(seq_lens)
    rope = RotaryEmbedding(head_dim, rotary_dim, MAX_POSITION, {"rope_type": "default", "rope_theta": 1e4})
    to = dict(device=DEVICE)
    return dict(
        q=q.reshape(B, hq, head_dim).to(**to), k=k.reshape(B, hkv, head_dim).to(**to), v=v.reshape(B, hkv, head_dim).to(**to),
        k_cache=k_cache.to(**to), v_cache=v_cache.to(**to), table=table.to(**to),
        lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        positions=torch.tensor([n - 1 for n in seq_lens], device=DEVICE),
        slots=torch.tensor(slots, dtype=torch.int32, device=DEVICE), rope=rope.to(DEVICE),
    )


def _reference(c, scale):
    """(output, k_cache, v_cache) by rotate -> store -> attend in torch."""
    rope, page_size = c["rope"], c["k_cache"].shape[1]
    q = rope.rotate_heads(c["positions"], c["q"])
    k = rope.rotate_heads(c["positions"], c["k"])
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    pages, offs = c["slots"].long() // page_size, c["slots"].long() % page_size
    k_cache[pages, offs] = k.to(k_cache.dtype)
    v_cache[pages, offs] = c["v"].to(v_cache.dtype)
    out = ref.decode_attention_ref(q.to(k_cache.dtype), k_cache, v_cache, c["table"], c["lens"], scale)
    return out, k_cache, v_cache


def _fused(c, scale, splits):
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    rope = DecodeRope(c["k"], c["v"], c["positions"], c["rope"].cos_sin_cache, c["slots"])
    out = decode_attention(c["q"], k_cache, v_cache, c["table"], c["lens"], scale, splits, rope=rope)
    return out, k_cache, v_cache


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    "hq,hkv,head_dim,rotary_dim", [(14, 2, 64, 64), (4, 4, 64, 64), (4, 2, 128, 64)], ids=["gqa7", "mha", "partial"]
)
def test_fused_rope_decode_matches_rotate_store_attend(splits, page_size, hq, hkv, head_dim, rotary_dim):
    # Lengths 1 (the new token alone), inside a page, at a page edge, and over several splits.
    c = _case(splits or 0 + page_size, [1, 7, 16, 17, 90], page_size, hq, hkv, head_dim, rotary_dim, torch.float32)
    scale = head_dim**-0.5
    exp_out, exp_k, exp_v = _reference(c, scale)
    q_before = c["q"].clone()
    out, k_cache, v_cache = _fused(c, scale, splits)
    torch.testing.assert_close(out, exp_out, rtol=1e-4, atol=1e-5)
    # The new keys and values are in the cache (for the next steps), and nothing else was written.
    torch.testing.assert_close(k_cache, exp_k, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(v_cache, exp_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(c["q"], q_before), "q (a view of the projection's output) was written"


@pytest.mark.parametrize("splits", [1, 3])
def test_the_batch_fastest_grid_rotates_stores_and_attends_the_same(monkeypatch, splits):
    """decode_attention.HEADS_FASTEST off (a row's kv heads a batch apart in launch order) changes
    the launch order only: the same output and cache writes as rotate -> store -> attend."""
    monkeypatch.setattr(decode_module, "HEADS_FASTEST", False)
    test_fused_rope_decode_matches_rotate_store_attend(splits, 16, 14, 2, 64, 64)
    test_fused_rope_decode_matches_rotate_store_attend(splits, 1, 4, 2, 128, 64)


def test_fused_rope_decode_bf16():
    c = _case(5, [33, 120, 1, 64], 16, 14, 2, 64, 64, torch.bfloat16)
    exp_out, exp_k, _ = _reference(c, 0.125)
    out, k_cache, _ = _fused(c, 0.125, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exp_out.float(), rtol=2e-2, atol=2e-2)
    # Keys: one rounding of the fp32 rotation (the interpreter truncates instead: one ulp).
    torch.testing.assert_close(k_cache.float(), exp_k.float(), rtol=2**-7, atol=1e-5, equal_nan=True)


def test_backend_decode_with_rope_equals_the_unfused_path():
    """TritonAttentionBackend.forward_with_rope: the fused decode equals rope_store_kv + attention."""
    from pipeline_infer.cache.kv_pool import KVPool
    from pipeline_infer.forward_batch import ForwardBatch

    gen = torch.Generator().manual_seed(9)
    seq_lens, page_size, hq, hkv, d = [5, 20, 1], 4, 14, 2, 64
    pool = KVPool(2, 16, page_size, hkv, d, torch.float32, DEVICE)
    for cache in pool.k_cache + pool.v_cache:
        cache.copy_(torch.randn(cache.shape, generator=gen))
    table = torch.tensor([[1, 2, 0, 0, 0], [3, 4, 5, 6, 7], [8, 0, 0, 0, 0]], dtype=torch.int32)
    slots = [int(table[b, (n - 1) // page_size]) * page_size + (n - 1) % page_size for b, n in enumerate(seq_lens)]
    rope = RotaryEmbedding(d, d, MAX_POSITION, {"rope_type": "default", "rope_theta": 1e4}).to(DEVICE)
    qkv = torch.randn(3, (hq + 2 * hkv) * d, generator=gen).to(DEVICE)
    q, k, v = (t.reshape(3, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))

    def run(fused: bool):
        backend = TritonAttentionBackend(pool, hq, hkv, d)
        backend.decode_rope_in_attention = fused
        batch = ForwardBatch(
            input_ids=torch.zeros(3, dtype=torch.long, device=DEVICE),
            positions=torch.tensor([n - 1 for n in seq_lens], device=DEVICE),
            extend_lens=[1, 1, 1], prefix_lens=[n - 1 for n in seq_lens],
            page_table=table.to(DEVICE), page_table_host=table.numpy(),
            out_cache_loc=torch.tensor(slots, device=DEVICE), logits_indices=torch.arange(3, device=DEVICE),
            attn_backend=backend,
        )
        saved = [c.clone() for c in pool.k_cache + pool.v_cache]
        backend.plan(batch)
        out = backend.forward_with_rope(q, k, v, rope, 1, batch, d**-0.5)
        written = [c.clone() for c in pool.k_cache + pool.v_cache]
        for c, s in zip(pool.k_cache + pool.v_cache, saved):
            c.copy_(s)
        return out, written

    out_fused, caches_fused = run(True)
    out_plain, caches_plain = run(False)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches_fused, caches_plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_rope_arguments_name_the_problem():
    c = _case(1, [3, 4], 4, 4, 2, 64, 64, torch.float32)
    good = DecodeRope(c["k"], c["v"], c["positions"], c["rope"].cos_sin_cache, c["slots"])
    args = (c["q"], c["k_cache"], c["v_cache"], c["table"], c["lens"], 0.125)
    with pytest.raises(ValueError, match="rope.k must be"):
        decode_attention(*args, rope=good._replace(k=c["k"][:1]))
    with pytest.raises(ValueError, match="rope.out_cache_loc must have shape"):
        decode_attention(*args, rope=good._replace(out_cache_loc=c["slots"][:1]))
    with pytest.raises(TypeError, match="rope.positions must have dtype"):
        decode_attention(*args, rope=good._replace(positions=c["positions"].float()))
    with pytest.raises(ValueError, match="rope.cos_sin_cache must be"):
        decode_attention(*args, rope=good._replace(cos_sin_cache=c["rope"].cos_sin_cache[:, :63]))
