"""ModelRunner: owns the model, the KV pool and the attention backend; runs one step.

run(batch) turns the scheduler's chunks into a ForwardBatch (flattened token ids,
positions, the slots their K/V go to, the page table), runs the model, computes logits
only for the rows that sample, and samples them for the whole batch at once. Requests that
asked for logprobs or hidden states get them computed in the same step (step_extras.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.device_page_table import DevicePageTable
from pipeline_infer.forward_batch import ForwardBatch, ints_to_device, to_device
from pipeline_infer.page_table import PageTableBuilder
from pipeline_infer.request import PLACEHOLDER
from pipeline_infer.sampler import Sampler, SamplingBatchInfo, warm_up_greedy
from pipeline_infer.step_extras import StepExtras
from pipeline_infer.structured import fill_bitmask

if TYPE_CHECKING:
    from pipeline_infer.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET_BYTES = 2 << 30  # the CPU has no memory gauge worth trusting; 2 GiB serves batch jobs
# Prefix groups one decode step attends to together (bounds the kernel's work list).
_MAX_SHARED_PREFIX_GROUPS = 64
# Rows a group needs to attend to its prefix together. Smaller groups cost more through the
# prefix pass (a tile of rows per work entry, computed whole, and a fixed chain of key blocks)
# and the merge's extra slots than the prefix reads they save. H200, Qwen2.5-0.5B heads,
# 1,024-key prefixes, one layer in a CUDA graph, every row in a group (fourteenth session):
# 32 groups of 4 rows 27.5 us against 21.3 us without (plain decode at its best split count);
# of 6 rows 29.8 against 31.6; of 8 rows 31.6 against 36.9; of 16 rows 47.8 against 63.7.
_MIN_SHARED_PREFIX_GROUP_ROWS = 8


def _window_step(info: SamplingBatchInfo, k: int) -> SamplingBatchInfo:
    """The sampling info of a decode window's step k: the first step's, each row's draw counter
    k on (a seeded row's draw depends on it; a greedy batch has no draw)."""
    if info.all_greedy:
        return info
    return dataclasses.replace(info, steps=[s + k for s in info.steps])


def _chunk_slots(pages: list[int], start: int, end: int, ps: int) -> list[int]:
    """The K/V slots of positions [start, end) of a request with these pages: one range a page."""
    if ps == 1:
        return pages[start:end]
    out: list[int] = []
    first, last = start // ps, (end - 1) // ps
    for i in range(first, last + 1):
        base = pages[i] * ps
        out.extend(range(base + (start - i * ps if i == first else 0), base + (end - i * ps if i == last else ps)))
    return out


class _PromptIds:
    """The sampled rows' prompt ids for SamplingBatchInfo, read only for the rows that need them
    (a repetition penalty): a request makes its prompt list on each read (Request.prompt_ids)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list) -> None:
        self.reqs = reqs

    def __len__(self) -> int:
        return len(self.reqs)

    def __getitem__(self, i: int) -> list[int]:
        return self.reqs[i].prompt_ids


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are launched; ModelRunner.collect waits for its tokens."""

    batch: "ScheduledBatch"
    sampled: torch.Tensor | None = None  # [sampling rows] on the device; None when no chunk samples
    host: torch.Tensor | None = None  # pinned copy of `sampled`, filled once `done` has passed (CUDA)
    done: Any = None  # torch.cuda.Event recorded after the copy, or None
    extras: StepExtras | None = None
    hidden: torch.Tensor | None = None  # kept for extras only
    logits: torch.Tensor | None = None


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
        chunked_prefill_size: int = 8192,
        max_running_requests: int = 256,
        extend_cuda_graph: bool = False,
        shared_prefix_attention: bool = False,
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
        self._backend_name = attention_backend

        self.activation_peak_bytes = 0
        if max_total_tokens is None and device.type == "cuda":
            self.activation_peak_bytes = self._measure_activation_peak(
                chunked_prefill_size + max_running_requests, max_running_requests, max_context
            )
        num_pages = self._num_pages(max_total_tokens, mem_fraction_static, max_context)
        self.kv_pool = KVPool(
            self.num_layers, num_pages, page_size, self.num_kv_heads, self.head_dim, dtype, device
        )
        self.attn_backend = self._make_backend(attention_backend)
        self.sampler = Sampler()
        # The step's page table: kept on the device and updated for backends that read it only
        # there (device_page_table.py), rebuilt on the host for those that plan from it.
        self.page_tables = PageTableBuilder()
        self.device_tables = (
            DevicePageTable(device) if getattr(self.attn_backend, "reads_page_table_on_device", False) else None
        )
        self._prev_sampled: torch.Tensor | None = None  # the last launched step's samples (device)
        # Decode-only steps: row indices on the device (logits_indices is every row), a host
        # list of 0..n-1 to compare sample rows against, and whether the last decode-only
        # step's rows were all bare argmax (true again for the same rows: see _argmax_only).
        self._rows_dev = torch.arange(0, dtype=torch.long, device=device)
        self._rows_host: list[int] = []
        self._last_argmax_only = False
        # Decode rows that share prefix pages (the radix cache's) attend to them once per group,
        # where the backend can (Triton: kernels/triton/shared_prefix_attention.py).
        self.shared_prefix_finder = None
        rows_per_item = getattr(self.attn_backend, "shared_prefix_rows", None)
        if shared_prefix_attention and rows_per_item:
            from pipeline_infer.shared_prefix import SharedPrefixFinder

            self.shared_prefix_finder = SharedPrefixFinder(
                page_size, rows_per_item, _MAX_SHARED_PREFIX_GROUPS, min_group_rows=_MIN_SHARED_PREFIX_GROUP_ROWS
            )
        self.shared_prefix_steps = 0  # decode steps that attended through shared prefixes (for tests)
        self.timer = None  # a step_timing.StepTimer when the engine was asked for step timing
        self.graph_runner = None
        if cuda_graph_max_bs > 0 and device.type == "cuda" and hasattr(self.attn_backend, "graph_decode_metadata"):
            from pipeline_infer.cuda_graph import CudaGraphRunner

            context = min(max_context, self.capacity_tokens)
            self.graph_runner = CudaGraphRunner(self, cuda_graph_max_bs, context)
        self.extend_graphs = None
        if extend_cuda_graph and device.type == "cuda" and hasattr(self.attn_backend, "graph_extend_metadata"):
            from pipeline_infer.extend_graph import ExtendGraphRunner

            self.extend_graphs = ExtendGraphRunner(
                self, chunked_prefill_size + max_running_requests, max_running_requests,
                min(max_context, self.capacity_tokens),
            )
        warm_up_greedy(self.hf_config.vocab_size, self.dtype, device)
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
            # What is free now is the card minus the weights (and anything else on it); the
            # KV pool takes mem_fraction of that after setting aside the measured activation
            # peak of the largest step. The rest covers CUDA graphs, cuBLAS workspaces and
            # allocator fragmentation.
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int((free - self.activation_peak_bytes) * mem_fraction)
            budget = max(budget, per_page * 2)
        else:
            budget = _CPU_KV_BUDGET_BYTES
        # Never much beyond what a full batch of maximal sequences could use.
        pages = budget // per_page
        return int(max(2, min(pages, 1 << 22)))

    @torch.inference_mode()
    def _measure_activation_peak(self, step_tokens: int, sampling_rows: int, max_context: int) -> int:
        """Bytes a worst-case step allocates beyond the weights: run one and read the peak.

        The largest step is a full prefill chunk plus a decode row per running request
        (step_tokens), and sampling over `sampling_rows` rows with every filter and penalty on
        (top-p sorts the whole vocabulary). It runs on a throwaway KV pool just big enough,
        with the torch attention backend's temporaries bounded by the chunk like the others.
        """
        from pipeline_infer.kernels.attention.torch_backend import TorchAttentionBackend
        from pipeline_infer.sampling_params import SamplingParams

        ps, dev = self.page_size, self.device
        seq_len = max(1, min(step_tokens, max_context))
        num_seqs = -(-step_tokens // seq_len)
        pages_per_seq = -(-seq_len // ps)
        pool = KVPool(
            self.num_layers, num_seqs * pages_per_seq + 1, ps, self.num_kv_heads, self.head_dim, self.dtype, dev
        )
        self.kv_pool = pool
        try:
            backend = self._make_backend(self._probe_backend_name())
        except Exception:  # the probe only needs some backend; the real one is made afterwards
            backend = TorchAttentionBackend(pool, self.num_q_heads, self.num_kv_heads, self.head_dim)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        pos = torch.arange(seq_len, device=dev)
        table = (1 + torch.arange(num_seqs * pages_per_seq, device=dev, dtype=torch.int32)).view(num_seqs, -1)
        slots = (table.long()[:, (pos // ps)] * ps + pos % ps).reshape(-1)
        vocab = self.hf_config.vocab_size
        fb = ForwardBatch(
            input_ids=torch.randint(0, vocab, (num_seqs * seq_len,), device=dev),
            positions=pos.repeat(num_seqs),
            extend_lens=[seq_len] * num_seqs,
            prefix_lens=[0] * num_seqs,
            page_table=table,
            page_table_host=table.cpu().numpy(),
            out_cache_loc=slots,
            logits_indices=torch.full((sampling_rows,), seq_len - 1, dtype=torch.long, device=dev),
            attn_backend=backend,
        )
        backend.plan(fb)
        hidden = self.model(fb)
        logits = self.model.compute_logits(hidden[fb.logits_indices])
        # The sampler's worst case: flat logits under top-p, so no row's kept set fits in the
        # top candidates and every row takes the full-vocabulary sort (sampler._truncate).
        logits.zero_()
        params = [SamplingParams(temperature=0.7, top_p=0.9999, min_p=0.05, repetition_penalty=1.1)] * sampling_rows
        info = SamplingBatchInfo.build(
            params=params,
            prompt_ids=[[1, 2, 3]] * sampling_rows,
            output_ids=[[4]] * sampling_rows,
            seeds=[None] * sampling_rows,
            vocab_size=logits.shape[-1],
            device=dev,
            eos_token_ids=self.eos_token_ids,
        )
        Sampler()(logits, info)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del fb, hidden, logits, info, backend
        self.kv_pool = None
        del pool
        torch.cuda.empty_cache()
        logger.info("activation peak of a %d-token step: %.1f MiB", step_tokens, peak / 2**20)
        return int(peak)

    def _probe_backend_name(self) -> str:
        return getattr(self, "_backend_name", "torch")

    def _make_backend(self, name: str):
        from pipeline_infer.kernels.attention.select import make_backend

        return make_backend(name, self.kv_pool, self.num_q_heads, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.kv_pool.allocator.capacity * self.page_size

    # --- one step ------------------------------------------------------------------
    def build_forward_batch(self, batch: "ScheduledBatch") -> ForwardBatch:
        if batch.decode_reqs is not None:
            return self._build_decode_batch(batch.decode_reqs, batch.decode_starts)
        # Host work of every step, so kept to plain-int work per decode row (most chunks of a
        # mixed step) and C-speed list operations per prefill chunk: no numpy call per chunk.
        chunks = batch.chunks
        reqs = [c.req for c in chunks]
        starts = [c.start for c in chunks]
        lengths = [c.length for c in chunks]
        update = self.device_tables.prepare(reqs) if self.device_tables is not None else None
        # With the page table on the device, each token's position and K/V slot are worked out
        # there from its chunk's start and length (_chunk_positions_and_slots): the host sends
        # two ints a chunk instead of two a token (a 16,384-token prefill step: 32,768 ints
        # made, converted and copied). Otherwise they are computed here for the host table.
        on_host = update is None
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        fill_rows: list[int] = []  # rows whose token is the previous step's sample, still on the device
        fill_from: list[int] = []  # ... and its row in that step's samples
        num_sampling = 0
        for c in chunks:
            req, start, length = c.req, c.start, c.length
            if length == 1:
                token = req.token_ids[start]
                if token == PLACEHOLDER:
                    fill_rows.append(len(ids))
                    fill_from.append(req.sample_row)
                    token = 0
                ids.append(token)
                if on_host:
                    positions.append(start)
                    slots.append(req.pages[start // ps] * ps + start % ps)
            else:
                end = start + length
                ids.extend(req.token_ids[start:end])
                if on_host:
                    positions.extend(range(start, end))
                    slots.extend(_chunk_slots(req.pages, start, end, ps))
            if c.samples:
                logits_rows.append(len(ids) - 1)
                req.sample_row = num_sampling  # where the next step finds this token on the device
                num_sampling += 1
        n = len(ids)
        # One host-to-device copy for the int columns and, with the device page table, its
        # update; a table built on the host goes in a second copy.
        if on_host:
            columns = ints_to_device(ids + positions + slots + logits_rows, self.device)
            input_ids, positions_dev, slots_dev, logits_dev = columns.split([n, n, n, len(logits_rows)])
            page_table_host = self.page_tables.build(reqs)
            page_table = to_device(torch.from_numpy(page_table_host), self.device)
        else:
            table_ints = update.ints
            columns = ints_to_device(ids + starts + lengths + logits_rows + table_ints, self.device)
            input_ids, starts_dev, lengths_dev, logits_dev, table_dev = columns.split(
                [n, len(chunks), len(chunks), len(logits_rows), len(table_ints)]
            )
            page_table, page_table_host = self.device_tables.apply(update, table_dev), None
            positions_dev, slots_dev = self._chunk_positions_and_slots(page_table, starts_dev, lengths_dev, n)
        if fill_rows:
            input_ids = self._fill_in_flight(input_ids, fill_rows, fill_from)
        fb = ForwardBatch(
            input_ids=input_ids,
            positions=positions_dev,
            extend_lens=lengths,
            prefix_lens=starts,
            page_table=page_table,
            page_table_host=page_table_host,
            out_cache_loc=slots_dev,
            logits_indices=logits_dev,
            attn_backend=self.attn_backend,
        )
        finder = self.shared_prefix_finder
        if finder is not None and n == len(reqs):  # a decode step (one token a row)
            self._plan_shared_prefix(fb, reqs, lambda: [c.start + 1 for c in chunks], not on_host)
        elif finder is not None:
            finder.reset()  # the device table's "same batch" now compares against this step
        return fb

    def _build_decode_batch(self, reqs: list, starts: list[int]) -> ForwardBatch:
        """build_forward_batch for a step of decodes alone (ScheduledBatch's columns): one token
        a row at position starts[i], every row sampling. Whole-list passes over the rows instead
        of the general loop, and on the device what the device can derive:

        - each row's token is usually the previous step's sample, still on the device (overlap
          schedule): those rows are filled from it, and when every row is one and the rows are
          the previous step's in its order, the samples are the step's input ids as they are;
        - with the device page table, the K/V slots come from the table on the device
          (page_table[row, position // page_size] * page_size + position % page_size) instead
          of a per-row lookup on the host;
        - the logits rows are every row: a slice of a kept arange.
        """
        n = len(reqs)
        ps = self.page_size
        tokens = [r.token_ids[s] for r, s in zip(reqs, starts)]
        pending = tokens.count(PLACEHOLDER)  # rows whose token is still on the device
        rows = self._row_list(n)
        sources = [r.sample_row for r in reqs]
        if sources != rows:  # this step's sample rows are its rows (the next step reads them)
            for i, r in enumerate(reqs):
                r.sample_row = i
        update = self.device_tables.prepare(reqs) if self.device_tables is not None else None
        table_ints = update.ints if update is not None else []
        send_ids = pending < n
        ids = [0 if t == PLACEHOLDER else t for t in tokens] if pending and send_ids else tokens
        slots = [] if update is not None else [r.pages[s // ps] * ps + s % ps for r, s in zip(reqs, starts)]
        head = ids if send_ids else []
        columns = ints_to_device(head + starts + slots + table_ints, self.device)
        ids_dev, positions_dev, slots_dev, table_dev = columns.split(
            [len(head), n, len(slots), len(table_ints)]
        )
        if update is not None:
            page_table, page_table_host = self.device_tables.apply(update, table_dev), None
            slots_dev = self._slots_from_table(page_table, positions_dev)
        else:
            page_table_host = self.page_tables.build(reqs)
            page_table = to_device(torch.from_numpy(page_table_host), self.device)
        if pending == n:  # every row's token is still on the device: no ids were sent
            input_ids = self._fill_in_flight(None, rows, sources)
        elif pending:
            fill_rows = [i for i, t in enumerate(tokens) if t == PLACEHOLDER]
            input_ids = self._fill_in_flight(ids_dev, fill_rows, [sources[i] for i in fill_rows])
        else:
            input_ids = ids_dev
        fb = ForwardBatch(
            input_ids=input_ids,
            positions=positions_dev,
            extend_lens=[1] * n,
            prefix_lens=starts,
            page_table=page_table,
            page_table_host=page_table_host,
            out_cache_loc=slots_dev,
            logits_indices=self._rows_on_device(n),
            attn_backend=self.attn_backend,
            decode_only=True,
        )
        if self.shared_prefix_finder is not None:
            self._plan_shared_prefix(fb, reqs, lambda: [s + 1 for s in starts], update is not None)
        return fb

    def _plan_shared_prefix(self, fb: ForwardBatch, reqs: list, seq_lens, on_device_table: bool) -> None:
        """A decode step's shared-prefix groups (shared_prefix.py) into fb.shared_prefix."""
        same = on_device_table and self.device_tables.same_batch
        fb.shared_prefix = self.shared_prefix_finder.plan(reqs, seq_lens, same)
        if fb.shared_prefix is not None:
            self.shared_prefix_steps += 1

    def _row_list(self, n: int) -> list[int]:
        """[0, 1, ..., n - 1] (a kept list, grown as needed; compare, do not change)."""
        if len(self._rows_host) < n:
            self._rows_host = list(range(max(n, 2 * len(self._rows_host))))
        return self._rows_host if len(self._rows_host) == n else self._rows_host[:n]

    def _rows_on_device(self, n: int) -> torch.Tensor:
        if self._rows_dev.shape[0] < n:
            self._rows_dev = torch.arange(max(n, 2 * self._rows_dev.shape[0]), dtype=torch.long, device=self.device)
        return self._rows_dev[:n]

    def _slots_from_table(
        self, page_table: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each token's K/V slot from the step's page table on the device: token i at positions[i]
        with its pages in row rows[i] (rows None: row i, a decode step's one token a row)."""
        ps = self.page_size
        cols = positions if ps == 1 else torch.div(positions, ps, rounding_mode="floor")
        pages = page_table.gather(1, cols.unsqueeze(1)).view(-1) if rows is None else page_table[rows, cols]
        return pages.long() if ps == 1 else pages.long() * ps + positions % ps

    def _chunk_positions_and_slots(
        self, page_table: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's position and K/V slot, on the device, for a step of chunks: chunk i feeds
        lengths[i] tokens from position starts[i], its pages in row i of page_table."""
        rows = torch.repeat_interleave(self._rows_on_device(starts.shape[0]), lengths, output_size=num_tokens)
        first = torch.cumsum(lengths, 0) - lengths  # each chunk's first token's index in the step
        positions = starts[rows] + self._rows_on_device(num_tokens) - first[rows]
        return positions, self._slots_from_table(page_table, positions, rows)

    def _fill_in_flight(self, input_ids: torch.Tensor | None, rows: list[int], sources: list[int]) -> torch.Tensor:
        """Put the previous step's samples (on the device, not yet on the host) into input_ids:
        row rows[i] gets sample sources[i]. input_ids None: every row of the step is one of
        them (rows is 0..n-1) and nothing was sent for it."""
        prev = self._prev_sampled
        assert prev is not None, "a placeholder token without a step in flight"
        n = len(rows)
        # Every row i takes sample i: the samples are the step's ids as they are (the usual
        # decode step: same requests, same order).
        every_row = input_ids is None or (n == input_ids.shape[0] and rows == list(range(n)))
        if every_row and n == prev.shape[0] and rows == sources:
            return prev
        if input_ids is None:
            return prev[ints_to_device(sources, self.device)]
        index = ints_to_device(rows + sources, self.device)
        input_ids[index[:n]] = prev[index[n:]]
        return input_ids

    @torch.inference_mode()
    def run(self, batch: "ScheduledBatch") -> list[int | None]:
        """Run one step; the sampled token for each chunk that samples, None for the others."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: "ScheduledBatch") -> "LaunchedStep":
        """Build and launch one step (forward + sampling) without waiting for it: `collect` does.

        On CUDA the sampled ids start their copy to the host at once, so collecting them waits
        for this step alone, not for a step launched after it (the overlap schedule).
        """
        timer = self.timer  # None unless step timing is on; its hooks only read clocks / record events
        fb = self.build_forward_batch(batch)
        decode_reqs = batch.decode_reqs
        if decode_reqs is not None:  # a decode-only step: every row samples
            reqs = decode_reqs
            # Logprobs / hidden states some requests asked for (None for almost every step).
            wants = [r.extra_outputs for r in reqs].count(None) != len(reqs)
            extras = StepExtras.plan(batch.chunks) if wants else None
        else:
            reqs = [c.req for c in batch.chunks if c.samples]
            extras = StepExtras.plan(batch.chunks)
        hidden = None
        graph_ok = extras is None or not extras.needs_hidden_states  # graphs return logits only
        in_graph = graph_ok and self.graph_runner is not None and self.graph_runner.can_run(fb)
        if in_graph:
            if timer is not None:
                timer.built()
            logits = self.graph_runner.replay(fb)  # a decode batch
            if len(reqs) != fb.batch_size:  # a one-token prefill chunk that does not sample
                logits = logits[fb.logits_indices]
        else:
            if extras is None and self.extend_graphs is not None and self.extend_graphs.can_run(fb):
                if timer is not None:
                    timer.built()
                hidden = self.extend_graphs.replay(fb)  # a prefill or mixed batch
            else:
                self.attn_backend.plan(fb)
                if timer is not None:
                    timer.built()
                hidden = self.model(fb)
            if not reqs and extras is None:
                self._prev_sampled = None  # no placeholder can refer to this step
                if timer is not None:
                    timer.launched()
                return LaunchedStep(batch)  # nothing samples: nothing to wait for
            logits = self.model.compute_logits(hidden[fb.logits_indices]) if reqs else None
        if reqs:
            argmax_only = self._argmax_only(reqs, decode_reqs is not None)
            # Filled on the host while the device still runs the forward pass.
            bitmask = fill_bitmask([r.grammar for r in reqs], logits.shape[-1])
            if argmax_only:  # every row a bare argmax (the usual greedy batch job): no per-row set-up
                info = SamplingBatchInfo.build(
                    params=[], prompt_ids=[], output_ids=[], seeds=[], steps=[], vocab_size=logits.shape[-1],
                    device=logits.device, vocab_bitmask=bitmask, argmax_only=True,
                )
            else:
                info = SamplingBatchInfo.build(
                    params=[r.params for r in reqs],
                    prompt_ids=_PromptIds(reqs),
                    output_ids=[r.output_ids for r in reqs],
                    seeds=[r.seed for r in reqs],
                    vocab_size=logits.shape[-1],
                    device=logits.device,
                    eos_token_ids=self.eos_token_ids,
                    vocab_bitmask=bitmask,
                    # The token sampled now sits at the end of token_ids (a placeholder; the one
                    # before it may be one too, still in flight): its index among the outputs.
                    # A window's first step samples the first of its placeholders.
                    steps=[len(r.token_ids) - 1 - r.prompt_len for r in reqs] if batch.num_steps == 1
                    else [s + 1 - r.prompt_len for r, s in zip(reqs, batch.decode_starts)],
                )
            sampled = self.sampler(logits, info)
            if batch.num_steps > 1:  # a decode window: the other steps, fed on the device
                sampled = self._rest_of_window(fb, sampled, info, batch.num_steps, in_graph)
        else:
            sampled = torch.empty(0, dtype=torch.long, device=self.device)
        # The samples a placeholder of the next step refers to: a window's last step's.
        self._prev_sampled = sampled if batch.num_steps == 1 else sampled[-fb.batch_size :]
        host = done = None
        if extras is None and sampled.is_cuda:
            host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        if timer is not None:
            timer.launched()
        return LaunchedStep(batch, sampled, host, done, extras, hidden, logits)

    def _rest_of_window(
        self, fb: ForwardBatch, sampled: torch.Tensor, info: SamplingBatchInfo, steps: int, in_graph: bool
    ) -> torch.Tensor:
        """Steps 1..steps-1 of a decode window (ScheduledBatch.num_steps), launched without a
        host round trip: each row's next input is its sample of the step before, one position
        on, its K/V slot read from the step's page table (the scheduler gave every row pages for
        the whole window). The window's samples, step after step ([steps * rows])."""
        samples = [sampled]
        if in_graph and self.graph_runner.replays_windows:
            for k in range(1, steps):
                sampled = self.sampler(self.graph_runner.replay_next(sampled), _window_step(info, k))
                samples.append(sampled)
            return torch.cat(samples)
        positions, prefix_lens = fb.positions, fb.prefix_lens
        for k in range(1, steps):
            positions = positions + 1
            prefix_lens = [p + 1 for p in prefix_lens]
            nxt = ForwardBatch(
                input_ids=sampled,
                positions=positions,
                extend_lens=fb.extend_lens,
                prefix_lens=prefix_lens,
                page_table=fb.page_table,
                page_table_host=fb.page_table_host,
                out_cache_loc=self._slots_from_table(fb.page_table, positions),
                logits_indices=fb.logits_indices,
                attn_backend=self.attn_backend,
                shared_prefix=fb.shared_prefix,
                decode_only=True,
            )
            self.attn_backend.plan(nxt)
            logits = self.model.compute_logits(self.model(nxt)[nxt.logits_indices])
            sampled = self.sampler(logits, _window_step(info, k))
            samples.append(sampled)
        return torch.cat(samples)

    def _argmax_only(self, reqs: list, decode_only: bool) -> bool:
        """Whether every sampling row is a bare argmax (Request.argmax_from reached). A row's
        output count only grows, so a decode-only step of the last decode-only step's rows, in
        its order (the device page table's same_batch), keeps that step's answer once true."""
        tables = self.device_tables
        if decode_only and self._last_argmax_only and tables is not None and tables.same_batch:
            return True
        ok = all(len(r.output_ids) >= r.argmax_from for r in reqs)
        self._last_argmax_only = ok and decode_only
        return ok

    def collect(self, step: "LaunchedStep") -> list[int | None]:
        """Wait for a launched step's samples: the token of each chunk that samples, None for the others."""
        timer = self.timer
        if step.sampled is None:  # nothing samples: nothing to wait for
            if timer is not None:  # the device time is read after a later step's sync
                timer.on_host(synced=False)
            return [None] * step.batch.size
        if step.extras is not None:  # one transfer carrying the logprobs and hidden states too
            with torch.inference_mode():
                tokens = step.extras.collect(self.model, step.hidden, step.logits, step.sampled)
        elif step.done is not None:
            step.done.synchronize()  # the step's one host synchronisation
            tokens = step.host.tolist()
        else:
            tokens = step.sampled.tolist()
        if timer is not None:
            timer.on_host()
        if len(tokens) == step.batch.size or step.batch.num_steps > 1:  # a decode step or window: in order
            return tokens
        it = iter(tokens)
        return [next(it) if c.samples else None for c in step.batch.chunks]

    def on_idle(self) -> None:
        """The engine has nothing to run: drop per-batch state kept from step to step."""
        self.page_tables.reset()
        if self.shared_prefix_finder is not None:
            self.shared_prefix_finder.reset()
        if self.device_tables is not None:
            self.device_tables.reset()
        hook = getattr(self.attn_backend, "on_idle", None)
        if hook is not None:
            hook()

    def release(self) -> None:
        """Drop the model and the KV tensors so their memory can go back."""
        self.graph_runner = None  # graphs hold their own memory pool
        self.extend_graphs = None
        self.model = None
        self.kv_pool = None
        self.attn_backend = None
        if self.device.type == "cuda":
            import gc

            gc.collect()  # break reference cycles that still pin CUDA tensors
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
