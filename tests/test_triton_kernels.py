"""Every Triton kernel against its torch reference (kernels/reference.py).

Inputs are fresh random tensors (never zeros); outputs are poisoned with NaN before each
launch so an element the kernel forgot to write shows up; unused KV-cache slots are NaN
too, so a kernel that reads past a sequence's end fails.

Without CUDA the kernels run in Triton's interpreter at small sizes. Triton picks the
interpreter when it is first imported, so TRITON_INTERPRET=1 must be set before that (the
suite's conftest.py does it; this module does it too for runs of this file alone). On a
CUDA machine the same small tests run compiled, and the `gpu` tests add real sizes in bf16.
"""

import os
import subprocess
import sys

import torch

import pytest

pytest.importorskip("triton")

from pipeline_infer.kernels import reference as ref  # noqa: E402
from pipeline_infer.kernels.triton.activation import silu_and_mul  # noqa: E402
from pipeline_infer.kernels.triton import decode_attention as decode_module  # noqa: E402
from pipeline_infer.kernels.triton.decode_attention import (  # noqa: E402
    _decode_split_kernel,
    choose_num_kv_splits,
    decode_attention,
)
from pipeline_infer.kernels.triton.extend_attention import extend_attention, extend_blocks  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.kernels.triton.rms_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from pipeline_infer.kernels.triton.rotary import apply_rotary  # noqa: E402
from pipeline_infer.kernels.triton.store_kv import store_kv  # noqa: E402

INTERPRETED = is_interpreted(_decode_split_kernel)
if not INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
        "set it in tests/conftest.py before anything imports triton"
    )
