"""Attention over the paged KV cache in plain torch: the reference backend, CPU and CUDA.

plan() groups the batch's sequences into decodes (one new token) and extends (several),
and builds for each group, once per forward, a flat gather index into the cache (padded
to the group's longest sequence) and a mask. forward() is then per layer: one scatter of
the new K/V, and per group one row gather (index_select, i.e. whole-row copies) of K and V
plus one scaled_dot_product_attention call. Padding waste is bounded because decodes are
never padded to a prefill's length, and sequences of very different lengths are split
into a few length buckets.

Decodes put each KV head's query group in the query dimension ([G, Hkv, group, D]) so
GQA needs no repeated K/V and the (additive, float) mask is one row per sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.kernels.attention.decode_mirror import DecodeMirror, MirrorBucket

# What one more SDPA call costs, in padded key tokens of gather + attention (measured on a
# 2-core CPU for SmolLM2-135M shapes; the exact value only moves bucket boundaries).
_BUCKET_OVERHEAD_TOKENS = 512
_MAX_BUCKETS = 4


@dataclass
class _Group:
    num_seqs: int  # G
    q_len: int  # Q: the longest new-token count in the group (1 for decodes)
    kv_len: int  # K: the longest sequence in the group (keys per row after padding)
    token_index: torch.Tensor | None  # [G * Q] rows of the flattened tokens (padding -> row 0); None: all rows in order
    valid_index: torch.Tensor | None  # [n] entries of the [G * Q] output that are real tokens; None: all
    out_index: torch.Tensor | None  # [n] rows of the output they go to; None: all rows in order
    kv_slots: torch.Tensor | None  # [G * K] cache slots; padding points at slot 0 (scratch page)
    # decodes: [G, 1, 1, K] float, 0 / -inf; extends: [G, 1, Q, K] bool, True = may attend;
    # None: prefills with no cached prefix, where plain causal attention is exact (below)
    mask: torch.Tensor | None
    mirror: MirrorBucket | None = None  # decodes whose K/V are kept dense across steps (kv_slots unused)


@dataclass
class TorchAttentionMetadata:
    groups: list[_Group]


class TorchAttentionBackend:
    def __init__(self, kv_pool: KVPool, num_q_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # On the CPU the per-layer gather out of the paged cache is a large part of a decode
        # step; the mirror keeps the decodes' K/V dense across steps instead. (On CUDA the
        # Triton and FlashInfer backends read pages directly and this backend is the reference.)
        self.mirror = (
            DecodeMirror(kv_pool.num_layers, num_kv_heads, head_dim, kv_pool.dtype)
            if kv_pool.device.type == "cpu"
            else None
        )

    def on_idle(self) -> None:
        """No requests left: the decode mirror's buffers go back."""
        if self.mirror is not None:
            self.mirror.reset()

    def plan(self, batch: ForwardBatch) -> None:
        decode_rows = [b for b, e in enumerate(batch.extend_lens) if e == 1]
        extend_rows = [b for b, e in enumerate(batch.extend_lens) if e > 1]
        starts = [0]
        for e in batch.extend_lens:
            starts.append(starts[-1] + e)
        total = starts[-1]
        seq_lens = batch.seq_lens
        table = torch.as_tensor(
            batch.page_table_host if batch.page_table_host is not None else batch.page_table.cpu()
        ).long()
        decode_buckets = split_by_length(decode_rows, seq_lens, batch.extend_lens)
        mirrored = None
        if self.mirror is not None:
            ps = self.kv_pool.page_size
            tab = table.numpy()

            def slot_at(b: int, pos: int) -> int:
                return int(tab[b, pos // ps]) * ps + pos % ps

            mirrored = self.mirror.plan(
                decode_buckets, seq_lens, slot_at,
                lambda rows, n: self._slot_table(table, rows, torch.tensor([seq_lens[b] for b in rows]), n),
                written=lambda: batch.out_cache_loc.tolist(),
            )
        if mirrored is not None:
            groups = [self._plan_group(batch, table, rows, starts, total, mirror=mb) for rows, mb in mirrored]
        else:
            groups = [self._plan_group(batch, table, rows, starts, total) for rows in decode_buckets]
        groups += [
            self._plan_group(batch, table, rows, starts, total)
            for rows in split_by_length(extend_rows, seq_lens, batch.extend_lens)
        ]
        batch.attn_metadata = TorchAttentionMetadata(groups)

    def _slot_table(self, table: torch.Tensor, rows: list[int], seq: torch.Tensor, n: int) -> torch.Tensor:
        """[len(rows), n] cache slots of each row's first n tokens; slot 0 (scratch) past its length seq[i]."""
        page_size = self.kv_pool.page_size
        k_pos = torch.arange(n)
        pages = table[rows]  # [G, max_pages]
        page_idx = (k_pos // page_size).clamp(max=pages.shape[1] - 1)
        slots = pages[:, page_idx] * page_size + (k_pos % page_size)[None, :]
        return torch.where(k_pos[None, :] < seq[:, None], slots, 0)

    def _plan_group(
        self,
        batch: ForwardBatch,
        table: torch.Tensor,
        rows: list[int],
        starts: list[int],
        total: int,
        mirror: MirrorBucket | None = None,
    ) -> _Group:
        device = batch.input_ids.device
        ext = torch.tensor([batch.extend_lens[b] for b in rows], dtype=torch.long)
        pre = torch.tensor([batch.prefix_lens[b] for b in rows], dtype=torch.long)
        start = torch.tensor([starts[b] for b in rows], dtype=torch.long)
        seq = pre + ext
        q_max, k_max = int(ext.max()), int(seq.max())

        q_pos = torch.arange(q_max)
        token_valid = q_pos[None, :] < ext[:, None]
        token_index = torch.where(token_valid, start[:, None] + q_pos[None, :], 0).reshape(-1)
        in_order = int(token_index.numel()) == total and bool((token_index == torch.arange(total)).all())
        all_valid = bool(token_valid.all())

        k_pos = torch.arange(k_max)
        k_valid = k_pos[None, :] < seq[:, None]
        # Mirrored decodes read their dense buffers, not the pool: no slots to gather.
        kv_slots = None if mirror is not None else self._slot_table(table, rows, seq, k_max).reshape(-1)

        if q_max == 1:
            # A decode's one query sits at the end and sees every key of its sequence.
            mask = torch.zeros(len(rows), 1, 1, k_max).masked_fill_(~k_valid[:, None, None, :], float("-inf"))
        elif not bool(pre.any()):
            # Prefills from position 0: every row's key j is its token j, so top-left causal
            # attention is exact for real queries (keys past a row's end lie past its queries),
            # and lets the kernel skip the masked half instead of reading a mask.
            mask = None
        else:
            # Query i of a row sits at absolute position pre + i and sees keys 0 .. pre + i.
            causal = k_pos[None, None, :] <= (pre[:, None, None] + q_pos[None, :, None])
            mask = causal & k_valid[:, None, :]
            # Padded query rows would see no key and turn NaN; let them see key 0 and drop them later.
            mask[:, :, 0] |= ~token_valid
            mask = mask[:, None]
        flat_valid = token_valid.reshape(-1)
        return _Group(
            num_seqs=len(rows),
            q_len=q_max,
            kv_len=k_max,
            token_index=None if in_order else token_index.to(device),
            valid_index=None if all_valid else flat_valid.nonzero().squeeze(1).to(device),
            out_index=None if in_order else token_index[flat_valid].to(device),
            kv_slots=None if kv_slots is None else kv_slots.to(device),
            mask=None if mask is None else mask.to(device),
            mirror=mirror,
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
        meta: TorchAttentionMetadata = batch.attn_metadata
        out = None if len(meta.groups) == 1 and meta.groups[0].out_index is None else q.new_empty(q.shape)
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        for g in meta.groups:
            G, Q, K = g.num_seqs, g.q_len, g.kv_len
            if g.mask is not None and g.mask.dtype != torch.bool and g.mask.dtype != q.dtype:
                # Once a step (the first layer): an additive mask in the query's dtype. SDPA
                # accepts a float32 mask with a bf16 query, but its cuDNN path (the default on
                # Hopper) reads the mask as bf16 and attends wrongly, without an error
                # (pytorch/pytorch#191612); 0 and -inf are exact in every float dtype.
                g.mask = g.mask.to(q.dtype)
            if g.mirror is not None:  # decodes kept dense across steps: add this step's K/V
                kn = k if g.token_index is None else k.index_select(0, g.token_index)
                vn = v if g.token_index is None else v.index_select(0, g.token_index)
                kb, vb = DecodeMirror.update(g.mirror, layer_id, k_flat, v_flat, kn, vn)
                kg = kb[:, :K].transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
                vg = vb[:, :K].transpose(1, 2).to(q.dtype)
            else:
                # Whole-row copies out of the cache; advanced indexing copies element by element.
                kg = k_flat.index_select(0, g.kv_slots).view(G, K, hkv, d).transpose(1, 2).to(q.dtype)
                vg = v_flat.index_select(0, g.kv_slots).view(G, K, hkv, d).transpose(1, 2).to(q.dtype)
            qg = q if g.token_index is None else q.index_select(0, g.token_index)  # [G * Q, Hq, D]
            if Q == 1:
                og = F.scaled_dot_product_attention(qg.reshape(G, hkv, hq // hkv, d), kg, vg, attn_mask=g.mask, scale=scale)
                og = og.reshape(G, hq, d)
            else:
                qg = qg.reshape(G, Q, hq, d).transpose(1, 2)  # [G, Hq, Q, D]
                og = F.scaled_dot_product_attention(
                    qg, kg, vg, attn_mask=g.mask, is_causal=g.mask is None, scale=scale, enable_gqa=hq != hkv
                )
                og = og.transpose(1, 2).reshape(G * Q, hq, d)
            if g.valid_index is not None:
                og = og.index_select(0, g.valid_index)
            if out is None:
                return og.contiguous()
            if g.out_index is None:
                out.copy_(og)
            else:
                out.index_copy_(0, g.out_index, og)
        return out


def split_by_length(rows: list[int], seq_lens: list[int], extend_lens: list[int]) -> list[list[int]]:
    """Rows cut into at most a few buckets of similar length (each bucket is padded to its longest).

    Buckets are consecutive runs of the rows sorted by sequence length; the cut minimises the
    padded query-key pairs (rows x longest new tokens x longest sequence) plus a fixed cost
    per bucket. One bucket keeps the rows in their original order.
    """
    if len(rows) <= 1:
        return [rows] if rows else []
    order = sorted(rows, key=lambda b: (seq_lens[b], extend_lens[b]))
    lens = [seq_lens[b] for b in order]
    ext_max = list(itertools.accumulate((extend_lens[b] for b in order), max))  # over order[:i + 1]
    n = len(order)

    def cost(lo: int, hi: int) -> int:  # rows order[lo:hi]
        q = max(extend_lens[b] for b in order[lo:hi]) if lo else ext_max[hi - 1]
        return (hi - lo) * q * lens[hi - 1]

    best_cost, best_cuts = cost(0, n), [n]
    for k in range(2, min(_MAX_BUCKETS, n) + 1):
        cuts = [n * i // k for i in range(1, k + 1)]
        total, lo = (k - 1) * _BUCKET_OVERHEAD_TOKENS, 0
        for hi in cuts:
            total += cost(lo, hi)
            lo = hi
        if total < best_cost:
            best_cost, best_cuts = total, cuts
    if len(best_cuts) == 1:
        return [rows]
    out, lo = [], 0
    for hi in best_cuts:
        out.append(order[lo:hi])
        lo = hi
    return out
