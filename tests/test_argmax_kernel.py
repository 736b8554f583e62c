"""The Triton row argmax (kernels/triton/argmax.py) against torch.argmax, and the sampler using it.

On the CPU the kernel runs in Triton's interpreter at small sizes; the `gpu` test adds real
vocabulary sizes in bf16 on a CUDA machine.
"""

import pytest
import torch

pytest.importorskip("triton")

from pipeline_infer.kernels.triton.argmax import BLOCK, MAX_CHUNKS, _argmax_kernel, choose_chunks, row_argmax, warm_up  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402

DEVICE = "cpu" if is_interpreted(_argmax_kernel) else "cuda"


def _check(x: torch.Tensor, chunks: int | None) -> None:
    got = row_argmax(x, chunks)
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
    assert torch.equal(got.cpu(), x.float().cpu().argmax(dim=-1)), (chunks, got, x.float().argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_row_argmax_matches_torch(dtype: torch.dtype, chunks: int) -> None:
    gen = torch.Generator().manual_seed(chunks)
    # Rows longer than one block and not a multiple of it, so stretches end mid-block.
    x = torch.randn(5, 2 * BLOCK + 333, generator=gen).to(device=DEVICE, dtype=dtype)
    _check(x, chunks)


def test_ties_go_to_the_first_index_across_lanes_blocks_and_chunks() -> None:
    n = 3 * BLOCK + 17
    x = torch.zeros(6, n, device=DEVICE)
    x[0, [5, BLOCK + 5, 2 * BLOCK + 1]] = 1.0  # same lane in three blocks: the first block's wins
    x[1, [BLOCK - 1, 7]] = 2.0  # two lanes of one block: the lower index
    x[2, [n - 1, n // 2, BLOCK + 3]] = 3.0  # in different chunks at chunks=3
    x[3] = float("-inf")  # every value -inf: index 0, as torch
    x[4, 100:] = float("-inf")
    x[4, :100] = float("-inf")
    x[4, 2 * BLOCK + 9] = -5.0  # one finite value among -inf
    x[5] = 1.0  # all equal: index 0
    for chunks in (1, 2, 3):
        _check(x, chunks)


def test_nan_counts_as_the_maximum() -> None:
    x = torch.randn(2, BLOCK + 40, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x[0, 77] = float("nan")
    x[1, BLOCK + 3] = float("nan")
    for chunks in (1, 2):
        assert row_argmax(x, chunks).tolist() == [77, BLOCK + 3]


def test_rows_shorter_than_the_chunk_count_and_empty_batches() -> None:
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check(x, 4)  # stretches of 3, 3, 3 and 1 values
    assert row_argmax(x[:0]).shape == (0,)


def test_choose_chunks() -> None:
    assert choose_chunks(1024, 151_936, 132) == 1  # enough rows to fill the GPU
    assert choose_chunks(256, 151_936, 132) == 3
    assert choose_chunks(1, 151_936, 132) == MAX_CHUNKS  # capped
    assert choose_chunks(1, 100, 132) == 1  # one block's worth of values


@pytest.mark.parametrize("n_cols", [151_936, 5 * BLOCK + 7, 100])
def test_warm_up_covers_every_chunk_count_a_step_can_get(n_cols: int, monkeypatch) -> None:
    """The start-up warm-up launches each chunk count choose_chunks can pick for any batch."""
    from pipeline_infer.kernels.triton import argmax

    launched = []
    monkeypatch.setattr(argmax, "row_argmax", lambda x, chunks=None: launched.append(chunks))
    counts = warm_up(n_cols, torch.float32, torch.device("cpu"))
    assert launched == counts
    needed = {choose_chunks(rows, n_cols, sms) for rows in range(1, 5000) for sms in (1, 78, 132, 148)}
    assert needed <= set(counts)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2-D"):
        row_argmax(torch.zeros(2, 3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last dim"):
        row_argmax(torch.zeros(4, 6, device=DEVICE).t())
    with pytest.raises(ValueError, match="no columns"):
        row_argmax(torch.zeros(2, 0, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        row_argmax(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="chunks"):
        row_argmax(torch.zeros(2, 3, device=DEVICE), chunks=MAX_CHUNKS + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 7, 256, 512, 1024])
def test_row_argmax_at_vocab_sizes_on_the_gpu(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 151_936, generator=gen) * 3).to("cuda", torch.bfloat16)
    # bf16 has few distinct values: many rows have tied maxima, which is the point.
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    x32 = x.float()
    assert torch.equal(row_argmax(x32), x32.argmax(dim=-1))
