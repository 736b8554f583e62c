"""Greedy decoding's argmax over each row of the logits, [rows, vocab] -> [rows] int64.

Why not torch.argmax: on an H200, torch's row argmax over [512, 151,936] bf16 logits took
102.8 us, about 1.5 TB/s, where one read of the 155 MB is ~38 us (ninth session,
docs/benchmarks.md). A decode step of decode-heavy (Qwen2.5-0.5B, 512 rows) takes ~2.4 ms, so
the difference is ~2% of every step. Here each program streams its stretch of a row in wide
blocks keeping a running max per lane (47 us at 512 rows).

Long rows with few of them (small batches) would leave most SMs idle with one program a row,
so a row is cut into `chunks` stretches, each program writes its stretch's (max, index), and a
second tiny kernel picks among them.

Same answer as torch.argmax: the first index of the maximum (a lane keeps its first max, lanes
and chunks break ties to the lowest index), and NaN counts as the maximum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline_infer.kernels.triton.launch import FLOAT_DTYPES, check_dtype, check_launchable, device_num_sms, next_power_of_2

BLOCK = 2048  # values a program reads per step: 8 warps x 32 lanes x 8 bf16 (16-byte loads)
MAX_CHUNKS = 32
_NO_INDEX = tl.constexpr(2**31 - 1)  # no index yet (int32 max)


@triton.jit
def _stretch_argmax(x_row, lo, hi, BLOCK: tl.constexpr):
    """(max, first index of it) over x_row[lo:hi], NaN taken as +inf."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], _NO_INDEX, tl.int32)
    for n0 in range(lo, hi, BLOCK):
        idx = n0 + offs
        x = tl.load(x_row + idx, mask=idx < hi, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)
        # Strictly greater: a lane keeps the first index of its max. A lane that saw only
        # -inf keeps _NO_INDEX unless -inf is the row's max (below).
        take = (x > best) | ((best_i == _NO_INDEX) & (idx < hi))
        best = tl.where(take, x, best)
        best_i = tl.where(take, idx, best_i)
    m = tl.max(best, 0)
    return m, tl.min(tl.where(best == m, best_i, _NO_INDEX), 0)


@triton.jit
def _argmax_kernel(x_ptr, idx_out_ptr, part_max_ptr, part_idx_ptr, n_cols, stride_row, chunk_len, num_chunks,
                   BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lo = c * chunk_len
    hi = tl.minimum(lo + chunk_len, n_cols)
    m, i = _stretch_argmax(x_ptr + row * stride_row, lo, hi, BLOCK)
    if SINGLE:
        tl.store(idx_out_ptr + row, i.to(tl.int64))
    else:
        tl.store(part_max_ptr + row * num_chunks + c, m)
        tl.store(part_idx_ptr + row * num_chunks + c, i)


@triton.jit
def _pick_chunk_kernel(part_max_ptr, part_idx_ptr, idx_out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    live = offs < num_chunks
    m = tl.load(part_max_ptr + row * num_chunks + offs, mask=live, other=float("-inf"))
    i = tl.load(part_idx_ptr + row * num_chunks + offs, mask=live, other=_NO_INDEX)
    best = tl.max(m, 0)
    tl.store(idx_out_ptr + row, tl.min(tl.where(live & (m == best), i, _NO_INDEX), 0).to(tl.int64))


def choose_chunks(rows: int, n_cols: int, num_sms: int) -> int:
    """Stretches per row: about four programs an SM in all, none shorter than one BLOCK."""
    wanted = -(-4 * num_sms // max(1, rows))
    return max(1, min(wanted, -(-n_cols // BLOCK), MAX_CHUNKS))


def takes_layout(x: torch.Tensor) -> bool:
    """Whether row_argmax takes x's layout: 2-D with a contiguous last dim."""
    return x.dim() == 2 and x.stride(1) == 1


def row_argmax(x: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for a 2-D [rows, n] tensor with a contiguous last dim."""
    check_launchable(_argmax_kernel, x)
    check_dtype("x", x, FLOAT_DTYPES)
    if not takes_layout(x):
        raise ValueError(f"x must be a 2-D tensor with a contiguous last dim, got shape {tuple(x.shape)}")
    rows, n_cols = x.shape
    if n_cols == 0:
        raise ValueError("x has no columns: argmax of an empty row is undefined")
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    if chunks is None:
        chunks = choose_chunks(rows, n_cols, device_num_sms(x.device))
    if not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"chunks must be in [1, {MAX_CHUNKS}], got {chunks}")
    chunk_len = -(-n_cols // chunks)
    if chunks == 1:
        _argmax_kernel[(rows, 1)](x, out, out, out, n_cols, x.stride(0), chunk_len, 1,
                                  BLOCK=BLOCK, SINGLE=True, num_warps=8)
        return out
    part_max = torch.empty(rows, chunks, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows, chunks, dtype=torch.int32, device=x.device)
    _argmax_kernel[(rows, chunks)](x, out, part_max, part_idx, n_cols, x.stride(0), chunk_len, chunks,
                                   BLOCK=BLOCK, SINGLE=False, num_warps=8)
    _pick_chunk_kernel[(rows,)](part_max, part_idx, out, chunks, BLOCK_C=next_power_of_2(chunks))
    return out


def warm_up(n_cols: int, dtype: torch.dtype, device: torch.device) -> list[int]:
    """Launch row_argmax once at every chunk count rows of n_cols values can get (returned).

    The chunk count follows a step's row count (choose_chunks), and each count is its own
    compiled variant (its BLOCK_C, and Triton's specialisation of the chunk length on its
    divisibility by 16), so a run's first steps of each size compiled or loaded one: eight on
    an H200 in the first shared-prefix run after start-up (docs/benchmarks.md, twelfth session).
    The engine calls this at start-up instead.
    """
    counts = list(range(1, min(MAX_CHUNKS, -(-n_cols // BLOCK)) + 1))
    x = torch.zeros(1, n_cols, dtype=dtype, device=device)
    for chunks in counts:
        row_argmax(x, chunks)
    return counts
