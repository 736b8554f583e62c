"""Decode attention for sequences that share a cached prefix (cascade attention).

When many running sequences start with the same cached pages (one long system prompt, one
document with many questions: the radix cache hands them the same pages), the split decode
kernel still reads those pages once per sequence, and at a large batch those reads are most
of a decode step. Here the rows that share a prefix attend to it together: one program loads
each prefix key and value once and scores it against the queries of up to ROWS rows times
their GQA group, a [ROWS * BLOCK_H, head_dim] tile (a prefill-sized matmul in place of ROWS
decode-sized ones). Each row's keys after the prefix go through the split decode kernel
(`kv_starts`), which also does the step's rotary embedding and K/V store; the merge kernel
then combines the row's partial softmaxes by their log-sum-exps, as it combines splits.

The work list (`SharedPrefix.items`) has one entry per ROWS rows of one group: a group of 32
rows at ROWS = 8 reads its prefix 4 times a step instead of 32. Entries past
`num_items` are not run, so CUDA graphs capture the grid once for the largest list.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.decode_attention import (
    LOG2E,
    DecodeRope,
    _launch_settings,
    _rope_factors,
    _rotate,
    launch_decode_merge,
    launch_decode_split,
    prepare_decode_call,
    split_buffers,
)
from pipeline_infer.kernels.triton.launch import check_dtype, check_launchable, is_interpreted, next_power_of_2
from pipeline_infer.kernels.triton.paged_block import attend_paged_range, dot_operand

# Query rows of one program: ROWS sequences x BLOCK_H heads. 128 keeps the fp32 accumulator of
# a head_dim 128 tile in registers at 8 warps. At head_dim <= 64 the tile is 64 rows: such a
# program needs few enough registers to share an SM with the own-keys pass's programs, so the
# two passes overlap (see shared_prefix_decode_attention).
TILE_ROWS = 128
SMALL_HEAD_TILE_ROWS = 64
MAX_PREFIX_SPLITS = 16
ITEM_FIELDS = 4  # first index into rows, number of rows, prefix length, batch row holding the prefix pages


class SharedPrefix(NamedTuple):
    """Which rows of a decode batch share which prefix (built by pipeline_infer/shared_prefix.py)."""

    kv_starts: torch.Tensor  # [B] int32: row b's own keys start here; the keys before are its shared prefix (0: none)
    rows: torch.Tensor  # [R] int32: batch rows, each group's rows next to each other
    items: torch.Tensor  # [max_items, ITEM_FIELDS] int32: one entry per rows_per_item rows of a group
    num_items: torch.Tensor  # [1] int32: entries in use
    num_splits: int  # splits of each prefix (programs per entry and kv head)


def rows_per_item(num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Sequences one program attends to its prefix at once."""
    tile = SMALL_HEAD_TILE_ROWS if head_dim <= 64 else TILE_ROWS
    return max(1, tile // max(1, next_power_of_2(num_q_heads // num_kv_heads)))


def own_keys_warps(head_dim: int) -> int | None:
    """num_warps of the split decode kernel over each row's keys after its prefix (None: its default).

    Those ranges are short (a row's own prompt suffix and output), so a program has few key
    blocks to overlap and more warps help: H200, 1,024 rows x 100-400 own keys, d64: 4 warps
    44.1 us, 2 warps (decode_attention's default at d64) 48.9 us (ninth session).
    """
    return 4 if head_dim <= 64 else None


def choose_prefix_splits(num_items: int, num_kv_heads: int, longest_prefix: int, num_sms: int) -> int:
    """As many splits of each prefix as fit in one wave of two programs an SM (at least one),
    none shorter than 256 keys. Rounding up instead started a second, mostly idle wave: H200,
    1,024 rows in 32 groups (128 programs a split), the prefix pass took 25.0 us at 3 splits
    against 19.5 us at 2 (4: 23.7); at 512 rows (64 programs) 4 splits were best (11.8 us)."""
    programs = max(1, num_items * num_kv_heads)
    wanted = max(1, 2 * num_sms // programs)
    by_length = max(1, -(-longest_prefix // 256))
    return max(1, min(wanted, by_length, MAX_PREFIX_SPLITS))


@triton.jit
def _shared_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, rows_ptr, items_ptr, num_items_ptr, part_ptr, lse_ptr,
    sm_scale_log2, num_splits, first_slot,
    stride_qb, stride_qh,
    stride_kp, stride_ko, stride_kh, stride_vp, stride_vo, stride_vh,
    stride_pt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    pos_ptr, cos_sin_ptr, stride_cs,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, FUSE_ROPE: tl.constexpr, HALF: tl.constexpr,
):
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Entries past num_items (graph replay: the grid is sized for the largest list) do nothing.
    live = item < tl.load(num_items_ptr)
    entry = items_ptr + item * 4  # ITEM_FIELDS ints an entry
    first_row = tl.load(entry, mask=live, other=0)
    num_rows = tl.load(entry + 1, mask=live, other=0)
    prefix_len = tl.load(entry + 2, mask=live, other=0)
    table_row = tl.load(entry + 3, mask=live, other=0).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)

    # Tile row m is query head m % BLOCK_H of the group's (m // BLOCK_H)-th sequence.
    offs_m = tl.arange(0, ROWS * BLOCK_H)
    r = offs_m // BLOCK_H
    h = offs_m % BLOCK_H
    r_mask = r < num_rows
    m_mask = r_mask & (h < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    b = tl.load(rows_ptr + first_row + r, mask=r_mask, other=0).to(tl.int64)
    heads = kvh * GROUP + h
    q_ptrs = q_ptr + b[:, None] * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=md_mask, other=0.0)
    if FUSE_ROPE:
        # q arrives unrotated (the decode kernel rotates its own copy): rotate each row by its position.
        pos = tl.load(pos_ptr + b, mask=r_mask, other=0).to(tl.int64)
        cos, sin, partner = _rope_factors(cos_sin_ptr + pos[:, None] * stride_cs, offs_d, HALF)
        q_pair = tl.load(q_ptrs + partner[None, :], mask=md_mask, other=0.0)
        q = _rotate(q, q_pair, cos, sin).to(q_ptr.dtype.element_ty)
    q = dot_operand(q, k_cache_ptr, DOT_FP32)

    out, lse = attend_paged_range(
        q, k_cache_ptr, v_cache_ptr, page_table_ptr + table_row * stride_pt, start, end, offs_m,
        kvh * stride_kh, kvh * stride_vh, stride_kp, stride_ko, stride_vp, stride_vo,
        sm_scale_log2, offs_d, d_mask,
        M=ROWS * BLOCK_H, BLOCK_D=BLOCK_D, PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, DOT_FP32=DOT_FP32,
    )
    # An empty split writes zeros and lse = -inf, so the merge weighs it 0.
    slot = first_slot + split
    o_ptrs = part_ptr + b[:, None] * stride_ob + heads[:, None] * stride_oh + slot * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out, mask=md_mask)
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + slot, lse, mask=m_mask)


