"""store_kv: write each new token's K and V rows into the paged cache at its slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, next_power_of_2


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, loc_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ks, stride_kch, stride_vs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM)
    # Token index times stride can pass 2**31 elements on big batches: widen first.
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + slot * stride_ks + h[:, None] * stride_kch + d[None, :], k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_vs + h[:, None] * stride_vch + d[None, :], v, mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache_flat: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache_flat: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    out_cache_loc: torch.Tensor,  # [T] int64 slots
) -> None:
    """k_cache_flat[out_cache_loc[t]] = k[t] (and the same for v), casting to the cache dtype."""
    check_launchable(_store_kv_kernel, k, v, k_cache_flat, v_cache_flat, out_cache_loc)
    for name, t in (("k", k), ("v", v), ("k_cache_flat", k_cache_flat), ("v_cache_flat", v_cache_flat)):
        check_dtype(name, t, FLOAT_DTYPES)
        if t.dim() != 3 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim] with a contiguous last dim, got {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[1:] != k_cache_flat.shape[1:] or k_cache_flat.shape != v_cache_flat.shape:
        raise ValueError(
            f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"k_cache_flat {tuple(k_cache_flat.shape)}, v_cache_flat {tuple(v_cache_flat.shape)}"
        )
    if out_cache_loc.shape != (k.shape[0],):
        raise ValueError(f"out_cache_loc must have shape ({k.shape[0]},), got {tuple(out_cache_loc.shape)}")
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache_flat, v_cache_flat, out_cache_loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache_flat.stride(0), k_cache_flat.stride(1), v_cache_flat.stride(0), v_cache_flat.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_heads), BLOCK_D=next_power_of_2(head_dim),
    )
