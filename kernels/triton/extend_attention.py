"""Extend (prefill) attention: new tokens attend to their cached prefix and, causally, to each other.

The new tokens' K/V must already be in the paged cache (store_kv runs first), so every key
is read through the page table, prefix or not; that is what makes a radix-cache hit cheap
(the prefix is never recomputed, only read).

One program handles one (sequence, kv head, block of new tokens). The blocks come as a work
list (block_seq[i], block_start[i]) built on the host from the extend lengths, so a mixed
batch of many 1-token rows and one long prefill launches only the blocks that hold tokens,
not batch x (longest extend / TOKENS_PER_BLOCK) programs that mostly exit at once.

A program's BLOCK_M query rows pack BLOCK_M // GROUP tokens times the GROUP query heads
that share the kv head, so each key/value block is loaded once for the whole group. Keys before the block's first query
position need no causal mask and run in a cheaper first loop; the rest run masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, is_interpreted, next_power_of_2
from pipeline_infer.kernels.triton.paged_block import attend_paged_block, dot_operand

LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, qo_indptr_ptr, prefix_lens_ptr, page_table_ptr,
    block_seq_ptr, block_start_ptr, num_blocks_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ko, stride_kh, stride_vp, stride_vo, stride_vh,
    stride_pt,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    BOUNDED: tl.constexpr,
):
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    if BOUNDED:  # a fixed grid (CUDA graph) over a work list whose used length is on the device
        if blk >= tl.load(num_blocks_ptr):
            return
    b = tl.load(block_seq_ptr + blk)
    tok0 = tl.load(block_start_ptr + blk)
    qo_start = tl.load(qo_indptr_ptr + b)
    extend_len = tl.load(qo_indptr_ptr + b + 1) - qo_start
    prefix_len = tl.load(prefix_lens_ptr + b)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = tok0 + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS_PER_BLOCK * GROUP) & (tok < extend_len)
    rows = (qo_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    q = dot_operand(q, k_cache_ptr, DOT_FP32)
    # Rows past the block's tokens get positions beyond every key, so no row is fully masked.
    q_pos = prefix_len + tok

    # Blocks past the sequence's new tokens do nothing (only the fallback work list, which
    # covers the longest extend for every sequence, has them).
    last_tok = tl.minimum(tok0 + TOKENS_PER_BLOCK, extend_len) - 1
    kv_end = tl.where(tok0 < extend_len, prefix_len + last_tok + 1, 0)
    # Keys below the block's first query position are visible to every row: no causal mask.
    unmasked_end = tl.minimum((prefix_len + tok0 + 1) // BLOCK_N * BLOCK_N, kv_end)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    page_row_ptr = page_table_ptr + b.to(tl.int64) * stride_pt
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = attend_paged_block(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, page_row_ptr, n0, kv_end, q_pos,
            kvh * stride_kh, kvh * stride_vh, stride_kp, stride_ko, stride_vp, stride_vo,
            sm_scale_log2, offs_d, d_mask,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False, DOT_FP32=DOT_FP32,
        )
    for n0 in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = attend_paged_block(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, page_row_ptr, n0, kv_end, q_pos,
            kvh * stride_kh, kvh * stride_vh, stride_kp, stride_ko, stride_vp, stride_vo,
            sm_scale_log2, offs_d, d_mask,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=True, DOT_FP32=DOT_FP32,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )


def _tile_shape(group: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for the kernel; a block holds BLOCK_M // group tokens.

    The one place these are chosen, so the launcher and the work lists of `extend_blocks`
    cannot disagree on the tokens per block.
    """
    block_d = next_power_of_2(head_dim)
    block_m = max(64 if block_d <= 128 else 32, next_power_of_2(group))
    # 32 keys a block at every head_dim. H200, Qwen2.5-0.5B's heads (7 per kv head, d64), one
    # layer's extend attention, 32 against 64 keys: 15 prompts x 1,092 new tokens 161.9 vs
    # 168.6 us; 180 suffixes of 88 tokens after 1,024 cached 276.5 vs 300.9; a mixed step of
    # 700 decodes at 1,150 keys and those suffixes 393.1 vs 430.7; 600 decodes at 600 and 14
    # prompts of 1,100 214.7 vs 230.4 (eleventh session, docs/benchmarks.md).
    block_n = 32
    return block_m, block_n, block_d


