"""Paged decode attention, flash-decoding style: split the KV length, then merge the splits.

Stage 1 runs one program per (sequence, kv head, split). It loads each key/value of its
split once and scores it against all the query heads of the kv head's GQA group at once
(the group is padded to 16 rows, the smallest `tl.dot` tile), so KV traffic does not grow
with the group size. It writes the split's normalised output and its log-sum-exp.
Stage 2 merges the splits of each sequence, all its query heads in one program. With one
split, stage 1 writes the final output directly and stage 2 is skipped.

With `rope` given (decode_attention's last argument), stage 1 also does the step's rotary
embedding and K/V store, the work of rope_store_kv: each program rotates its group's queries
as it loads them, and the program whose split holds the new token rotates that token's key,
writes key and value to the token's cache slot, and only then reads its keys. That saves a
kernel launch and a round trip of q through memory per layer and step (decode steps are
~10 kernels a layer, and at small batches each costs more in launch gaps than in work).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import (
    FLOAT_DTYPES,
    check_dtype,
    check_launchable,
    device_num_sms,
    is_interpreted,
    next_power_of_2,
)
from pipeline_infer.kernels.triton.paged_block import attend_paged_range, dot_operand

LOG2E = 1.4426950408889634
MAX_KV_SPLITS = 64
# Grid order of the split kernel. False: (batch, kv heads, splits), a row's kv heads a batch
# apart in launch order. True: (kv heads, batch, splits), a row's kv heads in adjacent programs,
# which then read the same pages (a token's heads share 256 bytes at head_dim 64) at about the
# same time. On: H200, 2026-11-30 (tenth session), the kernel alone took 1-2% less at 512-1,024
# rows (512 rows x 1,100 tokens: 73.7 -> 72.1 us at the default setting) and decode-heavy
# 2.64 -> 2.61 s in one call (docs/benchmarks.md). Tests run both orders.
HEADS_FASTEST = True
# A split shorter than this spends more on its merge than it saves in parallelism.
MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    sm_scale_log2, num_splits, kv_start_ptr,
    stride_qb, stride_qh,
    stride_kp, stride_ko, stride_kh, stride_vp, stride_vo, stride_vh,
    stride_pt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_FP32: tl.constexpr,
    # Fused rotary + K/V store (FUSE_ROPE): the new token's k/v rows, position, cache slot,
    # and the [max_position, 2 * HALF] cos|sin table.
    k_new_ptr, v_new_ptr, pos_ptr, loc_ptr, cos_sin_ptr,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cs,
    FUSE_ROPE: tl.constexpr, HALF: tl.constexpr,
    # HAS_START: sequence b attends only to keys from kv_start_ptr[b] on (the keys before are a
    # shared prefix that shared_prefix_attention attends to once for the rows sharing it).
    HAS_START: tl.constexpr,
    # HEADS_FASTEST: the grid is (kv heads, batch, splits), so a row's kv heads run in adjacent
    # programs (launch_decode_split passes the module constant HEADS_FASTEST above).
    HEADS_FASTEST: tl.constexpr = False,
):
    if HEADS_FASTEST:
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    first = 0
    if HAS_START:
        first = tl.load(kv_start_ptr + b)
    # Splits are whole multiples of BLOCK_N so only a sequence's last block is partly masked.
    split_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    b64 = b.to(tl.int64)
    q_ptrs = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if FUSE_ROPE:
        pos = tl.load(pos_ptr + b64).to(tl.int64)
        cos, sin, partner = _rope_factors(cos_sin_ptr + pos * stride_cs, offs_d, HALF)
        q_pair = tl.load(q_ptrs + partner[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        # Rounded to q's dtype, as rope_store_kv's separate q buffer would be.
        q = _rotate(q, q_pair, cos, sin).to(q_ptr.dtype.element_ty)
        last = seq_len - 1
        if (last >= start) & (last < end):
            # This split attends over the new token: put its key and value in the cache first.
            slot = tl.load(loc_ptr + b64).to(tl.int64)
            k_row = k_new_ptr + b64 * stride_knb + kvh * stride_knh
            k_new = tl.load(k_row + offs_d, mask=d_mask, other=0.0)
            k_pair = tl.load(k_row + partner, mask=d_mask, other=0.0)
            k_dst = k_cache_ptr + (slot // PAGE_SIZE) * stride_kp + (slot % PAGE_SIZE) * stride_ko + kvh * stride_kh
            tl.store(k_dst + offs_d, _rotate(k_new, k_pair, cos, sin).to(k_cache_ptr.dtype.element_ty), mask=d_mask)
            v_new = tl.load(v_new_ptr + b64 * stride_vnb + kvh * stride_vnh + offs_d, mask=d_mask, other=0.0)
            v_dst = v_cache_ptr + (slot // PAGE_SIZE) * stride_vp + (slot % PAGE_SIZE) * stride_vo + kvh * stride_vh
            tl.store(v_dst + offs_d, v_new.to(v_cache_ptr.dtype.element_ty), mask=d_mask)
        # The block's threads read what others of them just wrote: a barrier orders the two.
        tl.debug_barrier()
    q = dot_operand(q, k_cache_ptr, DOT_FP32)

    out, lse = attend_paged_range(
        q, k_cache_ptr, v_cache_ptr, page_table_ptr + b64 * stride_pt, start, end, offs_h,
        kvh * stride_kh, kvh * stride_vh, stride_kp, stride_ko, stride_vp, stride_vo,
        sm_scale_log2, offs_d, d_mask,
        M=BLOCK_H, BLOCK_D=BLOCK_D, PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, DOT_FP32=DOT_FP32,
    )
    # An empty split (short sequence) writes zeros and lse = -inf, so the merge weighs it 0.
    o_ptrs = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _rope_factors(cos_sin_row, offs_d, HALF: tl.constexpr):
    """Per-dim cos, signed sin and partner dim of rotate-half rotary for one position.

    rotated[d] = x[d] * cos[d] + x[partner[d]] * sin[d]: for d < HALF the partner is d + HALF
    and sin is negated (x1 cos - x2 sin), for HALF <= d < 2 HALF it is d - HALF (x2 cos + x1
    sin); dims past 2 HALF (partial rotary) pass through (cos 1, sin 0, partner d). The same
    rotation as rotary.rotate_heads (rope_store_kv's), written per dim so it applies to the
    [heads, head_dim] tile already loaded; the two agree up to how the compiler fuses the
    float32 multiply-adds (tests/test_decode_attention_rope.py compares them).
    """
    first = offs_d < HALF
    rotated = offs_d < 2 * HALF
    freq = tl.where(first, offs_d, offs_d - HALF)
    cos = tl.load(cos_sin_row + freq, mask=rotated, other=1.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + freq, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.where(first, -sin, sin)
    partner = tl.where(first, offs_d + HALF, tl.where(rotated, offs_d - HALF, offs_d))
    return cos, sin, partner


@triton.jit
def _rotate(x, x_pair, cos, sin):
    return x.to(tl.float32) * cos + x_pair.to(tl.float32) * sin


@triton.jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    kv_start_ptr, num_own_splits,
    NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_START: tl.constexpr,
):
    # One program merges every query head of one sequence. A program per (sequence, head)
    # made 14 tiny programs a row (Qwen2.5-0.5B) that the GPU spent more time scheduling than
    # merging: 1,024 rows x 2 splits took 10.2 us, this 2.8 us (H200, ninth session).
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_HEADS)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    d_mask = offs_d < HEAD_DIM
    num_read = num_splits
    if HAS_START:
        # Splits from num_own_splits on hold the shared-prefix pass, written only for rows that
        # have a prefix (kv_start > 0): the other rows never read them.
        num_read = tl.where(tl.load(kv_start_ptr + b) > 0, num_splits, num_own_splits)
    lse_row = lse_ptr + b * stride_lb + offs_h * stride_lh
    lse = tl.load(lse_row[:, None] + offs_s[None, :], mask=h_mask[:, None] & (offs_s < num_read)[None, :],
                  other=float("-inf"))
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp2(lse - m[:, None]), 1)
    # The weighted sum runs slot by slot so the [heads, head_dim] tile is all a program holds,
    # whatever the split count.
    acc = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=tl.float32)
    part_row = part_ptr + b * stride_pb + offs_h[:, None] * stride_ph + offs_d[None, :]
    hd_mask = h_mask[:, None] & d_mask[None, :]
    for s in range(0, num_read):
        w = tl.exp2(tl.load(lse_row + s, mask=h_mask, other=float("-inf")) - m)
        acc += w[:, None] * tl.load(part_row + s * stride_ps, mask=hd_mask, other=0.0)
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    o_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)


class DecodeRope(NamedTuple):
    """The step's rotary + K/V store, for decode_attention to do itself (see the module doc)."""

    k: torch.Tensor  # [B, num_kv_heads, head_dim] new keys, not yet rotated; strided rows are fine
    v: torch.Tensor  # [B, num_kv_heads, head_dim] new values
    positions: torch.Tensor  # [B] int32/int64: the new token's position (seq_lens - 1)
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim] fp32: cos half, then sin half
    out_cache_loc: torch.Tensor  # [B] int32/int64: the new token's cache slot


