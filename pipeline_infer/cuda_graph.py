"""Decode steps captured as CUDA graphs and replayed.

A decode step of a small model is hundreds of tiny kernel launches; launching them from Python
costs more than running them. So, for a set of batch-size buckets, the whole decode forward
(embedding -> layers -> final norm -> logits) is captured once into a CUDA graph that reads
its inputs from static buffers. A step copies its inputs into the buffers, pads the batch up
to the next bucket, replays the graph and slices the logits.

Padding rows are harmless: their token is 0 at position 0, their K/V go to slot 0 (page 0 is
the pool's scratch page, never handed to a request) and they attend to that one slot.
Sampling stays outside the graph: it depends on per-request parameters.

When the model runner groups decode rows that share prefix pages (shared_prefix.py), a second
set of graphs attends through the shared prefixes; it reads the groups from one more static
buffer and is captured at coarser batch sizes (every 64 rows above 64), as it only runs when
many rows share a prefix, where the padding rows cost little beside the reads it saves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from pipeline_infer.forward_batch import ForwardBatch, ints_to_device

if TYPE_CHECKING:
    from pipeline_infer.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def batch_buckets(max_bs: int, step: int = 16) -> list[int]:
    """Powers of two below `step`, then every `step` rows up to max_bs (and max_bs itself)."""
    small = [1 << i for i in range(step.bit_length()) if (1 << i) < min(step, max_bs)]
    sizes = small + list(range(step, max_bs, step)) + [max_bs]
    return sorted(set(sizes))


def capture_graphs(
    device: torch.device,
    sizes: list[int],
    make_batch: Callable[[int], ForwardBatch],
    forward: Callable[[ForwardBatch], torch.Tensor],
) -> Iterator[tuple[int, ForwardBatch, torch.cuda.CUDAGraph, torch.Tensor]]:
    """Capture forward(make_batch(size)) for each size: (size, batch, graph, output) as each is done.

    Largest first, so the later (smaller) graphs reuse the first one's memory pool. Each is run
    twice on the capture stream before capture (compiles Triton kernels, settles the allocator).
    Call under torch.inference_mode(); the device is synchronised once all are captured.
    """
    pool = None
    stream = torch.cuda.Stream(device)
    for size in sorted(sizes, reverse=True):
        fb = make_batch(size)
        # The static buffers were filled (zeros, metadata) by kernels on the current stream; the
        # capture stream must not run ahead of them. Without this wait a second engine in one
        # process read leftovers of the first's memory as page ids (an illegal address, H200).
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(fb)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = forward(fb)
        pool = graph.pool()
        yield size, fb, graph, out
    torch.cuda.synchronize(device)


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int, max_context: int):
        self.runner = runner
        self.device = runner.device
        self.max_bs = max_bs
        self.buckets = batch_buckets(max_bs)
        self.max_pages = -(-max_context // runner.page_size)
        dev = self.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.page_table = torch.zeros(max_bs, self.max_pages, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, object] = {}  # each graph's attention metadata, for re-planning
        # Backends whose metadata lives on the host (FlashInfer) re-plan before each replay.
        self._prepare = getattr(runner.attn_backend, "graph_prepare_replay", None)
        # Whether a decode window's later steps can replay a graph with no host work (replay_next).
        self.replays_windows = self._prepare is None
        # Graphs through shared prefixes: buckets, graphs, logits, and the groups' static buffer.
        self.shared_buckets: list[int] = []
        self.shared_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.shared_logits: dict[int, torch.Tensor] = {}
        self.shared_buffer = None
        self._packed_plan = None  # the plan the shared buffer holds
        self._last = None  # (graph, logits, rows) of the last replay, for replay_next
        finder = runner.shared_prefix_finder
        if finder is not None:
            self.max_items = finder.max_items(max_bs)
            size = runner.attn_backend.shared_prefix_buffer_size(max_bs, self.max_items)
            self.shared_buffer = torch.zeros(size, dtype=torch.int32, device=dev)
            self.shared_buckets = batch_buckets(max_bs, step=64)
        self._capture_all(max_context)

    # --- capture -----------------------------------------------------------------------------
    def _static_batch(self, bs: int, max_context: int, shared: bool = False) -> ForwardBatch:
        backend = self.runner.attn_backend
        fb = ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            extend_lens=[1] * bs,
            prefix_lens=[0] * bs,
            page_table=self.page_table[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            logits_indices=torch.arange(bs, device=self.device),
            attn_backend=backend,
        )
        if shared:
            # The prefix pass's grid covers only the entries a plan over bs rows can have: entries
            # past the plan's do nothing but still cost a launch slot each (H200, a 64-row graph
            # with 128 entries' grid: 35.1 us a layer for a 1-group plan, 13.1 us with 36).
            fb.attn_metadata = backend.graph_decode_metadata(
                self.seq_lens[:bs], self.page_table[:bs], max_context, self.shared_buffer, self.max_items,
                grid_items=self.runner.shared_prefix_finder.max_items(bs),
            )
        else:
            fb.attn_metadata = backend.graph_decode_metadata(self.seq_lens[:bs], self.page_table[:bs], max_context)
        return fb

    def _forward(self, fb: ForwardBatch) -> torch.Tensor:
        model = self.runner.model
        return model.compute_logits(model(fb))

    @torch.inference_mode()
    def _capture_all(self, max_context: int) -> None:
        def batches(bs: int) -> ForwardBatch:
            return self._static_batch(bs, max_context)

        for bs, fb, graph, logits in capture_graphs(self.device, self.buckets, batches, self._forward):
            self.graphs[bs] = graph
            self.logits[bs] = logits
            self.metadata[bs] = fb.attn_metadata
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.graphs), self.buckets)
        if self.shared_buffer is None:
            return

        def shared_batches(bs: int) -> ForwardBatch:
            return self._static_batch(bs, max_context, shared=True)

        # The buffer says "no groups" (num_items 0) while capturing: the prefix pass runs empty.
        for bs, _, graph, logits in capture_graphs(self.device, self.shared_buckets, shared_batches, self._forward):
            self.shared_graphs[bs] = graph
            self.shared_logits[bs] = logits
        logger.info("captured %d shared-prefix decode CUDA graphs", len(self.shared_graphs))

    # --- replay ------------------------------------------------------------------------------
    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.is_decode and fb.batch_size <= self.max_bs and fb.page_table.shape[1] <= self.max_pages

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [bs, vocab] of a decode batch (every row samples)."""
        bs = fb.batch_size
        plan = fb.shared_prefix if self.shared_graphs else None
        buckets = self.buckets if plan is None else self.shared_buckets
        padded = next(b for b in buckets if b >= bs)
        width = fb.page_table.shape[1]
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc)
        self.seq_lens[:bs].copy_(fb.positions.to(torch.int32) + 1)
        self.page_table[:bs, :width].copy_(fb.page_table)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.page_table[bs:padded, 0].zero_()
        if plan is not None:
            if plan.num_items > self.runner.shared_prefix_finder.max_items(padded):
                raise RuntimeError(f"a plan of {plan.num_items} entries exceeds the {padded}-row graph's grid")
            if plan is not self._packed_plan:  # a step of the same requests has the same plan
                ints = self.runner.attn_backend.pack_shared_prefix(plan, self.max_bs, self.max_items)
                self.shared_buffer.copy_(ints_to_device(ints, self.device, torch.int32))
                self._packed_plan = plan
            self._last = (self.shared_graphs[padded], self.shared_logits[padded], bs)
            self.shared_graphs[padded].replay()
            return self.shared_logits[padded][:bs]
        if self._prepare is not None:
            self._prepare(self.metadata[padded], fb, padded)
        self._last = (self.graphs[padded], self.logits[padded], bs)
        self.graphs[padded].replay()
        return self.logits[padded][:bs]

    def replay_next(self, sampled: torch.Tensor) -> torch.Tensor:
        """The next step of a decode window after `replay` (or `replay_next`): every row one
        position on, with `sampled` (the last step's samples, [rows]) as its token, through the
        same graph. The inputs move on in the static buffers, on the device: no host work but
        the launches. The K/V slot is read from the page table the last replay copied, which
        the scheduler extended to the window's last position."""
        if not self.replays_windows:
            raise RuntimeError("decode windows need an attention backend that plans on the device")
        graph, logits, bs = self._last
        self.input_ids[:bs].copy_(sampled)
        positions = self.positions[:bs]
        positions += 1
        self.seq_lens[:bs] += 1
        self.out_cache_loc[:bs].copy_(self.runner._slots_from_table(self.page_table[:bs], positions))
        graph.replay()
        return logits[:bs]
