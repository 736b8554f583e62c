"""Linear layers for small token counts (decode steps): y = x @ W^T (+ bias), optionally gated.

Why not cuBLAS: at 64-512 rows a decoder's projections are short, wide or deep matmuls whose
tile count does not fill the GPU. On an H200 at 256 rows (Qwen2.5-0.5B) cuBLAS ran the
[4864 -> 896] down projection as 14 output tiles split over K plus a separate reduction, and
the [896 -> 1152] qkv projection as 18 tiles, a few microseconds each where the weights take
one or two to read. Here every launch setting is explicit (tile sizes, K splits, warps,
stages), so the caller can pick, per shape and row count, whichever setting measured fastest
(pipeline_infer/linear_tuning.py), cuBLAS included.

Two forms share one kernel:
- plain: y[M, N] = x[M, K] @ W[N, K]^T + bias[N];
- gated (the MLP's gate/up): W is [2I, K] = [gate | up]; each program computes a tile of the
  gate columns and the matching tile of the up columns, and stores silu(gate) * up ([M, I]),
  so the [M, 2I] intermediate and the separate activation kernel are gone.

With split_k > 1 each program sums a slice of K and writes float32 partials; a second kernel
adds the slices (and the bias) in a fixed order, so results do not depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, is_interpreted


@dataclass(frozen=True)
class LinearConfig:
    """One launch setting. block_n counts output columns (gate columns for a gated linear)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"LinearConfig.{name} must be a power of two >= 16, got {v}")
        if not 1 <= self.split_k <= 64:
            raise ValueError(f"LinearConfig.split_k must be in [1, 64], got {self.split_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"LinearConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"LinearConfig.num_stages must be in [1, 8], got {self.num_stages}")

    def short(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}"


@triton.jit
def _silu_mul(gate, up, OUT_DTYPE: tl.constexpr):
    # HF computes act_fn(gate) * up on gate and up already rounded to the model dtype, and
    # rounds silu's result before the product: do the same so both paths agree bit for bit
    # as often as possible.
    g = gate.to(OUT_DTYPE).to(tl.float32)
    u = up.to(OUT_DTYPE).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(OUT_DTYPE).to(tl.float32)
    return act * u


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om, stride_ps,
    up_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    # Row tiles of one column tile run next to each other, so they share its weights in L2.
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    # W is [N, K] row-major; load its tile as [BLOCK_K, BLOCK_N] (a transposed view).
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
        if GATED:
            wu = tl.load(w_ptrs + up_offset + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                acc_up += tl.dot(x.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
            else:
                acc_up += tl.dot(x, wu)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        # float32 partials [split, M, N]; the reduce kernel adds bias / applies the gate.
        p_ptrs = part_ptr + split * stride_ps + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=out_mask)
        if GATED:
            tl.store(p_ptrs + M * N, acc_up, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc = _silu_mul(acc, acc_up, out_ptr.dtype.element_ty)
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, num_splits, stride_ps, stride_om,
    BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):  # fixed order: the sum does not depend on which split ran first
        p = part_ptr + s * stride_ps + row * N + offs
        acc += tl.load(p, mask=mask, other=0.0)
        if GATED:
            acc_up += tl.load(p + M * N, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        acc = _silu_mul(acc, acc_up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def triton_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: LinearConfig = LinearConfig(),
    gated: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) -> [M, N]; gated: weight [2I, K] -> silu(x Wg^T) * (x Wu^T), [M, I].

    x and weight share a float dtype; the result has it. Rows of x and weight must be contiguous.
    """
    check_launchable(_linear_kernel, x, weight, bias, out)
    for name, t in (("x", x), ("weight", weight)):
        check_dtype(name, t, FLOAT_DTYPES)
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D with contiguous rows, got shape {tuple(t.shape)}, strides {t.stride()}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight dtypes differ: {x.dtype} vs {weight.dtype}")
    m, k = x.shape
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns but weight is {tuple(weight.shape)} (expected [N, {k}])")
    n = weight.shape[0]
    if gated:
        if n % 2:
            raise ValueError(f"a gated linear needs an even number of weight rows ([gate | up]), got {n}")
        if bias is not None:
            raise ValueError("a gated linear takes no bias")
        n //= 2
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} tensor with contiguous rows, got {tuple(out.shape)} {out.dtype}")
    if m == 0 or n == 0:
        return out
    c = config
    # Each split's K range is a whole number of K blocks, so only the last block is masked.
    k_per_split = -(-k // c.split_k)
    k_per_split = -(-k_per_split // c.block_k) * c.block_k
    splits = -(-k // k_per_split)
    tiles = -(-m // c.block_m) * -(-n // c.block_n)
    dot_fp32 = x.dtype == torch.float32 or is_interpreted(_linear_kernel)
    bias_arg = bias if bias is not None else x
    if splits == 1:
        _linear_kernel[(tiles, 1)](
            x, weight, bias_arg, out, out,
            m, n, k, k_per_split,
            x.stride(0), weight.stride(0), out.stride(0), 0,
            n * weight.stride(0),
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            HAS_BIAS=bias is not None, GATED=gated, SPLIT=False, DOT_FP32=dot_fp32,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
        return out
    halves = 2 if gated else 1
    part = torch.empty((splits, halves, m, n), dtype=torch.float32, device=x.device)
    _linear_kernel[(tiles, splits)](
        x, weight, bias_arg, out, part,
        m, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0), part.stride(0),
        n * weight.stride(0),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        HAS_BIAS=bias is not None, GATED=gated, SPLIT=True, DOT_FP32=dot_fp32,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    block = min(1024, triton.next_power_of_2(n))
    _split_reduce_kernel[(m, -(-n // block))](
        part, bias_arg, out, m, n, splits, part.stride(0), out.stride(0),
        BLOCK=block, HAS_BIAS=bias is not None, GATED=gated,
    )
    return out
