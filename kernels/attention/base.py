"""The contract every attention backend keeps (torch, triton, flashinfer).

Planning happens once per forward (`plan`), then each layer calls `forward`, which
stores the layer's new K/V into the paged cache at `batch.out_cache_loc` and attends
each new query to its sequence's cached prefix plus the new tokens, causally.

KV layout (shared by every backend; see pipeline_infer/cache/kv_pool.py):
    k_cache[layer], v_cache[layer]: [num_pages, page_size, num_kv_heads, head_dim]
    token slot s lives at page s // page_size, offset s % page_size.
    A sequence's pages are batch.page_table[b, : ceil(seq_len / page_size)].

There is deliberately no abstract base class: backends are plain classes with these
two methods, checked by duck typing (see `AttentionBackend` below, a Protocol).
"""

from __future__ import annotations

from typing import Protocol

import torch

from pipeline_infer.forward_batch import ForwardBatch


class AttentionBackend(Protocol):
    def plan(self, batch: ForwardBatch) -> None:
        """Compute per-batch metadata once; store it in batch.attn_metadata."""

    def forward(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, num_q_heads, head_dim]
        """Store k/v at batch.out_cache_loc in layer `layer_id`'s cache, then attend."""
