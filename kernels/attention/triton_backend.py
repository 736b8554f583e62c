"""Attention backend on our own Triton kernels (kernels/triton/).

`plan` turns the batch's host-side lists into the int32 tensors the kernels read, once per
forward; `forward` (once per layer) then only launches kernels: store_kv, then the decode
kernel when every sequence adds one token, else the extend kernel (which also serves mixed
prefill + decode batches). `forward_with_rope` takes q and k before the rotary embedding and
replaces store_kv with rope_store_kv, one kernel that rotates q and k and stores k and v
straight from their strided views of the fused qkv; in decode steps the decode kernel does
that work itself, so a decode layer launches one attention kernel (two with KV splits).
Nothing in either copies from the device to the host. For extend batches `plan` also builds the extend kernel's work list (one entry
per block of new tokens), so a mixed batch launches only the blocks that hold tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch, ints_to_device
from pipeline_infer.kernels.triton.decode_attention import (
    DecodeRope,
    choose_num_kv_splits,
    decode_attention,
)
from pipeline_infer.kernels.triton.extend_attention import extend_attention, extend_blocks, tokens_per_block
from pipeline_infer.kernels.triton.launch import device_num_sms
from pipeline_infer.kernels.triton.rope_store_kv import rope_store_kv
from pipeline_infer.kernels.triton.shared_prefix_attention import (
    ITEM_FIELDS,
    SharedPrefix,
    choose_prefix_splits,
    rows_per_item,
    shared_prefix_decode_attention,
)
from pipeline_infer.kernels.triton.store_kv import store_kv
from pipeline_infer.layers.rotary import RotaryEmbedding


# Prefix splits a decode graph captures at most. The graph cannot know the prefixes it will
# meet, so choose_prefix_splits would size it for max_context: 16 splits at small batches,
# where most programs then find nothing to do and still cost their launch, and the merge reads
# more slots. H200, one layer in a graph, a 1,024-key prefix, 64-row graph: prefix pass 13.1 us
# at 16 splits, 9.5 at 4, 13.6 at 2; at 256 rows 4 splits 18.7 us against 22.5 at 8 (fourteenth
# session).
GRAPH_MAX_PREFIX_SPLITS = 4


@dataclass
class TritonAttentionMetadata:
    is_decode: bool
    seq_lens: torch.Tensor  # [B] int32: cached + new tokens
    prefix_lens: torch.Tensor  # [B] int32
    qo_indptr: torch.Tensor  # [B + 1] int32: sequence b's new tokens are rows qo_indptr[b]:qo_indptr[b+1]
    page_table: torch.Tensor  # [B, max_pages] int32, contiguous rows
    max_extend_len: int
    num_kv_splits: int  # decode only
    # Extend only: the extend kernel's work list, one entry per block of new tokens (see extend_blocks).
    block_seq: torch.Tensor | None = None  # [NB] int32: the block's sequence
    block_start: torch.Tensor | None = None  # [NB] int32: its first new-token index in that sequence
    num_blocks: torch.Tensor | None = None  # [1] int32: entries in use (graph replay: buffers are longer)
    # Decode only: rows that share prefix pages attend to them once per group (batch.shared_prefix).
    shared: SharedPrefix | None = None


class TritonAttentionBackend:
    # forward_with_rope rotates q/k itself, in the kernel that stores K/V (see base.py).
    fuses_rope = True
    # plan() needs only batch.page_table on the device: the model runner may keep the table
    # there and send each step's changes (pipeline_infer/device_page_table.py).
    reads_page_table_on_device = True
    # Decode steps rotate and store the new K/V inside the attention kernel (one launch a
    # layer fewer than rope_store_kv + attention); an attribute so benchmarks can compare.
    decode_rope_in_attention = True
    # Cascade decode: the prefix pass on a second CUDA stream, concurrent with the own-keys pass.
    # Read at construction: set it False on the class before building an engine for one stream.
    prefix_pass_on_side_stream = True

    def __init__(
        self, kv_pool: KVPool, num_q_heads: int, num_kv_heads: int, head_dim: int, num_sms: int | None = None
    ):
        """num_sms (streaming multiprocessors) sizes the decode split; None asks the device."""
        if num_kv_heads != kv_pool.num_kv_heads or head_dim != kv_pool.head_dim:
            raise ValueError(
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim} do not match the KV pool's "
                f"{kv_pool.num_kv_heads} and {kv_pool.head_dim}"
            )
        if num_q_heads < num_kv_heads or num_q_heads % num_kv_heads != 0:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        self.kv_pool = kv_pool
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        if num_sms is not None and num_sms < 1:
            raise ValueError(f"num_sms must be >= 1, got {num_sms}")
        self._num_sms = num_sms if num_sms is not None else device_num_sms(kv_pool.device)
        # Decode rows sharing a prefix are attended to it together, this many a program
        # (shared_prefix_attention.py); the model runner groups them (pipeline_infer/shared_prefix.py).
        self.shared_prefix_rows = rows_per_item(num_q_heads, num_kv_heads, head_dim)
        # Cascade decode runs its prefix pass on a second stream, beside the own-keys pass
        # (shared_prefix_decode_attention's side_stream). One stream for every layer: each
        # layer's fork waits for the previous work of the current stream, so they stay in order.
        self._side_stream = (
            torch.cuda.Stream(kv_pool.device)
            if self.prefix_pass_on_side_stream and kv_pool.device.type == "cuda"
            else None
        )

    def plan(self, batch: ForwardBatch) -> None:
        """Build the kernels' int32 metadata from the batch's host lists (host work, no device sync)."""
        device = self.kv_pool.device
        seq_lens = batch.seq_lens
        indptr = [0]
        for n in batch.extend_lens:
            indptr.append(indptr[-1] + n)
        page_table = batch.page_table
        if page_table.dtype != torch.int32 or page_table.device != device or page_table.stride(-1) != 1:
            page_table = page_table.to(device=device, dtype=torch.int32).contiguous()
        is_decode = batch.is_decode
        block_seq = block_start = None
        if not is_decode:
            seq_of_block, start_of_block = extend_blocks(
                batch.extend_lens, self.num_q_heads, self.num_kv_heads, self.head_dim
            )
            # One host-to-device copy for both arrays; the kernel gets two views of it.
            work = _int32_tensor(seq_of_block + start_of_block, device)
            block_seq, block_start = work[: len(seq_of_block)], work[len(seq_of_block) :]
        batch.attn_metadata = TritonAttentionMetadata(
            is_decode=is_decode,
            seq_lens=_int32_tensor(seq_lens, device),
            prefix_lens=_int32_tensor(batch.prefix_lens, device),
            qo_indptr=_int32_tensor(indptr, device),
            page_table=page_table,
            max_extend_len=max(batch.extend_lens, default=0),
            num_kv_splits=(
                choose_num_kv_splits(batch.batch_size, self.num_kv_heads, max(seq_lens, default=1), self._num_sms)
                if is_decode
                else 1
            ),
            block_seq=block_seq,
            block_start=block_start,
            shared=self._shared_prefix(batch.shared_prefix, batch.batch_size) if is_decode else None,
        )

    def _shared_prefix(self, plan, batch_size: int) -> SharedPrefix | None:
        """The kernel's view of a host SharedPrefixPlan: one host-to-device copy."""
        if plan is None:
            return None
        ints = _int32_tensor(plan.kv_starts + plan.rows + plan.items + [plan.num_items], self.kv_pool.device)
        kv_starts, rows, items, num_items = ints.split([batch_size, len(plan.rows), len(plan.items), 1])
        splits = choose_prefix_splits(plan.num_items, self.num_kv_heads, plan.longest_prefix, self._num_sms)
        return SharedPrefix(kv_starts, rows, items.view(-1, ITEM_FIELDS), num_items, splits)

    def shared_prefix_buffer_size(self, max_bs: int, max_items: int) -> int:
        """int32s of the static buffer graph_decode_metadata(shared_buffer=...) reads."""
        return 2 * max_bs + max_items * ITEM_FIELDS + 1

    def pack_shared_prefix(self, plan, max_bs: int, max_items: int) -> list[int]:
        """Host values of that buffer for one step (rows past the plan's batch: no prefix)."""
        if plan.num_items > max_items or len(plan.kv_starts) > max_bs:
            raise ValueError(f"a plan of {len(plan.kv_starts)} rows / {plan.num_items} entries exceeds {max_bs} / {max_items}")
        return (
            plan.kv_starts + [0] * (max_bs - len(plan.kv_starts))
            + plan.rows + [0] * (max_bs - len(plan.rows))
            + plan.items + [0] * ((max_items - plan.num_items) * ITEM_FIELDS) + [plan.num_items]
        )

    def graph_decode_metadata(
        self, seq_lens: torch.Tensor, page_table: torch.Tensor, max_context: int,
        shared_buffer: torch.Tensor | None = None, max_items: int = 0, grid_items: int | None = None,
    ) -> TritonAttentionMetadata:
        """Decode metadata over static buffers, for CUDA-graph capture.

        The split count is fixed at capture for the longest possible sequence; the kernel
        divides each sequence's actual length among the splits, so shorter ones leave some
        splits empty (they cost a launch slot, not memory traffic). With shared_buffer (laid
        out by pack_shared_prefix, sized by shared_prefix_buffer_size), the graph attends
        through shared prefixes: its prefix pass's grid covers grid_items work entries (the
        most a plan over bs rows can have; default max_items) times at most
        GRAPH_MAX_PREFIX_SPLITS splits.
        """
        bs = seq_lens.shape[0]
        shared = None
        if shared_buffer is not None:
            max_bs = (shared_buffer.numel() - max_items * ITEM_FIELDS - 1) // 2
            kv_starts, _, rows, items, num_items = shared_buffer.split(
                [bs, max_bs - bs, max_bs, max_items * ITEM_FIELDS, 1]
            )
            items = items.view(-1, ITEM_FIELDS)[: max_items if grid_items is None else grid_items]
            splits = choose_prefix_splits(max(1, bs // self.shared_prefix_rows), self.num_kv_heads, max_context, self._num_sms)
            shared = SharedPrefix(kv_starts, rows, items, num_items, min(splits, GRAPH_MAX_PREFIX_SPLITS))
        return TritonAttentionMetadata(
            is_decode=True,
            seq_lens=seq_lens,
            prefix_lens=seq_lens,  # unused by decode
            qo_indptr=seq_lens,  # unused by decode
            page_table=page_table,
            max_extend_len=1,
            num_kv_splits=choose_num_kv_splits(bs, self.num_kv_heads, max_context, self._num_sms),
            shared=shared,
        )

    def forward(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, num_q_heads, head_dim]
        md = _planned(batch)
        k_flat, v_flat = self.kv_pool.view_flat(layer_id)
        store_kv(k, v, k_flat, v_flat, batch.out_cache_loc)
        return self._attend(q, md, layer_id, scale)

    def forward_with_rope(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim], not yet rotated; strided views are fine
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], not yet rotated
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        rotary: RotaryEmbedding,
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, num_q_heads, head_dim]
        """rotary(batch.positions, q, k), then forward; the rotation and the K/V store are one kernel.

        Decode steps do both inside the attention kernel itself (decode_rope_in_attention).
        """
        md = _planned(batch)
        if md.is_decode and self.decode_rope_in_attention:
            rope = DecodeRope(k, v, batch.positions, rotary.cos_sin_cache, batch.out_cache_loc)
            return self._attend(q, md, layer_id, scale, rope)
        k_flat, v_flat = self.kv_pool.view_flat(layer_id)
        q = rope_store_kv(q, k, v, batch.positions, rotary.cos_sin_cache, k_flat, v_flat, batch.out_cache_loc)
        return self._attend(q, md, layer_id, scale)

    def _attend(
        self, q: torch.Tensor, md: TritonAttentionMetadata, layer_id: int, scale: float, rope: DecodeRope | None = None
    ) -> torch.Tensor:
        """Attention of q over layer_id's cache, which already holds this step's K/V (with `rope`,
        a decode step: the kernel rotates q and k and stores the new K/V itself)."""
        k_cache, v_cache = self.kv_pool.k_cache[layer_id], self.kv_pool.v_cache[layer_id]
        if md.shared is not None:
            return shared_prefix_decode_attention(
                q, k_cache, v_cache, md.page_table, md.seq_lens, scale, md.shared, md.num_kv_splits, rope=rope,
                side_stream=self._side_stream,
            )
        if md.is_decode:
            return decode_attention(q, k_cache, v_cache, md.page_table, md.seq_lens, scale, md.num_kv_splits, rope=rope)
        return extend_attention(
            q, k_cache, v_cache, md.qo_indptr, md.prefix_lens, md.page_table, md.max_extend_len, scale,
            block_seq=md.block_seq, block_start=md.block_start, num_blocks=md.num_blocks,
        )

    # --- extend steps in CUDA graphs (pipeline_infer/extend_graph.py) -------------------------
    def max_extend_blocks(self, max_tokens: int, max_seqs: int) -> int:
        """Work-list entries a step of at most max_tokens new tokens over max_seqs sequences needs."""
        return -(-max_tokens // tokens_per_block(self.num_q_heads, self.num_kv_heads, self.head_dim)) + max_seqs

    @staticmethod
    def _extend_meta_sections(max_seqs: int, max_blocks: int) -> list[int]:
        """Lengths of the static buffer's parts: qo_indptr, prefix_lens, block_seq, block_start, num_blocks."""
        return [max_seqs + 1, max_seqs, max_blocks, max_blocks, 1]

    @classmethod
    def extend_meta_size(cls, max_seqs: int, max_blocks: int) -> int:
        return sum(cls._extend_meta_sections(max_seqs, max_blocks))

    def graph_extend_metadata(
        self, meta: torch.Tensor, page_table: torch.Tensor, max_seqs: int, max_blocks: int, max_tokens: int
    ) -> TritonAttentionMetadata:
        """Extend metadata as views of one static int32 buffer (laid out by pack_extend_meta), for capture."""
        qo_indptr, prefix_lens, block_seq, block_start, num_blocks = meta.split(
            self._extend_meta_sections(max_seqs, max_blocks)
        )
        return TritonAttentionMetadata(
            is_decode=False, seq_lens=prefix_lens, prefix_lens=prefix_lens, qo_indptr=qo_indptr,
            page_table=page_table, max_extend_len=max_tokens, num_kv_splits=1,
            block_seq=block_seq, block_start=block_start, num_blocks=num_blocks,
        )

    def pack_extend_meta(self, extend_lens: list[int], prefix_lens: list[int], max_seqs: int, max_blocks: int):
        """The host values of graph_extend_metadata's buffer for one step (numpy int32).

        Sequences past the batch are empty (their qo_indptr repeats the total); work-list entries
        past the step's blocks are never run (num_blocks bounds them).
        """
        b = len(extend_lens)
        seq, start = extend_blocks(extend_lens, self.num_q_heads, self.num_kv_heads, self.head_dim)
        if b > max_seqs or len(seq) > max_blocks:
            raise ValueError(f"step of {b} sequences / {len(seq)} blocks exceeds the graph's {max_seqs} / {max_blocks}")
        sections = self._extend_meta_sections(max_seqs, max_blocks)
        out = np.zeros(sum(sections), dtype=np.int32)
        qo_indptr, prefixes, block_seq, block_start, num_blocks = np.split(out, np.cumsum(sections)[:-1])  # views
        qo_indptr[1 : b + 1] = np.cumsum(extend_lens, dtype=np.int64)
        qo_indptr[b + 1 :] = qo_indptr[b]
        prefixes[:b] = prefix_lens
        block_seq[: len(seq)] = seq
        block_start[: len(start)] = start
        num_blocks[0] = len(seq)
        return out


def _planned(batch: ForwardBatch) -> TritonAttentionMetadata:
    md = batch.attn_metadata
    assert isinstance(md, TritonAttentionMetadata), "plan(batch) must run before forward"
    return md


def _int32_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return ints_to_device(values, device, torch.int32)