DEVICE = "cpu" if INTERPRETED else "cuda"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf: an element was not written or a bad slot was read"
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def paged_cache(
    gen: torch.Generator, seq_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str = DEVICE, extra_pages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches holding random keys for each sequence in shuffled pages; every other slot is NaN.

    The page table's unused columns point at page 0, the scratch page, which is NaN too.
    """
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + sum(pages_per_seq) + extra_pages
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    page_table = torch.zeros((len(seq_lens), max(pages_per_seq) + 2), dtype=torch.int32)
    k_cache = poisoned((num_pages, page_size, num_kv_heads, head_dim), dtype, "cpu")
    v_cache = poisoned((num_pages, page_size, num_kv_heads, head_dim), dtype, "cpu")
    for b, n in enumerate(seq_lens):
        pages = [order.pop() for _ in range(pages_per_seq[b])]
        page_table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        pos = torch.arange(n)
        slots_page, slots_off = torch.tensor(pages)[pos // page_size], pos % page_size
        k_cache[slots_page, slots_off] = rand(gen, n, num_kv_heads, head_dim, dtype=dtype, device="cpu")
        v_cache[slots_page, slots_off] = rand(gen, n, num_kv_heads, head_dim, dtype=dtype, device="cpu")
    return k_cache.to(device), v_cache.to(device), page_table.to(device)


# ---------------------------------------------------------------- store_kv


@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 80)])
def test_store_kv_writes_exactly_the_given_slots(num_kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + num_kv_heads)
    num_slots, num_tokens = 64, 11
    k, v = rand(gen, num_tokens, num_kv_heads, head_dim), rand(gen, num_tokens, num_kv_heads, head_dim)
    loc = torch.randperm(num_slots, generator=gen)[:num_tokens].to(DEVICE)
    k_cache, v_cache = poisoned((num_slots, num_kv_heads, head_dim), torch.float32), poisoned((num_slots, num_kv_heads, head_dim), torch.float32)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    store_kv(k, v, k_cache, v_cache, loc)
    ref.store_kv_ref(k, v, k_exp, v_exp, loc)
    torch.testing.assert_close(k_cache, k_exp, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_exp, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(k_cache).sum() == (num_slots - num_tokens) * num_kv_heads * head_dim


def test_store_kv_from_strided_views_into_a_bf16_cache() -> None:
    gen = torch.Generator().manual_seed(7)
    qkv = rand(gen, 5, 4 + 2 + 2, 64)  # q, k and v heads of a fused projection, as the model gives them
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    k_cache = poisoned((16, 2, 64), torch.bfloat16)
    v_cache = poisoned((16, 2, 64), torch.bfloat16)
    loc = torch.tensor([3, 0, 15, 8, 9], device=DEVICE)
    store_kv(k, v, k_cache, v_cache, loc)
    # Compiled Triton rounds fp32 -> bf16 to nearest like torch; the interpreter truncates (< 1 ulp).
    tol = dict(rtol=2**-7, atol=0) if INTERPRETED else dict(rtol=0, atol=0)
    torch.testing.assert_close(k_cache[loc], k.to(torch.bfloat16), **tol)
    torch.testing.assert_close(v_cache[loc], v.to(torch.bfloat16), **tol)
    assert torch.isnan(k_cache).sum() == (16 - 5) * 2 * 64


# ---------------------------------------------------------------- decode attention


def run_decode(
    seed: int, seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, page_size: int,
    splits: list[int | None], dtype: torch.dtype = torch.float32, device: str = DEVICE,
) -> float:
    """The worst relative error over the given split counts, on one set of random inputs."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, page_table = paged_cache(gen, seq_lens, page_size, num_kv_heads, head_dim, dtype, device)
    q = rand(gen, len(seq_lens), num_kv_heads * group, head_dim, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    expected = ref.decode_attention_ref(q, k_cache, v_cache, page_table, lens, scale)
    errors = []
    for num_kv_splits in splits:
        out = decode_attention(q, k_cache, v_cache, page_table, lens, scale, num_kv_splits, out=poisoned(q.shape, dtype, device))
        errors.append(rel_err(out, expected))
    return max(errors)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_matches_reference(head_dim: int, group: int, page_size: int) -> None:
    # 3 splits over lengths 1..97: some splits hold several blocks, some one, some none.
    err = run_decode(head_dim * 100 + group * 10 + page_size, [97, 1, 40], 2 if group < 7 else 1, group, head_dim, page_size, [3])
    assert err < 1e-5


def test_decode_attention_any_number_of_splits() -> None:
    assert run_decode(11, [130, 17, 64, 65], 2, 4, 64, 16, [1, 2, 5, 64, None]) < 1e-5


def test_decode_attention_with_the_batch_fastest_grid(monkeypatch) -> None:
    monkeypatch.setattr(decode_module, "HEADS_FASTEST", False)
    assert run_decode(11, [130, 17, 64, 65], 2, 4, 64, 16, [1, 2, 5]) < 1e-5
    assert run_decode(12, [97, 1, 40], 1, 7, 128, 1, [3]) < 1e-5  # one kv head


def test_decode_attention_bf16_and_odd_head_dim() -> None:
    assert run_decode(3, [50, 9], 2, 2, 64, 16, [2], dtype=torch.bfloat16) < 1e-2
    assert run_decode(4, [33, 70], 1, 3, 96, 4, [2]) < 1e-5


@pytest.mark.parametrize("block_n,num_stages", [(16, 1), (32, 3), (128, 2)])
def test_decode_attention_launch_settings_keep_the_result(block_n: int, num_stages: int) -> None:
    """block_n / num_warps / num_stages (the tuning sweep's knobs) change speed, not the output."""
    gen = torch.Generator().manual_seed(block_n)
    seq_lens = [130, 17, 64, 1]
    k_cache, v_cache, page_table = paged_cache(gen, seq_lens, 16, 2, 64, torch.float32, DEVICE)
    q = rand(gen, len(seq_lens), 14, 64, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    expected = ref.decode_attention_ref(q, k_cache, v_cache, page_table, lens, 0.125)
    for splits in (1, 3):
        out = decode_attention(q, k_cache, v_cache, page_table, lens, 0.125, splits, out=poisoned(q.shape, torch.float32, DEVICE),
                               block_n=block_n, num_warps=2, num_stages=num_stages)
        assert rel_err(out, expected) < 1e-5
    with pytest.raises(ValueError, match="block_n"):
        decode_attention(q, k_cache, v_cache, page_table, lens, 0.125, block_n=48)


def test_choose_num_kv_splits() -> None:
    assert choose_num_kv_splits(256, 2, 1024, 132) == 1  # enough programs already
    assert choose_num_kv_splits(1, 8, 8192, 132) == 32  # few programs, long context: split
    assert choose_num_kv_splits(1, 8, 100, 132) == 1  # too short to be worth splitting
    assert choose_num_kv_splits(1, 1, 10**6, 132) == 64  # capped


# ---------------------------------------------------------------- extend attention


def run_extend(
    seed: int, prefix_lens: list[int], extend_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
    page_size: int, dtype: torch.dtype = torch.float32, device: str = DEVICE,
) -> float:
    """The worse relative error of the two launches: with the host-built work list, and without (full grid)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    k_cache, v_cache, page_table = paged_cache(gen, seq_lens, page_size, num_kv_heads, head_dim, dtype, device)
    num_q_heads = num_kv_heads * group
    q = rand(gen, sum(extend_lens), num_q_heads, head_dim, dtype=dtype, device=device)
    indptr = torch.tensor([0] + torch.tensor(extend_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    prefix = torch.tensor(prefix_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    expected = ref.extend_attention_ref(q, k_cache, v_cache, indptr, prefix, page_table, scale)
    block_seq, block_start = extend_blocks(extend_lens, num_q_heads, num_kv_heads, head_dim)
    # The CUDA-graph form: work-list buffers longer than the list (the tail never runs) and the
    # used length on the device.
    pad = 5
    bounded = dict(block_seq=block_seq + [len(extend_lens) + 7] * pad, block_start=block_start + [10**6] * pad,
                   num_blocks=[len(block_seq)])
    errors = []
    for work in ({}, dict(block_seq=block_seq, block_start=block_start), bounded):
        work = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in work.items()}
        out = extend_attention(
            q, k_cache, v_cache, indptr, prefix, page_table, max(extend_lens), scale,
            out=poisoned(q.shape, dtype, device), **work,
        )
        errors.append(rel_err(out, expected))
    return max(errors)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_attention_matches_reference(head_dim: int, group: int, page_size: int) -> None:
    # A fresh prompt, a radix hit with a long prefix, a decode-like single token, a mid-size chunk.
    err = run_extend(
        head_dim + group * 7 + page_size, [0, 100, 37, 16], [21, 12, 1, 9], 2 if group < 7 else 1, group, head_dim, page_size
    )
    assert err < 1e-5


def test_extend_attention_bf16_odd_head_dim_and_empty_extends() -> None:
    assert run_extend(5, [64, 3], [70, 40], 2, 4, 64, 16, dtype=torch.bfloat16) < 1e-2
    assert run_extend(6, [10, 5], [0, 13], 1, 3, 96, 4) < 1e-5


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_extend_attention_mixed_decode_and_prefill_batch(group: int, page_size: int) -> None:
    # The mixed step the work list is for: decode rows (1 new token after a cached prefix) and
    # two prefills, one several blocks long (9 tokens a block at group 7), one with a prefix.
    prefix = [5, 17, 1, 33, 64, 2, 40, 9, 0, 12]
    extend = [1] * 8 + [30, 11]
    assert run_extend(group * 10 + page_size, prefix, extend, 2, group, 64, page_size) < 1e-5


@pytest.mark.parametrize("group", [1, 7])
def test_extend_attention_rows_without_new_tokens(group: int) -> None:
    # Sequences adding no token get no block, first and last in the batch too.
    assert run_extend(40 + group, [7, 0, 3, 50, 0, 20, 4], [0, 5, 0, 1, 19, 0, 0], 2, group, 64, 16) < 1e-5


def _two_sequence_case(seed: int):
    """A 1-token row and a 20-token extend (both after 2 cached tokens), 14/2 heads: 4 blocks of work."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, page_table = paged_cache(gen, [3, 22], 16, 2, 64, torch.float32)
    q = rand(gen, 21, 14, 64)
    indptr = torch.tensor([0, 1, 21], dtype=torch.int32, device=DEVICE)
    prefix = torch.tensor([2, 2], dtype=torch.int32, device=DEVICE)
    block_seq, block_start = extend_blocks([1, 20], 14, 2, 64)
    assert (block_seq, block_start) == ([0, 1, 1, 1], [0, 0, 9, 18])
    return (q, k_cache, v_cache, indptr, prefix, page_table), block_seq, block_start


def _nan_rows(out: torch.Tensor) -> list[int]:
    return torch.isnan(out).all(dim=(1, 2)).nonzero().flatten().tolist()


def test_extend_attention_leaves_rows_of_a_missing_block_unwritten() -> None:
    # The NaN poison catches a block the work list forgot: only that block's rows stay NaN.
    args, block_seq, block_start = _two_sequence_case(12)
    keep = [0, 1, 3]  # drop sequence 1's block of tokens 9..17 (rows 10..18)
    out = extend_attention(
        *args, 20, 64**-0.5, out=poisoned(args[0].shape, torch.float32),
        block_seq=torch.tensor([block_seq[i] for i in keep], dtype=torch.int32, device=DEVICE),
        block_start=torch.tensor([block_start[i] for i in keep], dtype=torch.int32, device=DEVICE),
    )
    assert _nan_rows(out) == list(range(10, 19)) and torch.isfinite(out[:10]).all() and torch.isfinite(out[19:]).all()


def test_extend_attention_runs_only_num_blocks_entries() -> None:
    # num_blocks = 3 of the 4 entries: the last block (sequence 1, tokens 18..19: rows 19..20) stays NaN.
    args, block_seq, block_start = _two_sequence_case(13)
    out = extend_attention(
        *args, 20, 64**-0.5, out=poisoned(args[0].shape, torch.float32),
        block_seq=torch.tensor(block_seq, dtype=torch.int32, device=DEVICE),
        block_start=torch.tensor(block_start, dtype=torch.int32, device=DEVICE),
        num_blocks=torch.tensor([3], dtype=torch.int32, device=DEVICE),
    )
    assert _nan_rows(out) == [19, 20] and torch.isfinite(out[:19]).all()
    with pytest.raises(ValueError, match="num_blocks"):
        extend_attention(*args, 20, 1.0, num_blocks=torch.tensor([3], dtype=torch.int32, device=DEVICE))


def test_extend_blocks_by_hand() -> None:
    # 14 q / 2 kv heads, head_dim 64: BLOCK_M 64 rows of 7 heads -> 9 tokens a block.
    assert extend_blocks([1, 0, 20, 9, 10], 14, 2, 64) == ([0, 2, 2, 2, 3, 4, 4], [0, 0, 9, 18, 0, 0, 9])
    # 4 q / 2 kv heads, head_dim 64: 64 rows of 2 heads -> 32 tokens a block.
    assert extend_blocks([65, 32, 1], 4, 2, 64) == ([0, 0, 0, 1, 2], [0, 32, 64, 0, 0])
    # head_dim 256 halves BLOCK_M to 32: 32 tokens a block with one head per kv head.
    assert extend_blocks([33], 2, 2, 256) == ([0, 0], [0, 32])
    assert extend_blocks([], 4, 2, 64) == ([], [])
    assert extend_blocks([0, 0], 4, 2, 64) == ([], [])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        extend_blocks([3], 3, 2, 64)


# ---------------------------------------------------------------- norm, rotary, activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 896, 1000])
def test_rms_norm_and_fused_add(hidden: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x, res, w = rand(gen, 7, hidden, dtype=dtype), rand(gen, 7, hidden, dtype=dtype), rand(gen, hidden, dtype=dtype)
    eps = 1e-6
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    out = rms_norm(x, w, eps, out=poisoned(x.shape, dtype))
    torch.testing.assert_close(out, ref.rms_norm_ref(x, w, eps), **tol)
    normed, new_res = fused_add_rms_norm(x, res, w, eps, out=poisoned(x.shape, dtype), residual_out=poisoned(x.shape, dtype))
    exp_normed, exp_res = ref.fused_add_rms_norm_ref(x, res, w, eps)
    torch.testing.assert_close(new_res, exp_res, **tol)
    torch.testing.assert_close(normed, exp_normed, **tol)


def test_fused_add_rms_norm_in_place_on_3d_input() -> None:
    gen = torch.Generator().manual_seed(1)
    x, res, w = rand(gen, 2, 3, 128), rand(gen, 2, 3, 128), rand(gen, 128)
    exp_normed, exp_res = ref.fused_add_rms_norm_ref(x, res, w, 1e-5)
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5, out=x, residual_out=res)
    assert normed.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()
    torch.testing.assert_close(x, exp_normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res, exp_res, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_matches_reference(head_dim: int, rotary_dim: int, inplace: bool) -> None:
    gen = torch.Generator().manual_seed(head_dim + rotary_dim + inplace)
    num_tokens, num_q_heads, num_kv_heads = 9, 7, 1
    # q and k as strided views of one fused projection output, which is how the model holds them.
    qkv = rand(gen, num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim).view(num_tokens, -1, head_dim)
    q, k = qkv[:, :num_q_heads], qkv[:, num_q_heads : num_q_heads + num_kv_heads]
    positions = torch.randint(0, 4000, (num_tokens,), generator=gen).to(DEVICE)
    cache = ref.rotary_cos_sin_cache(rotary_dim, 4096, base=1e6).to(DEVICE)
    exp_q, exp_k = ref.rotary_ref(q, positions, cache), ref.rotary_ref(k, positions, cache)
    q_out, k_out = apply_rotary(q, k, positions, cache, inplace=inplace)
    if inplace:
        assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q_out, exp_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out, exp_k, rtol=1e-5, atol=1e-5)


def test_rotary_position_zero_is_identity_and_rotation_keeps_norm() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k = rand(gen, 3, 2, 64), rand(gen, 3, 1, 64)
    cache = ref.rotary_cos_sin_cache(64, 16).to(DEVICE)
    q0, k0 = apply_rotary(q, k, torch.zeros(3, dtype=torch.int64, device=DEVICE), cache)
    torch.testing.assert_close(q0, q, rtol=0, atol=1e-6)
    q5, _ = apply_rotary(q, k, torch.full((3,), 5, dtype=torch.int64, device=DEVICE), cache)
    torch.testing.assert_close(q5.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q5, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [64, 1500])
def test_silu_and_mul_matches_reference(inter: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = rand(gen, 5, 2 * inter, dtype=dtype) * 3
    out = silu_and_mul(x, out=poisoned((5, inter), dtype))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out, ref.silu_and_mul_ref(x), **tol)


# ---------------------------------------------------------------- errors and CPU behaviour


def test_bad_arguments_raise_clear_errors() -> None:
    q = torch.zeros(2, 4, 64, device=DEVICE)
    cache = torch.zeros(4, 16, 3, 64, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(q, cache, cache, table, lens, 1.0)
    with pytest.raises(TypeError, match="page_table"):
        decode_attention(q, cache[:, :, :2], cache[:, :, :2], table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention(q, cache[:, :, :2], cache[:, :, :2], table, lens, 1.0, num_kv_splits=0)
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(torch.zeros(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.zeros(3, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)
    indptr = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    work, kv = torch.zeros(2, dtype=torch.int32, device=DEVICE), cache[:, :, :2]
    with pytest.raises(ValueError, match="block_seq and block_start"):
        extend_attention(q, kv, kv, indptr, lens, table, 1, 1.0, block_seq=work)
    with pytest.raises(TypeError, match="block_start"):
        extend_attention(q, kv, kv, indptr, lens, table, 1, 1.0, block_seq=work, block_start=work.long())
    with pytest.raises(ValueError, match="1-D"):
        extend_attention(q, kv, kv, indptr, lens, table, 1, 1.0, block_seq=work, block_start=work[:1])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            silu_and_mul(torch.zeros(3, 4), out=torch.zeros(3, 2, device="cuda"))


@pytest.mark.skipif(not INTERPRETED, reason="checks the CPU (interpreter) path")
def test_cpu_path_never_touches_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.cuda was called for CPU tensors")

    for name in ("is_available", "current_device", "current_stream", "synchronize", "get_device_properties", "set_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    assert run_decode(8, [20, 5], 1, 2, 64, 16, [None]) < 1e-5
    assert run_extend(9, [4], [6], 1, 2, 64, 16) < 1e-5


def test_every_kernel_compiles_for_sm90_without_a_gpu() -> None:
    # The interpreter runs kernels as Python and accepts code the real compiler rejects.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_infer.kernels.triton.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------- GPU, real sizes


def _random_lengths(gen: torch.Generator, n: int, low: int, high: int) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_attention(head_dim: int, group: int, page_size: int, dtype: torch.dtype) -> None:
    seed = group * 1000 + head_dim + page_size
    gen = torch.Generator().manual_seed(seed)
    lens = _random_lengths(gen, 24, 1, 5000) + [1, 4096]
    num_kv_heads = 2 if group == 7 else 8 // group
    assert run_decode(seed, lens, num_kv_heads, group, head_dim, page_size, [None, 1, 7, 64], dtype, "cuda") < 1e-2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_extend_attention(head_dim: int, group: int, page_size: int) -> None:
    # Fresh prompts, radix hits with prefixes of thousands of tokens, decode-like rows, a long chunk.
    prefix = [0, 0, 3000, 4500, 17, 1024, 2222, 1]
    extend = [1, 700, 300, 1, 513, 64, 129, 2048]
    num_kv_heads = 2 if group == 7 else 8 // group
    seed = group * 1000 + head_dim + page_size + 1
    assert run_extend(seed, prefix, extend, num_kv_heads, group, head_dim, page_size, torch.bfloat16, "cuda") < 1e-2


@pytest.mark.gpu
@requires_cuda
def test_gpu_norm_rotary_activation_bf16() -> None:
    gen = torch.Generator().manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    x, res, w = rand(gen, 4096, 4096, **bf16), rand(gen, 4096, 4096, **bf16), rand(gen, 4096, **bf16)
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    exp_normed, exp_res = ref.fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert rel_err(new_res, exp_res) < 1e-2 and rel_err(normed, exp_normed) < 1e-2
    q, k = rand(gen, 2048, 32, 128, **bf16), rand(gen, 2048, 8, 128, **bf16)
    pos = torch.randint(0, 8192, (2048,), generator=gen).cuda()
    cache = ref.rotary_cos_sin_cache(128, 8192, 5e5).cuda()
    q_out, k_out = apply_rotary(q, k, pos, cache)
    assert rel_err(q_out, ref.rotary_ref(q, pos, cache)) < 1e-2 and rel_err(k_out, ref.rotary_ref(k, pos, cache)) < 1e-2
    g = rand(gen, 2048, 2 * 14336, **bf16)
    assert rel_err(silu_and_mul(g), ref.silu_and_mul_ref(g)) < 1e-2
