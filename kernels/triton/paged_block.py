"""One online-softmax step over a block of keys read from the paged KV cache.

Shared by the decode and extend kernels. Scores are kept in the log2 domain (the caller
folds log2(e) into the scale) so the exponentials are `exp2`, which maps to one GPU
instruction. Keys are gathered token by token through the page table, which is what lets
every page size (1, 16, ...) use the same code.

DOT_FP32 multiplies in fp32 (IEEE, not TF32): set for fp32 caches, and always under Triton's
interpreter, whose `dot` cannot multiply bf16 (it would multiply the raw bit patterns). The
caller must then pass q in fp32 too.
"""

import triton
import triton.language as tl


@triton.jit
def dot_operand(q, k_cache_ptr, DOT_FP32: tl.constexpr):
    """Queries as the block's dots take them: fp32 with DOT_FP32, else the cache's dtype."""
    if DOT_FP32:
        return q.to(tl.float32)
    return q.to(k_cache_ptr.dtype.element_ty)


@triton.jit
def attend_paged_block(
    q, acc, m_i, l_i,  # [M, D] queries (cache dtype); [M, D], [M], [M] fp32 running state
    k_cache_ptr, v_cache_ptr, page_row_ptr,  # page_row_ptr: this sequence's page_table row
    n0, kv_end, q_pos,  # first key of the block; keys >= kv_end are masked; [M] query positions
    k_head_off, v_head_off, stride_kp, stride_ko, stride_vp, stride_vo,
    sm_scale_log2, offs_d, d_mask,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
):
    kpos = n0 + tl.arange(0, BLOCK_N)
    kmask = kpos < kv_end
    page = tl.load(page_row_ptr + kpos // PAGE_SIZE, mask=kmask, other=0).to(tl.int64)
    in_page = (kpos % PAGE_SIZE).to(tl.int64)
    kd_mask = kmask[:, None] & d_mask[None, :]
    k = tl.load(
        k_cache_ptr + (page * stride_kp + in_page * stride_ko + k_head_off)[:, None] + offs_d[None, :],
        mask=kd_mask, other=0.0,
    )
    if DOT_FP32:
        k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale_log2
    else:
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
    valid = kmask[None, :]
    if CAUSAL:
        valid = valid & (kpos[None, :] <= q_pos[:, None])
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no valid key yet keeps m = -inf; subtracting 0 instead avoids inf - inf = nan.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_cache_ptr + (page * stride_vp + in_page * stride_vo + v_head_off)[:, None] + offs_d[None, :],
        mask=kd_mask, other=0.0,
    )
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def attend_paged_range(
    q,  # [M, D] queries (cache dtype, or fp32 with DOT_FP32)
    k_cache_ptr, v_cache_ptr, page_row_ptr, start, end, q_rows,  # keys [start, end) of one page_table row
    k_head_off, v_head_off, stride_kp, stride_ko, stride_vp, stride_vo,
    sm_scale_log2, offs_d, d_mask,
    M: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Softmax attention of q over keys [start, end), no causal mask: (normalised output [M, D]
    fp32, log2-sum-exp [M]). An empty range gives zeros and lse = -inf, which a merge weighs 0."""
    acc = tl.zeros([M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_paged_block(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, page_row_ptr, n0, end, q_rows,
            k_head_off, v_head_off, stride_kp, stride_ko, stride_vp, stride_vo,
            sm_scale_log2, offs_d, d_mask,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False, DOT_FP32=DOT_FP32,
        )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