def shared_prefix_decode_attention(
    q: torch.Tensor,  # [B, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32, keys per sequence including the current token
    scale: float,
    shared: SharedPrefix,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    rope: DecodeRope | None = None,
    side_stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    """decode_attention's result (same arguments), reading each shared prefix once per work-list entry.

    The caller guarantees what `shared` says: every row listed in an entry has the entry's
    prefix length as its kv_starts, fewer than its seq_len, and its first kv_starts keys in the
    same pages as the entry's table row. Rows with kv_starts 0 attend as in decode_attention.

    With side_stream (a CUDA stream other than the current one), the prefix pass runs on it,
    concurrently with the own-keys pass (launched first or second: `prefix_pass_first`), and the
    current stream waits for it before the merge.
    The two passes write different slots and read nothing the other writes (the own-keys pass
    stores the new token's K/V, which lies past every prefix), and they load the GPU in
    different ways: the prefix pass is a few hundred matmul-bound programs, the own-keys pass
    thousands of short memory-bound ones, so run one after the other each leaves part of the
    machine idle. H200, Qwen2.5-0.5B heads, 1,024-key prefixes, one layer (thirteenth session):
    1,024 rows 54.5 -> 48.9 us, 512 rows 44.4 -> 39.6, 256 rows 36.8 -> 32.0. With the rotary
    and K/V store as the engine runs them (fourteenth session) 63.8 -> 59.9 us at 1,024 rows
    and 49.0 -> 44.0 at 512, but the passes barely overlap there (own keys 28.7 + prefix 27.3
    + merge 3.7 = 59.7 us): both are latency-bound and compete for the SMs' program slots, so
    what the second stream saves is mostly the gaps between launches. Works under CUDA graph
    capture (the fork and join become graph edges).
    """
    check_launchable(_shared_prefix_kernel, q, k_cache, v_cache, page_table, seq_lens, out, *shared[:4], *(rope or ()))
    out, num_kv_splits = prepare_decode_call(q, k_cache, v_cache, page_table, seq_lens, num_kv_splits, out, rope)
    _check_shared(shared, q.shape[0])
    if q.shape[0] == 0:
        return out
    block_n, num_warps, num_stages = _launch_settings(q.shape[2], None, own_keys_warps(q.shape[2]), None)
    slots = num_kv_splits + shared.num_splits
    part, lse = split_buffers(q, slots)
    main = torch.cuda.current_stream(q.device) if side_stream is not None else None

    def own_keys() -> None:
        launch_decode_split(q, k_cache, v_cache, page_table, seq_lens, scale, part, lse, num_kv_splits, rope,
                            kv_starts=shared.kv_starts, block_n=block_n, num_warps=num_warps, num_stages=num_stages)

    if main is None:
        own_keys()
        _launch_prefix(q, k_cache, v_cache, page_table, scale, shared, part, lse, num_kv_splits, rope)
    else:
        side_stream.wait_stream(main)  # the fork: the prefix pass may start once q is ready
        prefix_first = prefix_pass_first(q.shape[2], q.shape[0])
        if not prefix_first:
            own_keys()
        with torch.cuda.stream(side_stream):
            _launch_prefix(q, k_cache, v_cache, page_table, scale, shared, part, lse, num_kv_splits, rope)
        if prefix_first:
            own_keys()
        main.wait_stream(side_stream)  # the join, before the merge reads both passes' slots
    launch_decode_merge(part, lse, out, slots, kv_starts=shared.kv_starts, num_own_splits=num_kv_splits)
    return out


# Rows from which the side stream's prefix pass goes first at head_dim <= 64 (prefix_pass_first).
PREFIX_FIRST_MIN_ROWS = 512


def prefix_pass_first(head_dim: int, rows: int) -> bool:
    """Whether the side stream's prefix pass is launched before the own-keys pass.

    Whichever pass is launched first takes the SMs; the other's programs fill in where registers
    are left. A 128-row prefix tile (head_dim > 64 now) needs most of an SM's registers, so the
    own-keys pass's many short programs go first and the prefix pass's follow as they finish
    (H200, head_dim 64 when its tile was 128 rows, 1,024 rows: 48.9 against 52.5 us a layer the
    other way round, thirteenth session). The 64-row tile of head_dim <= 64 leaves room beside
    it: from 512 rows, where each of its programs reads 512-1,024 prefix keys, launched first it
    starts its few long programs at once and the own-keys programs run alongside. Below that
    (2-4 prefix splits of short ranges) and where many rows read long own ranges the own-keys
    pass first is better. H200, Qwen2.5-0.5B heads, 1,024-key prefixes, one layer with rotary
    and K/V store, us, 8-row entries with the prefix pass first / second, and the 16-row entries
    launched second of before (fifteenth session; GROUPSxROWS:OWN KEYS[+ROWS IN NO GROUP]):

        32x32:40-200   52.4 / 63.2, before 60.2     32x16:40-200        32.6 / 37.5, before 44.1
        32x32:150-400  72.4 / 81.8, before 80.4     32x8:150-400        32.4 / 28.8, before 36.8
        64x16:40-200   53.3 / 64.1, before 60.7     8x8:150-400         13.3 / 13.4, before 16.3
        16x32:40-200+512  109.3 / 114.2, 114.3      16x8:40-200+128     59.6 / 53.8, before 54.2
        8x16:100-300+896  154.0 / 150.9, 165.5      32x27:150-400+160  109.0 / 97.3, before 100.7

    (The last: 160 ungrouped rows reading ~1,300 keys each start behind the prefix pass; the one
    shape measured slower than before, by 8%.)
    """
    return head_dim <= 64 and rows >= PREFIX_FIRST_MIN_ROWS


def _launch_prefix(q, k_cache, v_cache, page_table, scale, shared: SharedPrefix, part, lse, first_slot, rope) -> None:
    _, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_h = next_power_of_2(group)
    rows = rows_per_item(num_q_heads, num_kv_heads, head_dim)
    block_d = next_power_of_2(head_dim)
    if rope is None:
        pos, cos_sin, stride_cs, half = shared.kv_starts, q, 0, 0  # unused
    else:
        pos, cos_sin = rope.positions, rope.cos_sin_cache
        stride_cs, half = cos_sin.stride(0), cos_sin.shape[1] // 2
    _shared_prefix_kernel[(shared.items.shape[0], num_kv_heads, shared.num_splits)](
        q, k_cache, v_cache, page_table, shared.rows, shared.items, shared.num_items, part, lse,
        scale * LOG2E, shared.num_splits, first_slot,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        pos, cos_sin, stride_cs,
        PAGE_SIZE=page_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_H=block_h, ROWS=rows,
        # Launch settings at head_dim 64: best of 153 (rows per entry 8/16/32, BLOCK_N 32-128, 4/8
        # warps, 1-3 stages, 1/2/4 splits) by the whole cascade's time with the passes on two
        # streams, H200, 1,024 and 512 rows x a 1,024-key prefix (fifteenth session; the
        # thirteenth's sweep of the pass alone had picked 16 rows and 2 stages).
        BLOCK_D=block_d, BLOCK_N=64 if head_dim <= 64 else 32,
        DOT_FP32=k_cache.dtype == torch.float32 or is_interpreted(_shared_prefix_kernel),
        FUSE_ROPE=rope is not None, HALF=half,
        num_warps=4 if block_d <= 64 else 8, num_stages=3 if block_d <= 64 else 2,
    )


def _check_shared(shared: SharedPrefix, batch: int) -> None:
    for name in ("kv_starts", "rows", "items", "num_items"):
        check_dtype(f"shared.{name}", getattr(shared, name), (torch.int32,))
    if shared.kv_starts.shape != (batch,):
        raise ValueError(f"shared.kv_starts must have shape ({batch},), got {tuple(shared.kv_starts.shape)}")
    if shared.items.dim() != 2 or shared.items.shape[1] != ITEM_FIELDS or not shared.items.is_contiguous():
        raise ValueError(f"shared.items must be a contiguous [max_items, {ITEM_FIELDS}] tensor, got {tuple(shared.items.shape)}")
    if shared.num_items.numel() != 1:
        raise ValueError(f"shared.num_items must hold one value, got {shared.num_items.numel()}")
    if not 1 <= shared.num_splits <= MAX_PREFIX_SPLITS:
        raise ValueError(f"shared.num_splits must be in [1, {MAX_PREFIX_SPLITS}], got {shared.num_splits}")