def choose_num_kv_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough splits to give every SM about two programs, without splits shorter than 256 tokens."""
    programs = max(1, batch_size * num_kv_heads)
    wanted = -(-2 * num_sms // programs)
    by_length = max(1, -(-max_seq_len // MIN_TOKENS_PER_SPLIT))
    return max(1, min(wanted, by_length, MAX_KV_SPLITS))


def default_launch(head_dim: int) -> tuple[int, int, int]:
    """decode_attention's (block_n, num_warps, num_stages) when the caller gives none."""
    block_n = 64 if head_dim <= 128 else 32
    if head_dim <= 64:
        # H200, 2026-11-30, eighth session (docs/benchmarks.md): two warps a program (more
        # programs resident per SM) and two stages. Kernel sweep, 1024 rows x 1200 tokens, d64:
        # 188.5 -> 164.8 us; whole decode-heavy run 3.17 -> 2.75 s in the same call.
        return block_n, 2, 2
    return block_n, 4, 2


def decode_attention(
    q: torch.Tensor,  # [B, num_q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32, keys per sequence including the current token
    scale: float,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    rope: DecodeRope | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each sequence's first seq_lens[b] cached keys.

    With `rope`, q is not yet rotated and the new token (key seq_lens[b] - 1) is not yet in
    the cache: the kernel rotates q and rope.k by rope.positions and stores the rotated key and
    rope.v at rope.out_cache_loc before attending, as rope_store_kv then this would.

    num_kv_splits=None picks it from the batch shape and page_table's width (an upper bound
    on the sequence length, so no device-to-host copy is needed). Returns `out`
    ([B, num_q_heads, head_dim], q's dtype), allocated when not given. block_n (keys per
    inner step), num_warps and num_stages are launch settings, exposed for tuning sweeps
    (benchmarks/attention_kernels.py --sweep); they do not change the result beyond rounding.
    """
    check_launchable(_decode_split_kernel, q, k_cache, v_cache, page_table, seq_lens, out, *(rope or ()))
    out, num_kv_splits = prepare_decode_call(q, k_cache, v_cache, page_table, seq_lens, num_kv_splits, out, rope)
    if q.shape[0] == 0:
        return out
    block_n, num_warps, num_stages = _launch_settings(q.shape[2], block_n, num_warps, num_stages)
    if num_kv_splits == 1:
        # One split: stage 1 writes the output itself (lse is unused: WRITE_LSE=False).
        launch_decode_split(q, k_cache, v_cache, page_table, seq_lens, scale, out, None, 1, rope,
                            block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        return out
    part, lse = split_buffers(q, num_kv_splits)
    launch_decode_split(q, k_cache, v_cache, page_table, seq_lens, scale, part, lse, num_kv_splits, rope,
                        block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    launch_decode_merge(part, lse, out, num_kv_splits)
    return out


def prepare_decode_call(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, num_kv_splits: int | None, out: torch.Tensor | None, rope: DecodeRope | None,
) -> tuple[torch.Tensor, int]:
    """Checks a decode call's arguments (decode_attention's): returns the output tensor
    (allocated when None) and the split count (chosen when None; 0 for an empty batch, which
    launches nothing)."""
    batch, _, head_dim = _check_decode_args(q, k_cache, v_cache, page_table, seq_lens)
    _, page_size, num_kv_heads, _ = k_cache.shape
    if rope is not None:
        _check_rope_args(rope, batch, num_kv_heads, head_dim)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even when q is a view
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor with a contiguous last dim")
    if batch == 0:
        return out, 0
    if num_kv_splits is None:
        max_len = page_table.shape[1] * page_size
        num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, max_len, device_num_sms(q.device))
    if not 1 <= num_kv_splits <= MAX_KV_SPLITS:
        raise ValueError(f"num_kv_splits must be in [1, {MAX_KV_SPLITS}], got {num_kv_splits}")
    return out, num_kv_splits


def _launch_settings(
    head_dim: int, block_n: int | None, num_warps: int | None, num_stages: int | None
) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages): the ones given, default_launch's for the others."""
    default_block_n, default_warps, default_stages = default_launch(head_dim)
    block_n = default_block_n if block_n is None else block_n
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    return block_n, num_warps, num_stages


