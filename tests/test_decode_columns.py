"""Decode-only steps as columns (ScheduledBatch.decode_reqs / decode_starts) instead of chunks.

Each consumer has a columns path: the scheduler's decode commit (`_commit_decodes`, with its
inline "plain" append) and the model runner's decode build (`_build_decode_batch`). Each is
checked against the chunk path it replaces: the same steps, the same request states after
commit, the same ForwardBatch tensors, step after step of real runs.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline_infer import Engine
from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.request import PLACEHOLDER, Request
from pipeline_infer.sampling_params import SamplingParams
from pipeline_infer.scheduler import ScheduledBatch, ScheduledChunk, Scheduler
from tiny_models import make_tiny_model, mixed_admission_workload


def _req(rid: str, prompt: list[int], **params) -> Request:
    return Request(rid=rid, prompt_ids=prompt, params=SamplingParams(**params), eos_token_ids=frozenset({2}))


def _run_scheduler(columns: bool, mixed: bool) -> tuple[list, dict, int]:
    """A scheduler-only run (tokens from a fixed rule); each step as (rid, start, length, samples,
    prefill) tuples, each request's output ids and finish reason at the end, and how many mixed
    steps committed their decodes as columns. With columns=False, decode-only steps are built as
    chunk batches and every chunk batch is committed chunk by chunk (the old ways)."""
    rng = random.Random(7)
    mixed_with_columns = [0]
    sched = Scheduler(PageAllocator(200), 4, max_running_requests=6, chunked_prefill_size=24, mixed_chunk=mixed)
    if not columns:  # decode-only steps as chunks, and a mixed step's decodes committed as chunks
        batch_as_chunks = sched._batch
        sched._batch = lambda chunks, num_decodes=0: batch_as_chunks(chunks)
        sched._decode_batch = lambda decodes, steps=1: sched._batch(
            [ScheduledChunk(r, r.num_computed, 1, True, False) for r in decodes]
        )
    reqs = []
    for i in range(14):
        prompt = [rng.randrange(3, 50) for _ in range(rng.randint(1, 30))]
        # Some stop on token 2 (eos) or 7 (a stop token), some only by length.
        reqs.append(_req(f"r{i}", prompt, max_new_tokens=rng.randint(1, 20), ignore_eos=i % 3 == 0,
                         stop_token_ids=[7] if i % 4 == 1 else None, min_new_tokens=2 if i % 5 == 2 else 0))
    for r in reqs:
        sched.add(r)
    steps = []
    while sched.has_work:
        batch = sched.schedule()
        assert batch is not None
        if columns and batch.decode_reqs is not None:
            assert batch.size == batch.num_tokens == len(batch.decode_reqs) == len(batch.decode_starts)
        steps.append([(c.req.rid, c.start, c.length, c.samples, c.prefill) for c in batch.chunks])
        if columns and batch.num_decodes:
            mixed_with_columns[0] += 1
            assert all(not c.prefill for c in batch.chunks[: batch.num_decodes])
        tokens = [sum(c.req.token_ids[: c.start + c.length]) % 11 if c.samples else None for c in batch.chunks]
        sched.commit(batch, tokens)
    return steps, {r.rid: (r.output_ids, r.finish_reason.to_dict()) for r in reqs}, mixed_with_columns[0]


@pytest.mark.parametrize("mixed", [True, False])
def test_decode_columns_schedule_and_commit_as_chunks_do(mixed):
    steps, outputs, mixed_with_columns = _run_scheduler(columns=True, mixed=mixed)
    ref_steps, ref_outputs, _ = _run_scheduler(columns=False, mixed=mixed)
    assert (mixed_with_columns > 0) == mixed  # mixed steps committed their decodes as columns
    assert steps == ref_steps
    assert outputs == ref_outputs
    # Both stop kinds and both length kinds happened.
    reasons = [o[1]["type"] for o in outputs.values()]
    assert "stop" in reasons and "length" in reasons
    assert sum(all(not c[4] for c in s) for s in steps) > 10  # decode-only steps ran as columns


def test_batch_takes_chunks_or_columns():
    with pytest.raises(TypeError, match="exactly one of"):
        ScheduledBatch()
    with pytest.raises(TypeError, match="exactly one of"):
        ScheduledBatch([], decode_reqs=[], decode_starts=[])


class _Detok:
    """A deferred detokenizer's surface: ids appended by add(), text decoded at finish()."""

    def __init__(self, deferred: bool):
        self._deferred, self.ids, self.stopped = deferred, [], None

    @property
    def deferred_ids(self):
        return self.ids if self._deferred else None

    def add(self, token):
        self.ids.append(token)
        return "" if self._deferred else f"<{token}>"

    def finish(self):
        return "".join(f"<{t}>" for t in self.ids) if self._deferred else ""


