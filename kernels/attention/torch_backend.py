"""Attention over the paged KV cache in plain torch: the reference backend, CPU and CUDA.

plan() groups the batch's sequences into decodes (one new token) and extends (several),
and builds for each group, once per forward, a padded gather index into the cache and a
boolean mask. forward() is then per layer: one scatter of the new K/V, and per group one
gather plus one scaled_dot_product_attention call. Padding waste is bounded because
decodes are never padded to a prefill's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch


@dataclass
class _Group:
    token_index: torch.Tensor  # [G, Q] rows of the flattened tokens; padding points at row 0
    token_valid: torch.Tensor  # [G, Q] bool
    kv_slots: torch.Tensor  # [G, K] cache slots; padding points at slot 0 (scratch page)
    mask: torch.Tensor  # [G, 1, Q, K] bool: True where the query may attend


@dataclass
class TorchAttentionMetadata:
    groups: list[_Group]


class TorchAttentionBackend:
    def __init__(self, kv_pool: KVPool, num_q_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def plan(self, batch: ForwardBatch) -> None:
        decode_rows = [b for b, e in enumerate(batch.extend_lens) if e == 1]
        extend_rows = [b for b, e in enumerate(batch.extend_lens) if e > 1]
        starts = [0]
        for e in batch.extend_lens:
            starts.append(starts[-1] + e)
        groups = [self._plan_group(batch, rows, starts) for rows in (decode_rows, extend_rows) if rows]
        batch.attn_metadata = TorchAttentionMetadata(groups)

    def _plan_group(self, batch: ForwardBatch, rows: list[int], starts: list[int]) -> _Group:
        device = batch.input_ids.device
        page_size = self.kv_pool.page_size
        ext = torch.tensor([batch.extend_lens[b] for b in rows], dtype=torch.long)
        pre = torch.tensor([batch.prefix_lens[b] for b in rows], dtype=torch.long)
        start = torch.tensor([starts[b] for b in rows], dtype=torch.long)
        seq = pre + ext
        q_max, k_max = int(ext.max()), int(seq.max())

        q_pos = torch.arange(q_max)
        token_valid = q_pos[None, :] < ext[:, None]
        token_index = torch.where(token_valid, start[:, None] + q_pos[None, :], 0)

        k_pos = torch.arange(k_max)
        pages = batch.page_table[rows].long().cpu()  # [G, max_pages]
        page_idx = (k_pos // page_size).clamp(max=pages.shape[1] - 1)
        slots = pages[:, page_idx] * page_size + (k_pos % page_size)[None, :]
        k_valid = k_pos[None, :] < seq[:, None]
        kv_slots = torch.where(k_valid, slots, 0)

        # Query i of a row sits at absolute position pre + i and sees keys 0 .. pre + i.
        causal = k_pos[None, None, :] <= (pre[:, None, None] + q_pos[None, :, None])
        mask = causal & k_valid[:, None, :]
        # Padded query rows would see no key and turn NaN; let them see key 0 and drop them later.
        mask[:, :, 0] |= ~token_valid
        return _Group(
            token_index.to(device),
            token_valid.to(device),
            kv_slots.to(device),
            mask[:, None].to(device),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        k_flat, v_flat = self.kv_pool.view_flat(layer_id)
        k_flat[batch.out_cache_loc] = k.to(k_flat.dtype)
        v_flat[batch.out_cache_loc] = v.to(v_flat.dtype)
        out = torch.empty_like(q)
        meta: TorchAttentionMetadata = batch.attn_metadata
        for g in meta.groups:
            qg = q[g.token_index].transpose(1, 2)  # [G, Hq, Q, D]
            kg = k_flat[g.kv_slots].transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
            vg = v_flat[g.kv_slots].transpose(1, 2).to(q.dtype)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=self.num_q_heads != self.num_kv_heads
            )
            og = og.transpose(1, 2)  # [G, Q, Hq, D]
            out[g.token_index[g.token_valid]] = og[g.token_valid]
        return out
