"""The attention layer: split a fused qkv, apply q/k norms and rotary, call the paged backend."""

from __future__ import annotations

import torch
from torch import nn

from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.kernels.attention.base import forward_with_rope
from pipeline_infer.layers.fast_path import use_triton
from pipeline_infer.layers.norm import RMSNorm
from pipeline_infer.layers.rotary import RotaryEmbedding


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v over the sequence's cached K/V, via batch.attn_backend."""

    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.rotary = rotary
        # Qwen3 normalises each head of q and k before the rotary embedding.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = qkv.shape[0]
        if self.q_norm is None and not qkv.is_cuda:
            # CPU path: rotate q and k heads together, one set of elementwise ops instead of two.
            qk = qkv[:, : self.q_size + self.kv_size].reshape(T, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = self.rotary.rotate_heads(batch.positions, qk).split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.q_size + self.kv_size :].reshape(T, self.num_kv_heads, self.head_dim)
            out = batch.attn_backend.forward(q, k, v, self.layer_id, batch, self.scale)
            return out.reshape(T, self.q_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        # v stays a strided view of qkv: every backend's K/V store takes strided rows.
        if self.q_norm is None and use_triton(qkv):
            # The backend may rotate q/k inside its K/V store (Triton: one kernel instead of three).
            out = forward_with_rope(batch.attn_backend, q, k, v, self.rotary, self.layer_id, batch, self.scale)
            return out.reshape(T, self.q_size)
        if self.q_norm is not None:
            q = self.q_norm(q.contiguous())
            k = self.k_norm(k.contiguous())
        q, k = self.rotary(batch.positions, q, k)
        out = batch.attn_backend.forward(q, k, v, self.layer_id, batch, self.scale)
        return out.reshape(T, self.q_size)
