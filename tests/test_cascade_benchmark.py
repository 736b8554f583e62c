"""benchmarks/cascade_attention.py's layer set-up (a GPU benchmark), checked on the CPU: the work
list it lays out makes the cascade give plain decode attention's result (Triton's interpreter)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from cascade_attention import make_layer, parse_shape  # noqa: E402

from pipeline_infer.kernels.triton.decode_attention import decode_attention  # noqa: E402
from pipeline_infer.kernels.triton.shared_prefix_attention import (  # noqa: E402
    SharedPrefix,
    shared_prefix_decode_attention,
)


def test_parse_shape() -> None:
    assert parse_shape("32x27:150-400+160") == (32, 27, 150, 400, 160)
    assert parse_shape("8x8:40-200") == (8, 8, 40, 200, 0)


@pytest.mark.parametrize("groups,rows,ungrouped", [(2, 3, 2), (1, 5, 0), (3, 2, 1)])
def test_layer_work_list_gives_plain_attention(groups, rows, ungrouped) -> None:
    gen = torch.Generator().manual_seed(groups * 10 + rows)
    q, k, v, table, seq, rope, ints = make_layer(groups, rows, 5, 20, ungrouped, 32, 4, 2, 16, gen, torch.device("cpu"))
    kv_starts, _, items, num_items = ints
    assert q.shape[0] == groups * rows + ungrouped and int(num_items) == groups
    assert kv_starts.tolist() == [32] * (groups * rows) + [0] * ungrouped
    # Rows of a group share their prefix pages; no two groups (or ungrouped rows) do.
    firsts = [tuple(table[b, :2].tolist()) for b in range(q.shape[0])]
    assert len(set(firsts)) == groups + ungrouped
    want = decode_attention(q, k, v, table, seq, 0.25, 1, rope=rope)
    got = shared_prefix_decode_attention(q, k, v, table, seq, 0.25, SharedPrefix(*ints, 2), 1, rope=rope)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=1e-3)
