"""FlashInferAttentionBackend against dense causal attention, on a GPU with FlashInfer installed.

Same scheme as tests/test_triton_backend.py: a NaN-poisoned bf16 cache, sequences with cached
prefixes (radix hits) of 0 to 2000 tokens, a mixed prefill + decode step (the prefill
wrapper), then decode steps (the decode wrapper, CUDA-core or tensor-core path).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("flashinfer")

from pipeline_infer.cache.kv_pool import KVPool  # noqa: E402
from pipeline_infer.kernels.attention.flashinfer_backend import FlashInferAttentionBackend  # noqa: E402
from test_triton_backend import NUM_LAYERS, Sequences, dense_reference  # noqa: E402

TOL = dict(rtol=3e-2, atol=3e-2)  # bf16 inputs and outputs against an fp32 reference


def bf16_pool(page_size: int, num_kv_heads: int, head_dim: int) -> KVPool:
    pool = KVPool(NUM_LAYERS, 20 + 2700 // page_size, page_size, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    for layer in range(NUM_LAYERS):
        pool.k_cache[layer].fill_(float("nan"))
        pool.v_cache[layer].fill_(float("nan"))
    return pool


class Bf16Sequences(Sequences):
    """Random K/V rounded to bf16 up front, so the reference sees exactly what the cache holds."""

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to("cuda", torch.bfloat16).float()


@pytest.mark.parametrize("tensor_cores", [None, True])
@pytest.mark.parametrize(
    "page_size,num_q_heads,num_kv_heads,head_dim",
    [(16, 14, 2, 64), (1, 7, 1, 64), (16, 32, 8, 128), (16, 8, 8, 128), (1, 12, 2, 128), (16, 6, 3, 64)],
)
def test_flashinfer_backend_matches_dense_attention(page_size, num_q_heads, num_kv_heads, head_dim, tensor_cores):
    pool = bf16_pool(page_size, num_kv_heads, head_dim)
    backend = FlashInferAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim, tensor_core_decode=tensor_cores)
    seqs = Bf16Sequences(pool, torch.Generator().manual_seed(page_size + num_q_heads + head_dim))
    for prefix in (0, 21, 300, 2000):
        seqs.add_cached(prefix)
    scale = head_dim**-0.5
    for extend in ([9, 5, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [40, 1, 17, 1]):
        batch, k, v = seqs.step(extend)
        backend.plan(batch)
        q = seqs.rand(batch.num_tokens, num_q_heads, head_dim).bfloat16()
        out = backend.forward(q, k.bfloat16(), v.bfloat16(), 1, batch, scale)
        assert out.shape == q.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), dense_reference(seqs, q.float(), batch, scale, 1), **TOL)
        kf, _ = pool.view_flat(1)
        assert torch.equal(kf[batch.out_cache_loc].float(), k)
        assert torch.isnan(pool.view_flat(0)[0][batch.out_cache_loc]).all(), "another layer's cache was written"


def test_flashinfer_backend_refuses_fp32_and_cpu():
    with pytest.raises(ValueError, match="bfloat16"):
        FlashInferAttentionBackend(KVPool(1, 4, 16, 2, 64, torch.float32, "cuda"), 4, 2, 64)
    with pytest.raises(ValueError, match="CUDA"):
        FlashInferAttentionBackend(KVPool(1, 4, 16, 2, 64, torch.bfloat16, "cpu"), 4, 2, 64)