def split_buffers(q: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's per-split outputs [B, Hq, num_slots, pow2(head_dim)] and log-sum-exps [B, Hq, num_slots], fp32."""
    batch, num_q_heads, head_dim = q.shape
    part = torch.empty((batch, num_q_heads, num_slots, next_power_of_2(head_dim)), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_q_heads, num_slots), dtype=torch.float32, device=q.device)
    return part, lse


def launch_decode_split(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
    part: torch.Tensor,  # the output [B, Hq, D] when lse is None, else split_buffers' part
    lse: torch.Tensor | None, num_kv_splits: int, rope: DecodeRope | None,
    kv_starts: torch.Tensor | None = None,  # [B] int32: first key each sequence attends to (default 0)
    *, block_n: int, num_warps: int, num_stages: int,  # _launch_settings' (callers pick, no second set of defaults)
) -> None:
    """Stage 1 (arguments already checked): splits 0..num_kv_splits-1 of each sequence's keys."""
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if lse is None:
        part_strides, lse, lse_strides = (part.stride(0), part.stride(1), 0), part, (0, 0)
    else:
        part_strides, lse_strides = (part.stride(0), part.stride(1), part.stride(2)), (lse.stride(0), lse.stride(1))
    heads_fastest = HEADS_FASTEST
    grid = (num_kv_heads, batch, num_kv_splits) if heads_fastest else (batch, num_kv_heads, num_kv_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, page_table, seq_lens, part, lse,
        scale * LOG2E, num_kv_splits, seq_lens if kv_starts is None else kv_starts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        *part_strides, *lse_strides,
        PAGE_SIZE=page_size, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_H=max(16, next_power_of_2(group)), BLOCK_D=next_power_of_2(head_dim), BLOCK_N=block_n,
        WRITE_LSE=lse is not part, DOT_FP32=k_cache.dtype == torch.float32 or is_interpreted(_decode_split_kernel),
        **_rope_args(rope, q, seq_lens), HAS_START=kv_starts is not None, HEADS_FASTEST=heads_fastest,
        num_warps=num_warps, num_stages=num_stages,
    )