@pytest.mark.parametrize("plain", [True, False])
def test_plain_decode_commit_equals_fill_token(plain):
    """_commit_decodes' inline append against Request.fill_token for every row (plain_commit
    forced off): output ids, token ids, finish reasons and texts, with stop tokens, eos,
    min_new_tokens, the context length, deferred and incremental detokenizers."""

    def run(force_general: bool) -> list:
        sched = Scheduler(PageAllocator(400), 4, max_running_requests=16, chunked_prefill_size=512)
        specs = [
            dict(max_new_tokens=9), dict(max_new_tokens=9, ignore_eos=True),
            dict(max_new_tokens=12, stop_token_ids=[5]), dict(max_new_tokens=12, min_new_tokens=4),
            dict(max_new_tokens=30), dict(max_new_tokens=1),
        ]
        reqs = []
        for i, spec in enumerate(specs * 2):
            r = Request(rid=f"q{i}", prompt_ids=[3 + i, 4, 9], params=SamplingParams(**spec),
                        eos_token_ids=frozenset({2}), context_length=14 if i == 4 else 1 << 30,
                        detokenizer=_Detok(deferred=i < 6))
            if force_general:
                r.plain_commit = False
            reqs.append(r)
            sched.add(r)
        assert all(r.plain_commit for r in reqs[:6] if not force_general and r.params.min_new_tokens == 0)
        assert not any(r.plain_commit for r in reqs[6:])  # an incremental detokenizer grows text each token
        rng = random.Random(3)
        while sched.has_work:
            batch = sched.schedule()
            tokens = [rng.choice([2, 5, 8, 9, 10, 11]) if c.samples else None for c in batch.chunks]
            sched.commit(batch, tokens)
        for r in reqs:
            assert PLACEHOLDER not in r.token_ids
        return [(r.output_ids, r.token_ids, r.finish_reason.to_dict(), r.output_text) for r in reqs]

    out = run(force_general=not plain)
    assert out == run(force_general=True)
    assert any(o[2]["type"] == "stop" for o in out) and any(o[2]["type"] == "length" for o in out)


def _compare_builds(runner, checked: dict):
    """Wrap runner.build_forward_batch: for each decode-only step also build the chunk path's
    ForwardBatch first (on the same state) and compare every field the model reads."""
    build = runner.build_forward_batch

    def both(batch):
        if batch.decode_reqs is None:
            return build(batch)
        sample_rows = [r.sample_row for r in batch.decode_reqs]  # each build sets them for the next step
        ref = build(ScheduledBatch(list(batch.chunks)))
        for r, row in zip(batch.decode_reqs, sample_rows):
            r.sample_row = row
        fb = build(batch)
        for name in ("input_ids", "positions", "out_cache_loc", "page_table", "logits_indices"):
            a, b = getattr(fb, name), getattr(ref, name)
            assert torch.equal(a.long(), b.long()), name
        assert fb.prefix_lens == ref.prefix_lens and fb.extend_lens == ref.extend_lens
        assert fb.is_decode and fb.decode_only
        checked["steps"] += 1
        checked["filled"] += any(r.token_ids[s] == PLACEHOLDER for r, s in zip(batch.decode_reqs, batch.decode_starts))
        return fb

    runner.build_forward_batch = both


