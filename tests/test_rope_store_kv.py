"""rope_store_kv (rotary on q and k plus the K/V store, one kernel) against rotate-then-store in torch.

The reference rotates with the torch rotary code (pipeline_infer/layers/rotary.py) and writes
the cache by index_put. q, k and v come in as the model holds them: strided views of one fused
qkv projection. The caches start as NaN, so a slot written that should not have been (or one
missed) shows up. Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 is
set before triton is imported; see tests/conftest.py).
"""


import torch

import pytest

pytest.importorskip("triton")

from pipeline_infer.cache.kv_pool import KVPool  # noqa: E402
from pipeline_infer.forward_batch import ForwardBatch  # noqa: E402
from pipeline_infer.kernels.attention.base import forward_with_rope  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.kernels.triton.rope_store_kv import _rope_store_kv_kernel, rope_store_kv  # noqa: E402
from pipeline_infer.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRETED = is_interpreted(_rope_store_kv_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
MAX_POSITION = 4096


def rotary(head_dim: int, rotary_dim: int) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, rotary_dim, MAX_POSITION, {"rope_type": "default", "rope_theta": 1e6}).to(DEVICE)


def fused_qkv(gen: torch.Generator, num_tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as strided views of one [T, (hq + 2 hkv) * D] projection output, split as PagedAttention does."""
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    return qkv, q.reshape(num_tokens, hq, head_dim), k.reshape(num_tokens, hkv, head_dim), v.reshape(num_tokens, hkv, head_dim)


def nan_pool(page_size: int, num_slots: int, hkv: int, head_dim: int, dtype: torch.dtype) -> KVPool:
    pool = KVPool(2, num_slots // page_size, page_size, hkv, head_dim, dtype, DEVICE)
    for cache in pool.k_cache + pool.v_cache:
        cache.fill_(float("nan"))
    return pool


def tolerance(dtype: torch.dtype) -> dict:
    # The interpreter truncates fp32 -> bf16 where torch rounds to nearest, and compiled
    # Triton may fuse the rotation's multiply-adds: within one bf16 ulp.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(14, 2), (4, 4)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64), (80, 40)], ids=["full", "half", "odd-sizes"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    "dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["fp32", "bf16", "fp32-into-bf16"],
)
def test_matches_rotate_then_store(
    hq: int, hkv: int, head_dim: int, rotary_dim: int, page_size: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(hq * 1000 + head_dim * 10 + rotary_dim + page_size)
    num_tokens, num_slots = 7, 32
    rope = rotary(head_dim, rotary_dim)
    qkv, q, k, v = fused_qkv(gen, num_tokens, hq, hkv, head_dim, dtype)
    qkv_before = qkv.clone()
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    loc = torch.randperm(num_slots, generator=gen)[:num_tokens].to(DEVICE)  # slots out of order
    pool = nan_pool(page_size, num_slots, hkv, head_dim, cache_dtype)
    k_flat, v_flat = pool.view_flat(1)
    k_exp, v_exp = k_flat.clone(), v_flat.clone()
    exp_q, exp_k = rope.rotate_heads(positions, q), rope.rotate_heads(positions, k)
    k_exp[loc], v_exp[loc] = exp_k.to(cache_dtype), v.to(cache_dtype)

    q_out = rope_store_kv(q, k, v, positions, rope.cos_sin_cache, k_flat, v_flat, loc)

    assert q_out.shape == q.shape and q_out.dtype == dtype and q_out.is_contiguous()
    torch.testing.assert_close(q_out, exp_q, **tolerance(dtype))
    if rotary_dim < head_dim:  # the dims past rotary_dim are copied bit for bit
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
    torch.testing.assert_close(k_flat, k_exp, equal_nan=True, **tolerance(cache_dtype))
    # v is only copied (and cast): exact except for the interpreter's bf16 truncation.
    v_tol = tolerance(cache_dtype) if INTERPRETED and cache_dtype != dtype else dict(rtol=0, atol=0)
    torch.testing.assert_close(v_flat, v_exp, equal_nan=True, **v_tol)
    untouched = num_slots - num_tokens
    assert torch.isnan(k_flat).sum() == torch.isnan(v_flat).sum() == untouched * hkv * head_dim
    assert all(torch.isnan(c).all() for c in (pool.k_cache[0], pool.v_cache[0])), "another layer's cache was written"
    assert torch.equal(qkv, qkv_before), "the inputs were written"


def test_int32_indices_and_a_padded_cache_row() -> None:
    # int32 positions/slots; the cache rows with a head stride wider than head_dim (a view of a larger buffer).
    gen = torch.Generator().manual_seed(5)
    rope = rotary(64, 64)
    _, q, k, v = fused_qkv(gen, 5, 4, 2, 64, torch.float32)
    positions = torch.tensor([0, 4095, 17, 17, 1], dtype=torch.int32, device=DEVICE)
    loc = torch.tensor([9, 2, 15, 0, 7], dtype=torch.int32, device=DEVICE)
    k_buf = torch.full((16, 2, 96), float("nan"), device=DEVICE)
    v_buf = torch.full((16, 2, 96), float("nan"), device=DEVICE)
    q_out = rope_store_kv(q, k, v, positions, rope.cos_sin_cache, k_buf[..., :64], v_buf[..., :64], loc)
    torch.testing.assert_close(q_out, rope.rotate_heads(positions.long(), q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_buf[loc.long(), :, :64], rope.rotate_heads(positions.long(), k), rtol=1e-5, atol=1e-5)
    assert torch.equal(v_buf[loc.long(), :, :64], v)
    assert torch.isnan(k_buf[..., 64:]).all() and torch.isnan(v_buf[..., 64:]).all(), "wrote past head_dim"
    torch.testing.assert_close(q_out[0], q[0], rtol=0, atol=1e-6)  # position 0 is the identity


def test_empty_batch_writes_nothing() -> None:
    rope = rotary(64, 64)
    _, q, k, v = fused_qkv(torch.Generator().manual_seed(0), 0, 4, 2, 64, torch.float32)
    pool = nan_pool(16, 32, 2, 64, torch.float32)
    k_flat, v_flat = pool.view_flat(0)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    q_out = rope_store_kv(q, k, v, empty, rope.cos_sin_cache, k_flat, v_flat, empty)
    assert q_out.shape == (0, 4, 64)
    assert torch.isnan(k_flat).all() and torch.isnan(v_flat).all()


def test_bad_arguments_raise_clear_errors() -> None:
    rope = rotary(64, 64)
    _, q, k, v = fused_qkv(torch.Generator().manual_seed(0), 3, 4, 2, 64, torch.float32)
    pos = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    kc, vc = torch.zeros(8, 2, 64, device=DEVICE), torch.zeros(8, 2, 64, device=DEVICE)
    cs = rope.cos_sin_cache

    def call(**override):
        args = dict(q=q, k=k, v=v, positions=pos, cos_sin_cache=cs, k_cache_flat=kc, v_cache_flat=vc, out_cache_loc=pos)
        args.update(override)
        return rope_store_kv(**args)

    with pytest.raises(TypeError, match="^q must have dtype"):
        call(q=q.to(torch.int32))
    with pytest.raises(TypeError, match="^v_cache_flat must have dtype"):
        call(v_cache_flat=vc.to(torch.int8))
    with pytest.raises(TypeError, match="^positions must have dtype"):
        call(positions=pos.float())
    with pytest.raises(TypeError, match="^out_cache_loc must have dtype"):
        call(out_cache_loc=pos.float())
    with pytest.raises(TypeError, match="^cos_sin_cache must have dtype"):
        call(cos_sin_cache=cs.double())
    with pytest.raises(ValueError, match="^k must be 3-D"):
        call(k=k.reshape(3, -1))
    with pytest.raises(ValueError, match="^v must be 3-D .* contiguous last dim"):
        call(v=v.transpose(1, 2))
    with pytest.raises(ValueError, match="q, k and v must share"):
        call(k=k[:2])
    with pytest.raises(ValueError, match="q, k and v must share"):
        call(v=v[:, :1])
    with pytest.raises(ValueError, match="k_cache_flat .* must be"):
        call(k_cache_flat=kc[:, :1])
    with pytest.raises(ValueError, match="k_cache_flat .* must be"):
        call(v_cache_flat=vc[:4])
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        call(cos_sin_cache=cs[:, :63])
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        call(cos_sin_cache=torch.zeros(16, 66, device=DEVICE))
    with pytest.raises(ValueError, match="^cos_sin_cache must be 2-D"):
        call(cos_sin_cache=cs[None])
    with pytest.raises(ValueError, match=r"^positions must have shape \(3,\)"):
        call(positions=pos[:2])
    with pytest.raises(ValueError, match=r"^out_cache_loc must have shape \(3,\)"):
        call(out_cache_loc=pos[None])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            call(positions=pos.cpu())


# ---------------------------------------------------------------- backend dispatch (base.forward_with_rope)


class Recorder:
    """A backend that records what it was given and returns q."""

    def __init__(self, fuses_rope: bool | None):
        if fuses_rope is not None:
            self.fuses_rope = fuses_rope
        self.calls: list[tuple[str, tuple]] = []

    def forward(self, q, k, v, layer_id, batch, scale):
        self.calls.append(("forward", (q, k, v, layer_id, scale)))
        return q

    def forward_with_rope(self, q, k, v, rotary, layer_id, batch, scale):
        self.calls.append(("forward_with_rope", (q, k, v, rotary, layer_id, scale)))
        return q


@pytest.mark.parametrize("fuses_rope", [None, False, True], ids=["no-attribute", "false", "true"])
def test_forward_with_rope_dispatch(fuses_rope: bool | None) -> None:
    rope = rotary(64, 64)
    _, q, k, v = fused_qkv(torch.Generator().manual_seed(1), 3, 4, 2, 64, torch.float32)
    positions = torch.tensor([5, 0, 9], device=DEVICE)
    batch = ForwardBatch(
        input_ids=positions, positions=positions, extend_lens=[3], prefix_lens=[0],
        page_table=torch.zeros(1, 1, dtype=torch.int32), out_cache_loc=positions, logits_indices=positions[:1],
    )
    backend = Recorder(fuses_rope)
    forward_with_rope(backend, q, k, v, rope, 7, batch, 0.5)
    [(method, args)] = backend.calls
    if fuses_rope:  # the backend gets q/k as they are, and the rotary to apply itself
        assert method == "forward_with_rope" and args[0] is q and args[1] is k and args[2] is v
        assert args[3:] == (rope, 7, 0.5)
    else:  # rotate, then the plain forward; v passes through as the strided view it is
        assert method == "forward" and args[2] is v and args[3:] == (7, 0.5)
        exp_q, exp_k = rope(positions, q, k)
        assert torch.equal(args[0], exp_q) and torch.equal(args[1], exp_k)