def launch_decode_merge(
    part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, num_slots: int,
    kv_starts: torch.Tensor | None = None, num_own_splits: int | None = None,
) -> None:
    """Stage 2: out[b, h] from the num_slots partial results of (b, h), weighted by their lse.

    With kv_starts, slots from num_own_splits on are read only for rows with kv_starts[b] > 0.
    """
    batch, num_q_heads, head_dim = out.shape
    _decode_merge_kernel[(batch,)](
        part, lse, out, num_slots,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        lse if kv_starts is None else kv_starts, num_slots if num_own_splits is None else num_own_splits,
        NUM_HEADS=num_q_heads, BLOCK_HEADS=next_power_of_2(num_q_heads), HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim), BLOCK_S=next_power_of_2(num_slots), HAS_START=kv_starts is not None,
    )


def _rope_args(rope: DecodeRope | None, q: torch.Tensor, seq_lens: torch.Tensor) -> dict:
    if rope is None:
        # Unused pointers and strides when FUSE_ROPE is off (any tensor will do).
        return dict(
            k_new_ptr=q, v_new_ptr=q, pos_ptr=seq_lens, loc_ptr=seq_lens, cos_sin_ptr=q,
            stride_knb=0, stride_knh=0, stride_vnb=0, stride_vnh=0, stride_cs=0, FUSE_ROPE=False, HALF=0,
        )
    return dict(
        k_new_ptr=rope.k, v_new_ptr=rope.v, pos_ptr=rope.positions, loc_ptr=rope.out_cache_loc,
        cos_sin_ptr=rope.cos_sin_cache, stride_knb=rope.k.stride(0), stride_knh=rope.k.stride(1),
        stride_vnb=rope.v.stride(0), stride_vnh=rope.v.stride(1), stride_cs=rope.cos_sin_cache.stride(0),
        FUSE_ROPE=True, HALF=rope.cos_sin_cache.shape[1] // 2,
    )