@pytest.mark.parametrize("backend,page_size,overlap", [
    ("torch", 1, True), ("torch", 4, False), ("triton", 1, True), ("triton", 4, True),
])
def test_decode_build_equals_chunk_build(tmp_path, backend, page_size, overlap):
    """Every decode-only step of a run (admissions while others decode, a shared prefix, a pool
    small enough to retract; overlap on and off) builds the same tensors through the columns
    as through the chunk loop: input ids (taken from the last step's samples under overlap,
    reordered when rows finished), positions, K/V slots (from the device page table with
    Triton), the page table and the logits rows; and the outputs match the torch backend."""
    directory, _ = make_tiny_model(str(tmp_path), "llama", head_dim=16)
    prompts, params = mixed_admission_workload(page_size)
    checked = {"steps": 0, "filled": 0}
    with Engine(directory, attention_backend=backend, page_size=page_size, dtype="float32",
                disable_overlap_schedule=not overlap, max_running_requests=4, max_total_tokens=96) as llm:
        _compare_builds(llm._runner, checked)
        outs = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
        assert llm.get_server_info()["num_retractions"] > 0
    with Engine(directory, attention_backend="torch", page_size=page_size, dtype="float32",
                disable_overlap_schedule=True) as llm:
        assert outs == [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
    assert checked["steps"] > 10
    assert (checked["filled"] > 0) == overlap


def _check_chunk_builds(runner, checked: dict):
    """Wrap runner.build_forward_batch: for each step built from chunks (prefill or mixed) check
    every token's id, position and K/V slot against the chunks themselves: position p of chunk
    (req, start, length) for p in [start, start + length), slot req.pages[p // ps] * ps + p % ps,
    id req.token_ids[p] (or the previous step's sample for a token still in flight)."""
    build = runner.build_forward_batch
    ps = runner.page_size

    def checked_build(batch):
        if batch.decode_reqs is not None:
            return build(batch)
        chunks = batch.chunks
        positions = [p for c in chunks for p in range(c.start, c.start + c.length)]
        slots = [c.req.pages[p // ps] * ps + p % ps for c in chunks for p in range(c.start, c.start + c.length)]
        ids = [c.req.token_ids[p] for c in chunks for p in range(c.start, c.start + c.length)]
        in_flight = {(id(c.req), c.start): c.req.sample_row for c in chunks
                     if c.length == 1 and c.req.token_ids[c.start] == PLACEHOLDER}
        prev = runner._prev_sampled
        fb = build(batch)
        assert fb.positions.tolist() == positions
        assert fb.out_cache_loc.tolist() == slots
        got = fb.input_ids.tolist()
        row = 0
        for c in chunks:
            for p in range(c.start, c.start + c.length):
                want = ids[row]
                if want == PLACEHOLDER:
                    want = int(prev[in_flight[(id(c.req), p)]])
                assert got[row] == want
                row += 1
        checked["steps"] += 1
        checked["mixed"] += any(c.length == 1 for c in chunks) and any(c.length > 1 for c in chunks)
        checked["long"] += any(c.length > 2 * ps for c in chunks)
        return fb

    runner.build_forward_batch = checked_build


@pytest.mark.parametrize("backend,page_size", [("torch", 1), ("torch", 4), ("triton", 1), ("triton", 4)])
def test_chunk_build_positions_slots_and_ids(tmp_path, backend, page_size):
    """Prefill and mixed steps: positions and K/V slots (worked out on the device from each
    chunk's start and length with Triton's device page table; on the host for the torch
    backend) and input ids equal a hand computation from the chunks, step after step of a run
    with admissions beside decodes, a shared prefix, chunked prompts and retractions."""
    directory, _ = make_tiny_model(str(tmp_path), "llama", head_dim=16)
    prompts, params = mixed_admission_workload(page_size)
    checked = {"steps": 0, "mixed": 0, "long": 0}
    with Engine(directory, attention_backend=backend, page_size=page_size, dtype="float32",
                max_running_requests=4, max_total_tokens=96, chunked_prefill_size=16) as llm:
        _check_chunk_builds(llm._runner, checked)
        llm.generate(input_ids=prompts, sampling_params=params)
    assert checked["steps"] > 5 and checked["mixed"] > 0 and checked["long"] > 0
