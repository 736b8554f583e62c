"""Steps that prefill (prefill-only and mixed) captured as CUDA graphs and replayed.

An eager step launches ~10 kernels per layer from Python; on an H200 a 0.5B model's eager
step costs ~13 ms of launches whatever its size, while a decode step's graph replay costs
0.15 ms of host time (benchmarks/profile_steps.py, docs/benchmarks.md). Decode steps replay
graphs (cuda_graph.py); this does the same for steps with new prompt tokens. For a set of
token-count buckets the forward (embedding -> layers -> final norm) is captured once over
static buffers whose attention metadata has a fixed size: sequences past the step's are
empty, and the extend kernel's work list is as long as any step could need, with the number
of entries in use read on the device (extend_attention's `num_blocks`). A step copies its
inputs in, pads its tokens up to the bucket and replays; the caller computes logits for the
sampling rows from the returned hidden states, outside the graph.

Padding tokens take K/V slot 0 (page 0 is the pool's scratch page, never a request's); no
work-list entry covers them, so attention never reads or writes their rows, and every other
op is row-wise, so whatever they hold cannot reach a real row.

Triton attention only (the backend must provide graph_extend_metadata). On by default where
it applies; `Engine(disable_extend_cuda_graph=True)` turns it off.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pipeline_infer.cuda_graph import capture_graphs
from pipeline_infer.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from pipeline_infer.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """64, 128, ..., 1024, then every 1024 up to max_tokens (and max_tokens itself)."""
    sizes = [b for b in (64, 128, 256, 512) if b < max_tokens] + list(range(1024, max_tokens, 1024)) + [max_tokens]
    return sorted(set(sizes))


class ExtendGraphRunner:
    def __init__(self, runner: "ModelRunner", max_tokens: int, max_seqs: int, max_context: int, capture: bool = True):
        """capture=False replays by running the forward eagerly on the same static buffers (tests on the CPU)."""
        backend = runner.attn_backend
        self.runner = runner
        self.device = dev = runner.device
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        self.max_seqs = max_seqs
        self.max_pages = -(-max_context // runner.page_size)
        self.max_blocks = backend.max_extend_blocks(self.max_tokens, max_seqs)
        self.input_ids = torch.zeros(self.max_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_tokens, dtype=torch.long, device=dev)
        self.out_cache_loc = torch.zeros(self.max_tokens, dtype=torch.long, device=dev)
        self.page_table = torch.zeros(max_seqs, self.max_pages, dtype=torch.int32, device=dev)
        self.meta = torch.zeros(backend.extend_meta_size(max_seqs, self.max_blocks), dtype=torch.int32, device=dev)
        self.batches = {t: self._static_batch(t) for t in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _static_batch(self, tokens: int) -> ForwardBatch:
        backend = self.runner.attn_backend
        fb = ForwardBatch(
            input_ids=self.input_ids[:tokens],
            positions=self.positions[:tokens],
            extend_lens=[tokens],
            prefix_lens=[0],
            page_table=self.page_table,
            out_cache_loc=self.out_cache_loc[:tokens],
            logits_indices=self.out_cache_loc[:0],
            attn_backend=backend,
        )
        fb.attn_metadata = backend.graph_extend_metadata(self.meta, self.page_table, self.max_seqs, self.max_blocks, tokens)
        return fb

    @torch.inference_mode()
    def _capture_all(self) -> None:
        # The buffers hold zeros: no work-list entry in use, every token to the scratch slot.
        captured = capture_graphs(self.device, self.buckets, self.batches.__getitem__, self.runner.model)
        for tokens, _, graph, hidden in captured:
            self.graphs[tokens] = graph
            self.hidden[tokens] = hidden
        logger.info("captured %d extend CUDA graphs (token buckets %s)", len(self.graphs), self.buckets)

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            not fb.is_decode
            and fb.num_tokens <= self.max_tokens
            and fb.batch_size <= self.max_seqs
            and fb.page_table.shape[1] <= self.max_pages
        )

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of the step (its own T rows of the bucket's buffer)."""
        n = fb.num_tokens
        bucket = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.out_cache_loc[:n].copy_(fb.out_cache_loc)
        if bucket > n:
            self.out_cache_loc[n:bucket].zero_()  # padding K/V to the scratch slot, never a live one
            self.positions[n:bucket].zero_()
        self.page_table[: fb.batch_size, : fb.page_table.shape[1]].copy_(fb.page_table)
        backend = self.runner.attn_backend
        packed = backend.pack_extend_meta(fb.extend_lens, fb.prefix_lens, self.max_seqs, self.max_blocks)
        # From pageable memory a non-blocking copy is staged at once: no wait for the device.
        self.meta.copy_(torch.from_numpy(packed), non_blocking=True)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.hidden[bucket][:n]
        with torch.inference_mode():  # not captured (capture=False): the same work, eagerly
            return self.runner.model(self.batches[bucket])[:n]
