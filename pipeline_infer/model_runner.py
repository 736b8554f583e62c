"""ModelRunner: owns the model, the KV pool and the attention backend; runs one step.

run(batch) turns the scheduler's chunks into a ForwardBatch (flattened token ids,
positions, the slots their K/V go to, the page table), runs the model, computes logits
only for the rows that sample, and samples them for the whole batch at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.sampler import Sampler, SamplingBatchInfo

if TYPE_CHECKING:
    from pipeline_infer.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET_BYTES = 2 << 30  # the CPU has no memory gauge worth trusting; 2 GiB serves batch jobs


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        hf_config,
        device: torch.device,
        dtype: torch.dtype,
        page_size: int,
        max_total_tokens: int | None,
        mem_fraction_static: float,
        attention_backend: str,
        eos_token_ids: set[int],
        max_context: int,
        cuda_graph_max_bs: int = 0,
    ):
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.page_size = page_size
        self.eos_token_ids = eos_token_ids
        self.num_layers = hf_config.num_hidden_layers
        self.num_q_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // self.num_q_heads

        num_pages = self._num_pages(max_total_tokens, mem_fraction_static, max_context)
        self.kv_pool = KVPool(
            self.num_layers, num_pages, page_size, self.num_kv_heads, self.head_dim, dtype, device
        )
        self.attn_backend = self._make_backend(attention_backend)
        self.sampler = Sampler()
        self.graph_runner = None
        if cuda_graph_max_bs > 0 and device.type == "cuda" and hasattr(self.attn_backend, "graph_decode_metadata"):
            from pipeline_infer.cuda_graph import CudaGraphRunner

            context = min(max_context, self.capacity_tokens)
            self.graph_runner = CudaGraphRunner(self, cuda_graph_max_bs, context)
        logger.info(
            "KV pool: %d pages of %d tokens (%d tokens), backend %s",
            num_pages, page_size, (num_pages - 1) * page_size, attention_backend,
        )

    # --- set-up ------------------------------------------------------------------
    def _num_pages(self, max_total_tokens: int | None, mem_fraction: float, max_context: int) -> int:
        per_page = KVPool.bytes_per_page(self.num_layers, self.page_size, self.num_kv_heads, self.head_dim, self.dtype)
        if max_total_tokens is not None:
            return -(-max_total_tokens // self.page_size) + 1  # + the scratch page
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_elsewhere = total - free
            # Leave (1 - mem_fraction) of the card for activations, logits and CUDA graphs.
            budget = int(total * mem_fraction) - used_elsewhere
            budget = max(budget, per_page * 2)
        else:
            budget = _CPU_KV_BUDGET_BYTES
        # Never much beyond what a full batch of maximal sequences could use.
        pages = budget // per_page
        return int(max(2, min(pages, 1 << 22)))

    def _make_backend(self, name: str):
        args = (self.kv_pool, self.num_q_heads, self.num_kv_heads, self.head_dim)
        if name == "torch":
            from pipeline_infer.kernels.attention.torch_backend import TorchAttentionBackend

            return TorchAttentionBackend(*args)
        if name == "triton":
            from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend

            return TritonAttentionBackend(*args)
        if name == "flashinfer":
            from pipeline_infer.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

            return FlashInferAttentionBackend(*args)
        raise ValueError(f"attention_backend must be 'torch', 'triton' or 'flashinfer', got {name!r}")

    @property
    def capacity_tokens(self) -> int:
        return self.kv_pool.allocator.capacity * self.page_size

    # --- one step ------------------------------------------------------------------
    def build_forward_batch(self, batch: "ScheduledBatch") -> ForwardBatch:
        ps = self.page_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        logits_rows: list[int] = []
        max_pages = max(len(c.req.pages) for c in batch.chunks)
        page_table = np.zeros((len(batch.chunks), max(max_pages, 1)), dtype=np.int32)
        offset = 0
        for b, c in enumerate(batch.chunks):
            req = c.req
            ids.extend(req.token_ids[c.start : c.start + c.length])
            pos = np.arange(c.start, c.start + c.length, dtype=np.int64)
            pages = np.asarray(req.pages, dtype=np.int64)
            page_table[b, : len(pages)] = pages
            positions.append(pos)
            slots.append(pages[pos // ps] * ps + pos % ps)
            offset += c.length
            if c.samples:
                logits_rows.append(offset - 1)
        dev = self.device
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev, non_blocking=True),
            extend_lens=[c.length for c in batch.chunks],
            prefix_lens=[c.start for c in batch.chunks],
            page_table=torch.from_numpy(page_table).to(dev, non_blocking=True),
            out_cache_loc=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(dev, non_blocking=True),
            attn_backend=self.attn_backend,
        )
        return fb

    @torch.inference_mode()
    def run(self, batch: "ScheduledBatch") -> list[int | None]:
        """Run one step; the sampled token for each chunk that samples, None for the others."""
        fb = self.build_forward_batch(batch)
        sampling = [c for c in batch.chunks if c.samples]
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            logits = self.graph_runner.replay(fb)  # a decode batch: every row samples
        else:
            self.attn_backend.plan(fb)
            hidden = self.model(fb)
            if not sampling:
                return [None] * len(batch.chunks)
            logits = self.model.compute_logits(hidden[fb.logits_indices])
        info = SamplingBatchInfo.build(
            params=[c.req.params for c in sampling],
            prompt_ids=[c.req.prompt_ids for c in sampling],
            output_ids=[c.req.output_ids for c in sampling],
            seeds=[c.req.seed for c in sampling],
            vocab_size=logits.shape[-1],
            device=logits.device,
            eos_token_ids=self.eos_token_ids,
        )
        tokens = self.sampler(logits, info).tolist()  # the step's one host synchronisation
        it = iter(tokens)
        return [next(it) if c.samples else None for c in batch.chunks]

    def release(self) -> None:
        """Drop the model and the KV tensors so their memory can go back."""
        self.graph_runner = None  # graphs hold their own memory pool
        self.model = None
        self.kv_pool = None
        self.attn_backend = None
        if self.device.type == "cuda":
            import gc

            gc.collect()  # break reference cycles that still pin CUDA tensors
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
