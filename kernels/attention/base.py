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

Optionally a backend sets the class attribute `fuses_rope = True` and has
`forward_with_rope(q, k, v, rotary, layer_id, batch, scale)`, which takes q and k before the
rotary embedding and rotates them itself, e.g. in the same kernel that stores K/V (Triton:
rope_store_kv). Callers go through `forward_with_rope` below, which falls back to rotating
first and calling `forward` for backends without it.

A backend that plans from `batch.page_table` alone (never `page_table_host`) sets the class
attribute `reads_page_table_on_device = True`: the model runner then keeps the table on the
device and leaves `page_table_host` None (pipeline_infer/device_page_table.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.layers.rotary import RotaryEmbedding


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


def forward_with_rope(
    backend: AttentionBackend,
    q: torch.Tensor,  # [T, num_q_heads, head_dim], not yet rotated
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], not yet rotated
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    rotary: RotaryEmbedding,
    layer_id: int,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:  # [T, num_q_heads, head_dim]
    """Rotate q/k by batch.positions, store k/v, attend: fused where the backend can (fuses_rope)."""
    if getattr(backend, "fuses_rope", False):
        return backend.forward_with_rope(q, k, v, rotary, layer_id, batch, scale)
    q, k = rotary(batch.positions, q, k)
    return backend.forward(q, k, v, layer_id, batch, scale)
