"""Attention backend on FlashInfer's paged kernels (optional dependency: extra `flashinfer`).

FlashInfer splits attention into a host-side `plan` (work partitioning from the batch's
lengths) and a device-side `run`. We plan once per forward, in `plan(batch)`, and share the
planned wrappers across all layers: each layer's `forward` only stores its new K/V and runs.

The KV layout is ours (kv_pool.py): k_cache[layer] and v_cache[layer] of
[num_pages, page_size, num_kv_heads, head_dim], which is FlashInfer's "NHD" layout given as
a (k, v) tuple, so no copy or reshape is needed.

- Decode batches (one new token per sequence) use BatchDecodeWithPagedKVCacheWrapper. Its
  CUDA-core kernel is specialised for a few GQA group sizes; for the others (Qwen2.5-0.5B has
  14 query heads over 2 KV heads, group 7), and wherever the group is large enough that a
  tensor-core tile is better used, we ask for the tensor-core decode path.
- Anything else (prefill chunks, mixed prefill + decode) uses
  BatchPrefillWithPagedKVCacheWrapper with a causal mask. The new tokens' K/V are written to
  their pages first, so the kernel sees prefix and new tokens as one paged sequence; FlashInfer
  aligns the causal mask to the end of each sequence, which is what a cached prefix needs.

JIT cache: FlashInfer compiles its kernels on first use (tens of seconds each) into
`$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer` (default: the home directory). Keep that folder
between runs (a CI cache, a volume in a container) to skip the build; see README.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.kernels.triton.store_kv import store_kv

_WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended split-k workspace
# Group sizes the CUDA-core decode kernel is built for; others take the tensor-core path.
_CUDA_CORE_DECODE_GROUPS = (1, 2, 4)
_HEAD_DIMS = (64, 128, 256)  # head sizes FlashInfer's paged kernels are built for


def import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise ImportError(
            "attention_backend='flashinfer' needs FlashInfer, which is not installed: "
            "pip install 'pipeline-infer[flashinfer]' (or use attention_backend='triton')"
        ) from e
    return flashinfer


def use_tensor_core_decode(num_q_heads: int, num_kv_heads: int) -> bool:
    return (num_q_heads // num_kv_heads) not in _CUDA_CORE_DECODE_GROUPS


class FlashInferAttentionBackend:
    def __init__(
        self,
        kv_pool: KVPool,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        tensor_core_decode: bool | None = None,
    ):
        if kv_pool.device.type != "cuda":
            raise ValueError("attention_backend='flashinfer' runs on CUDA devices only; use 'torch' on the CPU")
        if kv_pool.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention_backend='flashinfer' needs dtype float16 or bfloat16, got {kv_pool.dtype}")
        if head_dim not in _HEAD_DIMS:
            raise ValueError(f"attention_backend='flashinfer' supports head_dim {_HEAD_DIMS}, got {head_dim}")
        flashinfer = import_flashinfer()
        self.kv_pool = kv_pool
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = kv_pool.page_size
        self.default_scale = 1.0 / math.sqrt(head_dim)
        device = kv_pool.device
        # Decode and prefill never run in the same forward, so they can share one workspace.
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        if tensor_core_decode is None:
            tensor_core_decode = use_tensor_core_decode(num_q_heads, num_kv_heads)
        self.tensor_core_decode = tensor_core_decode
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=tensor_core_decode
        )
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

    def _paged_csr(self, seq_lens: list[int], table: np.ndarray):
        """Page indices and lengths in FlashInfer's CSR form (host-side numpy work)."""
        ps = self.page_size
        lens = np.asarray(seq_lens, dtype=np.int64)
        num_pages = (lens + ps - 1) // ps
        kv_indptr = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(num_pages, out=kv_indptr[1:])
        cols = np.arange(table.shape[1])
        kv_indices = table[cols[None, :] < num_pages[:, None]].astype(np.int32)  # row-major = per sequence
        last_page_len = (lens - (num_pages - 1) * ps).astype(np.int32)
        return (
            torch.from_numpy(kv_indptr),
            torch.from_numpy(kv_indices).to(self.kv_pool.device, non_blocking=True),
            torch.from_numpy(last_page_len),
        )

    def _plan_decode(self, wrapper, seq_lens: list[int], table: np.ndarray) -> None:
        dtype = self.kv_pool.dtype
        wrapper.plan(
            *self._paged_csr(seq_lens, table),
            self.num_q_heads, self.num_kv_heads, self.head_dim, self.page_size,
            q_data_type=dtype, kv_data_type=dtype, sm_scale=self.default_scale,
        )

    def plan(self, batch: ForwardBatch) -> None:
        table = batch.page_table_host
        if table is None:  # callers that built the batch by hand
            table = batch.page_table.cpu().numpy()
        if batch.is_decode:
            self._plan_decode(self._decode, batch.seq_lens, table)
            batch.attn_metadata = self._decode
            return
        qo_indptr = np.zeros(batch.batch_size + 1, dtype=np.int32)
        np.cumsum(batch.extend_lens, out=qo_indptr[1:])
        dtype = self.kv_pool.dtype
        self._prefill.plan(
            torch.from_numpy(qo_indptr), *self._paged_csr(batch.seq_lens, table),
            self.num_q_heads, self.num_kv_heads, self.head_dim, self.page_size,
            causal=True, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.default_scale,
        )
        batch.attn_metadata = self._prefill

    # --- CUDA graphs (pipeline_infer/cuda_graph.py) ------------------------------------------
    def graph_decode_metadata(self, seq_lens: torch.Tensor, page_table: torch.Tensor, max_context: int):
        """A decode wrapper of its own for one captured batch size, over fixed index buffers.

        FlashInfer's graph mode keeps the plan's device-side metadata in these buffers; each
        replay re-plans on the host into them first (graph_prepare_replay), then replays.
        """
        flashinfer = import_flashinfer()
        bs, max_pages = page_table.shape
        dev = self.kv_pool.device
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_core_decode,
            paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(bs * max_pages, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(bs, dtype=torch.int32, device=dev),
        )
        # Capture plans a batch of one-token sequences on the scratch page, like the padding rows.
        self._plan_decode(wrapper, [1] * bs, np.zeros((bs, 1), dtype=np.int32))
        return wrapper

    def graph_prepare_replay(self, wrapper, batch: ForwardBatch, padded_bs: int) -> None:
        table = batch.page_table_host
        if table is None:
            table = batch.page_table.cpu().numpy()
        pad = padded_bs - batch.batch_size
        if pad:
            table = np.concatenate([table, np.zeros((pad, table.shape[1]), dtype=table.dtype)])
        self._plan_decode(wrapper, batch.seq_lens + [1] * pad, table)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_q_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer_id: int,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        wrapper = batch.attn_metadata
        assert hasattr(wrapper, "run"), "plan(batch) must run before forward"
        if abs(scale - self.default_scale) > 1e-6 * self.default_scale:
            # The scale is fixed at plan time; every supported model uses 1/sqrt(head_dim).
            raise NotImplementedError(f"FlashInfer backend plans with scale 1/sqrt(head_dim); got {scale}")
        k_flat, v_flat = self.kv_pool.view_flat(layer_id)
        store_kv(k, v, k_flat, v_flat, batch.out_cache_loc)
        kv = (self.kv_pool.k_cache[layer_id], self.kv_pool.v_cache[layer_id])
        return wrapper.run(q.contiguous(), kv)
