"""RMSNorm, alone or fused with the residual add that precedes it in every decoder layer.

The rounding mirrors HF Llama/Qwen in low precision: the residual sum is rounded to the
residual's dtype before it is normalised, and the normalised row is rounded to the input
dtype before the weight multiplies it. That keeps our bf16 logits close to HF's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(res_out_ptr.dtype.element_ty)
        # Each program reads its row before writing it, so res_out may alias residual.
        tl.store(res_out_ptr + row * stride_ro + offs, summed, mask=mask)
        x = summed.to(x_ptr.dtype.element_ty).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * x / rms(x) over the last dim of x [..., H]; `out` may be x itself (in place)."""
    out, _ = _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). Pass out=x, residual_out=residual to work in place."""
    out, residual_out = _launch(x, residual, weight, eps, out, residual_out)
    assert residual_out is not None
    return out, residual_out


def _rows(name: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    """A [rows, hidden] view of t (a view, so writes through it reach t)."""
    if t.shape[-1] != hidden or t.stride(-1) != 1:
        raise ValueError(f"{name} must end in a contiguous dim of size {hidden}, got shape {tuple(t.shape)}")
    try:
        return t.view(-1, hidden)
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(t.shape)} cannot be viewed as rows of {hidden}") from e


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    check_launchable(_rms_norm_kernel, x, weight, residual, out, residual_out)
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None:
            check_dtype(name, t, FLOAT_DTYPES)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    x2, out2 = _rows("x", x, hidden), _rows("out", out, hidden)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual_out is None:
            residual_out = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
        if residual_out.shape != x.shape:
            raise ValueError(f"residual_out must have x's shape {tuple(x.shape)}, got {tuple(residual_out.shape)}")
        r2, ro2 = _rows("residual", residual, hidden), _rows("residual_out", residual_out, hidden)
    else:
        r2, ro2 = x2, out2  # unused: HAS_RESIDUAL=False
    if x2.shape[0] == 0:
        return out, residual_out
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out2, ro2,
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(hidden),
        num_warps=min(16, max(1, next_power_of_2(hidden) // 256)),
    )
    return out, residual_out
