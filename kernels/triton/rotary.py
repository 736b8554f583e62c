"""Rotary position embedding (neox / rotate-half style, as HF Llama and Qwen) for q and k.

The scaling variants (default, llama3, yarn) differ only in how the cos/sin table is built
(yarn's attention factor is folded into it), so one kernel serves them all. The table is
[max_position, rotary_dim] fp32: cos of each frequency in the first half, sin in the second.
Dims past rotary_dim (partial rotary) are copied unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, next_power_of_2


@triton.jit
def load_cos_sin(row_ptr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One position's cos and sin ([1, BLOCK_HALF] fp32, 0 past HALF) from its table row.

    Shared with the fused rotary + K/V store kernel (rope_store_kv.py).
    """
    offs_f = tl.arange(0, BLOCK_HALF)
    f_mask = offs_f < HALF
    cos = tl.load(row_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row_ptr + HALF + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def rotate_heads(
    src, s_h, dst, d_h, cos, sin,  # src/dst: the token's first head; s_h/d_h: their head strides
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate one token's heads in fp32 and store them in dst's dtype; dims past 2 * HALF are copied.

    Shared with the fused rotary + K/V store kernel (rope_store_kv.py), whose dst is a cache slot.
    """
    offs_h = tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_HALF)
    h_mask = offs_h < NUM_HEADS
    mask = h_mask[:, None] & (offs_f[None, :] < HALF)
    base = src + offs_h[:, None] * s_h
    x1 = tl.load(base + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
    out_base = dst + offs_h[:, None] * d_h
    # Both halves are loaded before either is stored, so dst may alias src (in place).
    tl.store(out_base + offs_f[None, :], (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(out_base + HALF + offs_f[None, :], (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)
    if PASS > 0:
        offs_p = tl.arange(0, BLOCK_PASS)
        p_mask = h_mask[:, None] & (offs_p[None, :] < PASS)
        rest = tl.load(base + 2 * HALF + offs_p[None, :], mask=p_mask, other=0.0)
        tl.store(out_base + 2 * HALF + offs_p[None, :], rest.to(dst.dtype.element_ty), mask=p_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = load_cos_sin(cos_sin_ptr + pos * stride_cs, HALF, BLOCK_HALF)
    rotate_heads(
        q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * stride_qot, stride_qoh, cos, sin,
        NUM_Q_HEADS, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
    )
    rotate_heads(
        k_ptr + t * stride_kt, stride_kh, k_out_ptr + t * stride_kot, stride_koh, cos, sin,
        NUM_K_HEADS, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
    )


def apply_rotary(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [T] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32: cos half, then sin half
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions. In place returns (q, k) themselves."""
    check_launchable(_rotary_kernel, q, k, positions, cos_sin_cache)
    check_dtype("q", q, FLOAT_DTYPES)
    check_dtype("k", k, FLOAT_DTYPES)
    check_dtype("cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    check_dtype("positions", positions, (torch.int32, torch.int64))
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [T, heads, head_dim] with equal T and head_dim, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin_cache.stride(1) != 1:
        raise ValueError("q, k and cos_sin_cache must have a contiguous last dim")
    num_tokens, num_q_heads, head_dim = q.shape
    rotary_dim = cos_sin_cache.shape[1]
    if cos_sin_cache.dim() != 2 or rotary_dim % 2 != 0 or rotary_dim > head_dim:
        raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim] with even rotary_dim <= {head_dim}, got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape ({num_tokens},), got {tuple(positions.shape)}")
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = k if inplace else torch.empty_like(k, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return q_out, k_out
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half, PASS=rest,
        BLOCK_H=next_power_of_2(max(num_q_heads, k.shape[1])), BLOCK_HALF=next_power_of_2(half),
        BLOCK_PASS=next_power_of_2(max(rest, 1)),
    )
    return q_out, k_out