def _check_rope_args(rope: DecodeRope, batch: int, num_kv_heads: int, head_dim: int) -> None:
    for name in ("k", "v"):
        t = getattr(rope, name)
        check_dtype(f"rope.{name}", t, FLOAT_DTYPES)
        if t.shape != (batch, num_kv_heads, head_dim) or t.stride(-1) != 1:
            raise ValueError(
                f"rope.{name} must be [{batch}, {num_kv_heads}, {head_dim}] with a contiguous last dim, got {tuple(t.shape)}"
            )
    for name in ("positions", "out_cache_loc"):
        t = getattr(rope, name)
        check_dtype(f"rope.{name}", t, (torch.int32, torch.int64))
        if t.shape != (batch,):
            raise ValueError(f"rope.{name} must have shape ({batch},), got {tuple(t.shape)}")
    table = rope.cos_sin_cache
    check_dtype("rope.cos_sin_cache", table, FLOAT_DTYPES)
    if table.dim() != 2 or table.stride(-1) != 1 or table.shape[1] % 2 or not 2 <= table.shape[1] <= head_dim:
        raise ValueError(
            f"rope.cos_sin_cache must be [max_position, rotary_dim] with even rotary_dim in [2, {head_dim}] "
            f"and a contiguous last dim, got {tuple(table.shape)}"
        )


def _check_decode_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[int, int, int]:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t, FLOAT_DTYPES)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    check_dtype("page_table", page_table, (torch.int32,))
    check_dtype("seq_lens", seq_lens, (torch.int32,))
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k/v caches [pages, page_size, Hkv, D]; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({k_cache.shape[3]}) differ")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.stride(1) != 1:
        raise ValueError(f"page_table must be a [{batch}, max_pages] int32 tensor with contiguous rows, got {tuple(page_table.shape)}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must have shape ({batch},), got {tuple(seq_lens.shape)}")
    return batch, num_q_heads, head_dim
