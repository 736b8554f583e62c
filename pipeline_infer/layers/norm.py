"""RMSNorm, with the residual add fused in: y = w * h / rms(h) where h = x + residual."""

from __future__ import annotations

import torch
from torch import nn

from pipeline_infer.layers.fast_path import use_triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or (norm(x + residual), x + residual) when a residual is given."""
        if use_triton(x) and x.shape[-1] == self.weight.shape[0]:
            from pipeline_infer.kernels.triton.rms_norm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x.contiguous(), self.weight, self.eps)
            return fused_add_rms_norm(x.contiguous(), residual.contiguous(), self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        out = self._norm(x)
        return out if residual is None else (out, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Accumulate in fp32 as HF does, then cast back before the weight multiply.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
