"""SiLU-and-mul: the gated MLP's activation, [T, 2I] = [gate | up] -> silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, next_power_of_2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # Round silu to the input dtype before the product, as HF's act_fn(gate) * up does.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:] as [T, I] in x's dtype."""
    check_launchable(_silu_and_mul_kernel, x, out)
    check_dtype("x", x, FLOAT_DTYPES)
    if x.dim() != 2 or x.shape[1] % 2 != 0 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, 2I] with contiguous rows, got shape {tuple(x.shape)}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, inter) or out.stride(1) != 1:
        raise ValueError(f"out must be [{num_tokens}, {inter}] with contiguous rows, got {tuple(out.shape)}")
    if num_tokens == 0 or inter == 0:
        return out
    block = min(1024, next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, -(-inter // block))](x, out, x.stride(0), out.stride(0), inter, BLOCK=block)
    return out