def tokens_per_block(num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """New tokens per kernel program (and per entry of the `extend_blocks` work list)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = num_q_heads // num_kv_heads
    return _tile_shape(group, head_dim)[0] // group


def extend_blocks(
    extend_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[list[int], list[int]]:
    """The work list for `extend_attention`: (block_seq, block_start), one entry per block of new tokens.

    Sequence b gets ceil(extend_lens[b] / tokens_per_block) blocks (none when it adds no
    token), starting at new-token indices 0, tokens_per_block, ... Host lists, built from
    the batch's host-side lengths so the launch needs no device sync.
    """
    step = tokens_per_block(num_q_heads, num_kv_heads, head_dim)
    block_seq: list[int] = []
    block_start: list[int] = []
    for b, n in enumerate(extend_lens):
        starts = range(0, n, step)
        block_seq += [b] * len(starts)
        block_start += starts
    return block_seq, block_start


def extend_attention(
    q: torch.Tensor,  # [T, num_q_heads, head_dim]: new tokens of all sequences, concatenated
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim], new K already stored
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim], new V already stored
    qo_indptr: torch.Tensor,  # [B + 1] int32: sequence b's queries are rows qo_indptr[b]:qo_indptr[b+1]
    prefix_lens: torch.Tensor,  # [B] int32: cached tokens before this step's new ones
    page_table: torch.Tensor,  # [B, max_pages] int32
    max_extend_len: int,  # the longest extend in the batch (host value, no sync)
    scale: float,
    out: torch.Tensor | None = None,
    block_seq: torch.Tensor | None = None,  # [NB] int32: the sequence of each block, from extend_blocks
    block_start: torch.Tensor | None = None,  # [NB] int32: the block's first new-token index in it
    num_blocks: torch.Tensor | None = None,  # [1] int32 on the device: entries of the work list in use
) -> torch.Tensor:
    """Query i of sequence b sits at position prefix_lens[b] + i and attends keys 0..that position.

    block_seq/block_start, the work list from `extend_blocks` (same head counts and head_dim)
    copied to the device, launch one program per block that holds tokens. Without them every
    sequence gets blocks up to max_extend_len, most of them empty in a mixed batch.

    num_blocks: only the first num_blocks[0] entries of the work list run, the grid still covering
    all of it: a launch whose shape does not depend on the batch, for a CUDA graph that replays it
    over static buffers.

    Returns `out` ([T, num_q_heads, head_dim], q's dtype), allocated when not given.
    """
    check_launchable(
        _extend_kernel, q, k_cache, v_cache, qo_indptr, prefix_lens, page_table, out, block_seq, block_start,
        num_blocks,
    )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t, FLOAT_DTYPES)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    for name, t in (("qo_indptr", qo_indptr), ("prefix_lens", prefix_lens), ("page_table", page_table)):
        check_dtype(name, t, (torch.int32,))
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"expected q [T, Hq, D] and equal k/v caches [pages, page_size, Hkv, D]; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}, v_cache {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_head_dim}) differ")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    batch = prefix_lens.shape[0]
    if qo_indptr.shape != (batch + 1,) or page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(
            f"qo_indptr must be [{batch + 1}] and page_table [{batch}, max_pages]; got "
            f"{tuple(qo_indptr.shape)} and {tuple(page_table.shape)}"
        )
    if page_table.stride(1) != 1:
        raise ValueError("page_table rows must be contiguous")
    if (block_seq is None) != (block_start is None):
        raise ValueError("give both block_seq and block_start, or neither")
    if block_seq is not None:
        for name, t in (("block_seq", block_seq), ("block_start", block_start)):
            check_dtype(name, t, (torch.int32,))
        if block_seq.dim() != 1 or block_start.shape != block_seq.shape or not (
            block_seq.is_contiguous() and block_start.is_contiguous()
        ):
            raise ValueError(
                f"block_seq and block_start must be equal contiguous 1-D tensors; got {tuple(block_seq.shape)} "
                f"and {tuple(block_start.shape)}"
            )
    if num_blocks is not None and (block_seq is None or num_blocks.dtype != torch.int32 or num_blocks.numel() != 1):
        raise ValueError("num_blocks must be a one-element int32 tensor, given with block_seq and block_start")
    if max_extend_len < 0:
        raise ValueError(f"max_extend_len must be >= 0, got {max_extend_len}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor with a contiguous last dim")
    if num_tokens == 0 or batch == 0 or max_extend_len == 0:
        return out

    group = num_q_heads // num_kv_heads
    block_m, block_n, block_d = _tile_shape(group, head_dim)
    block_tokens = block_m // group
    if block_seq is None:
        # Every (sequence, block) pair up to the longest extend, built on the device from host
        # values only (no sync); the kernel skips the blocks past a sequence's tokens.
        blocks_per_seq = -(-max_extend_len // block_tokens)
        block_seq = torch.arange(batch, dtype=torch.int32, device=q.device).repeat_interleave(blocks_per_seq)
        block_start = (torch.arange(blocks_per_seq, dtype=torch.int32, device=q.device) * block_tokens).repeat(batch)
    if block_seq.shape[0] == 0:
        return out
    grid = (block_seq.shape[0], num_kv_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, qo_indptr, prefix_lens, page_table, block_seq, block_start,
        num_blocks if num_blocks is not None else block_seq,  # unread unless BOUNDED
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, HEAD_DIM=head_dim, TOKENS_PER_BLOCK=block_tokens,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_FP32=k_cache.dtype == torch.float32 or is_interpreted(_extend_kernel),
        BOUNDED=num_blocks is not None,
        num_warps=4, num_stages=2,
    )
    return out
