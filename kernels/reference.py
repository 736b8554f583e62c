"""Plain-torch references for the Triton kernels in kernels/triton/.

Written for clarity, not speed: loops over sequences, fp32 math, no shared code with the
kernels, so a test that compares the two checks the kernels against an independent
statement of what they compute. Each function returns new tensors (store_kv_ref mutates the
cache, as the kernel does).
"""

from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache_flat: torch.Tensor, v_cache_flat: torch.Tensor, out_cache_loc: torch.Tensor
) -> None:
    k_cache_flat[out_cache_loc] = k.to(k_cache_flat.dtype)
    v_cache_flat[out_cache_loc] = v.to(v_cache_flat.dtype)


def gather_sequence_kv(
    cache: torch.Tensor, page_table_row: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """[num_tokens, num_kv_heads, head_dim] fp32: the first num_tokens entries of one sequence."""
    page_size = cache.shape[1]
    pos = torch.arange(num_tokens, device=cache.device)
    pages = page_table_row.long()[pos // page_size]
    return cache[pages, pos % page_size].float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q [M, Hq, D], k/v [N, Hkv, D] fp32, mask [M, N] bool (True = visible) -> [M, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(dim=-1), v)


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        k = gather_sequence_kv(k_cache, page_table[b], n)
        v = gather_sequence_kv(v_cache, page_table[b], n)
        out[b] = _attend(q[b : b + 1], k, v, scale, None)[0]
    return out.to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    prefix_lens: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    bounds = qo_indptr.tolist()
    for b, prefix in enumerate(prefix_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        seq_len = prefix + end - start
        k = gather_sequence_kv(k_cache, page_table[b], seq_len)
        v = gather_sequence_kv(v_cache, page_table[b], seq_len)
        q_pos = prefix + torch.arange(end - start, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        out[start:end] = _attend(q[start:end], k, v, scale, mask)
    return out.to(q.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF Llama/Qwen: normalise in fp32, round to x's dtype, then scale by the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed.to(x.dtype).float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to residual's dtype first, as HF does."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_residual.to(x.dtype), weight, eps), new_residual


def rotary_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0) -> torch.Tensor:
    """[max_position, rotary_dim] fp32: cos of each frequency in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox (rotate-half) rotary on x [T, H, D]; dims past the cache's rotary_dim pass through."""
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:rot]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., rot:]], dim=-1)
    return rotated.to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] ([T, 2I] -> [T, I]); silu rounded to x's dtype, as HF does."""
    gate, up = x.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate).to(x.dtype).float()
    return (act * up).to(x.dtype)
