"""rope_store_kv: rotary on q and k, and the K/V store into the paged cache, in one kernel.

The unfused layer runs three kernels per step: the rotary (q and k to new buffers), a copy
making v contiguous (it is a strided slice of the fused qkv output), and store_kv. Here one
program per token reads q, k and v straight from their strided views of the fused qkv,
writes rotated q to a contiguous q_out for attention, and writes rotated k and raw v to the
token's cache slot, so k and v never go through an intermediate buffer. The rotation is the
rotary kernel's own code (rotary.rotate_heads), so both paths give the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, next_power_of_2
from pipeline_infer.kernels.triton.rotary import load_cos_sin, rotate_heads

INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, loc_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh,
    stride_ks, stride_kch, stride_vs, stride_vch, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, PASS: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Token index and slot times a stride can pass 2**31 elements on big batches / caches: widen first.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    cos, sin = load_cos_sin(cos_sin_ptr + pos * stride_cs, HALF, BLOCK_HALF)
    rotate_heads(
        q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * stride_qot, stride_qoh, cos, sin,
        NUM_Q_HEADS, HALF, PASS, BLOCK_QH, BLOCK_HALF, BLOCK_PASS,
    )
    rotate_heads(
        k_ptr + t * stride_kt, stride_kh, k_cache_ptr + slot * stride_ks, stride_kch, cos, sin,
        NUM_KV_HEADS, HALF, PASS, BLOCK_KH, BLOCK_HALF, BLOCK_PASS,
    )
    h = tl.arange(0, BLOCK_KH)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(
        v_cache_ptr + slot * stride_vs + h[:, None] * stride_vch + d[None, :], v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def rope_store_kv(
    q: torch.Tensor,  # [T, num_q_heads, head_dim], any token/head strides, contiguous last dim
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], likewise
    v: torch.Tensor,  # [T, num_kv_heads, head_dim], likewise
    positions: torch.Tensor,  # [T] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32: cos half, then sin half
    k_cache_flat: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache_flat: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    out_cache_loc: torch.Tensor,  # [T] int32/int64 slots
) -> torch.Tensor:  # rotated q: [T, num_q_heads, head_dim], contiguous, q's dtype
    """apply_rotary(q, k), then store_kv(rotated k, v): k_cache_flat[out_cache_loc[t]] = rotate(k[t]), etc."""
    check_launchable(_rope_store_kv_kernel, q, k, v, positions, cos_sin_cache, k_cache_flat, v_cache_flat, out_cache_loc)
    _check_args(q, k, v, positions, cos_sin_cache, k_cache_flat, v_cache_flat, out_cache_loc)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # torch.empty, not a pool: fine inside CUDA-graph capture (the graph's allocator keeps it).
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = cos_sin_cache.shape[1] // 2
    rest = head_dim - 2 * half
    _rope_store_kv_kernel[(num_tokens,)](
        q, k, v, q_out, k_cache_flat, v_cache_flat, positions, out_cache_loc, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1),
        k_cache_flat.stride(0), k_cache_flat.stride(1), v_cache_flat.stride(0), v_cache_flat.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half, PASS=rest,
        BLOCK_QH=next_power_of_2(num_q_heads), BLOCK_KH=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(half), BLOCK_PASS=next_power_of_2(max(rest, 1)),
        BLOCK_D=next_power_of_2(head_dim),
    )
    return q_out


def _check_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache_flat: torch.Tensor, v_cache_flat: torch.Tensor, out_cache_loc: torch.Tensor,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache_flat", k_cache_flat), ("v_cache_flat", v_cache_flat)):
        check_dtype(name, t, FLOAT_DTYPES)
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim] with a contiguous last dim, got {tuple(t.shape)}")
    check_dtype("cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    check_dtype("positions", positions, INDEX_DTYPES)
    check_dtype("out_cache_loc", out_cache_loc, INDEX_DTYPES)
    num_tokens, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"q, k and v must share T and head_dim, and k and v their shape: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k_cache_flat.shape != v_cache_flat.shape or k_cache_flat.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"k_cache_flat {tuple(k_cache_flat.shape)} and v_cache_flat {tuple(v_cache_flat.shape)} must be "
            f"[num_slots, {k.shape[1]}, {head_dim}] like k"
        )
    if cos_sin_cache.dim() != 2 or cos_sin_cache.stride(-1) != 1:
        raise ValueError(
            f"cos_sin_cache must be 2-D [max_position, rotary_dim] with a contiguous last dim, got {tuple(cos_sin_cache.shape)}"
        )
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim == 0 or rotary_dim % 2 != 0 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache's rotary_dim must be even and in [2, {head_dim}], got {rotary_dim}")
    for name, t in (("positions", positions), ("out_cache_loc", out_cache_loc)):
        if t.shape != (num_tokens,):
            raise ValueError(f"{name} must have shape ({num_tokens},), got {tuple(t.shape)}")
