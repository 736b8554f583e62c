"""kernels/triton/linear.py against torch's float32 matmul (plain, biased, gated, split over K).

Without CUDA the kernel runs in Triton's interpreter at small sizes (TRITON_INTERPRET=1 must be
set before triton is imported).
"""


import torch

import pytest

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.kernels.triton.linear import LinearConfig, _linear_kernel, triton_linear  # noqa: E402

DEVICE = "cpu" if is_interpreted(_linear_kernel) else "cuda"


def _inputs(m, k, n, dtype, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def _reference(x, w, b=None, gated=False):
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    if not gated:
        return y
    # The gated form rounds gate and up to the model dtype first, as HF's MLP does.
    g, u = y.to(x.dtype).float().chunk(2, dim=-1)
    return (F.silu(g).to(x.dtype).float() * u)


# Shapes whose sizes are not multiples of the blocks: every edge mask is exercised.
CASES = [
    # m, k, n, config
    (5, 48, 40, LinearConfig(16, 16, 16, 1, 4, 2)),
    (33, 80, 72, LinearConfig(16, 32, 32, 1, 4, 2)),
    (20, 112, 24, LinearConfig(16, 16, 16, 3, 4, 2)),  # split over K, last split short
    (17, 64, 64, LinearConfig(32, 16, 16, 4, 4, 2)),
]


@pytest.mark.parametrize("m,k,n,cfg", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_plain_linear_matches_float32_matmul(m, k, n, cfg, bias):
    x, w, b = _inputs(m, k, n, torch.float32, bias=bias)
    y = triton_linear(x, w, b, cfg)
    torch.testing.assert_close(y, _reference(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,k,n,cfg", CASES)
def test_gated_linear_matches_silu_of_gate_times_up(m, k, n, cfg):
    x, w, _ = _inputs(m, k, 2 * n, torch.float32, seed=1)
    y = triton_linear(x, w, None, cfg, gated=True)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, _reference(x, w, gated=True), rtol=1e-4, atol=1e-4)


def test_bf16_results_round_like_the_reference():
    x, w, b = _inputs(24, 64, 48, torch.bfloat16, seed=2, bias=True)
    for cfg in (LinearConfig(16, 16, 32, 1, 4, 2), LinearConfig(16, 16, 16, 2, 4, 2)):
        y = triton_linear(x, w, b, cfg)
        assert y.dtype == torch.bfloat16
        # float32 accumulation, then one rounding to bf16: within one bf16 ulp of the reference
        torch.testing.assert_close(y.float(), _reference(x, w, b), rtol=8e-3, atol=8e-3)
        xg, wg, _ = _inputs(24, 64, 96, torch.bfloat16, seed=3)
        yg = triton_linear(xg, wg, None, cfg, gated=True)
        torch.testing.assert_close(yg.float(), _reference(xg, wg, gated=True), rtol=2e-2, atol=2e-2)


def test_split_results_do_not_depend_on_the_split_count_beyond_rounding():
    x, w, _ = _inputs(16, 128, 32, torch.float32, seed=4)
    one = triton_linear(x, w, None, LinearConfig(16, 16, 16, 1, 4, 2))
    for s in (2, 3, 8):
        torch.testing.assert_close(triton_linear(x, w, None, LinearConfig(16, 16, 16, s, 4, 2)), one, rtol=1e-5, atol=1e-5)


def test_out_argument_is_written_and_returned():
    x, w, _ = _inputs(8, 32, 16, torch.float32, seed=5)
    out = torch.full((8, 16), float("nan"), device=DEVICE)
    y = triton_linear(x, w, None, LinearConfig(16, 16, 16, 1, 4, 2), out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, _reference(x, w), rtol=1e-4, atol=1e-4)


def test_empty_batch_returns_an_empty_result():
    x, w, _ = _inputs(0, 32, 16, torch.float32)
    assert triton_linear(x, w).shape == (0, 16)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"w_shape": (16, 24)}, ValueError, "columns"),
        ({"w_dtype": torch.float16}, TypeError, "dtypes differ"),
        ({"gated": True, "w_shape": (15, 32)}, ValueError, "even number"),
        ({"bias_shape": (8,)}, ValueError, "bias must be"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, exc, match):
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(*kwargs.get("w_shape", (16, 32)), device=DEVICE).to(kwargs.get("w_dtype", torch.float32))
    b = torch.randn(*kwargs["bias_shape"], device=DEVICE) if "bias_shape" in kwargs else None
    with pytest.raises(exc, match=match):
        triton_linear(x, w, b, gated=kwargs.get("gated", False))


@pytest.mark.parametrize("field,value", [("block_m", 24), ("block_k", 8), ("split_k", 0), ("num_warps", 3), ("num_stages", 0)])
def test_bad_configs_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        LinearConfig(**{field: value})
