"""Scheduler tests with a fake runner that simulates the paged KV cache slot by slot.

The fake "model" predicts next = hash(all tokens so far) % VOCAB, but it can only see
the tokens whose K/V it finds in the cache slots the page table points at: if the
scheduler hands out wrong pages, frees pages in use or forgets a prefix, the outputs
diverge from the independently computed expectation.
"""

from __future__ import annotations

import random

import pytest

from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.request import Request
from pipeline_infer.sampling_params import SamplingParams
from pipeline_infer.scheduler import Scheduler

VOCAB = 1000
EOS = 0


def next_token(seq: list[int]) -> int:
    h = 1469598103934665603
    for t in seq:
        h = ((h ^ t) * 1099511628211) % (1 << 64)
    tok = h % VOCAB
    return tok if tok != EOS else 1


def expected_output(prompt: list[int], max_new: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(max_new):
        t = next_token(seq)
        seq.append(t)
        out.append(t)
    return out


class FakeRunner:
    """Keeps a slot -> token map (the 'KV cache') and checks every read against the truth."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.slots: dict[int, int] = {}
        self.steps = 0
        self.max_batch_tokens = 0

    def run(self, batch) -> list[int | None]:
        self.steps += 1
        self.max_batch_tokens = max(self.max_batch_tokens, sum(c.length for c in batch.chunks if not c.is_decode))
        out: list[int | None] = []
        for c in batch.chunks:
            req, ps = c.req, self.page_size
            assert len(req.pages) * ps >= c.start + c.length, "request lacks pages for its tokens"
            assert len(set(req.pages)) == len(req.pages), "a page appears twice in one request"
            for pos in range(c.start, c.start + c.length):
                self.slots[req.pages[pos // ps] * ps + pos % ps] = req.token_ids[pos]
            if not c.samples:
                out.append(None)
                continue
            seen = [self.slots.get(req.pages[p // ps] * ps + p % ps) for p in range(req.num_tokens)]
            assert seen == req.token_ids, f"{req.rid}: the cache does not hold the sequence"
            out.append(next_token(seen))
        return out


def make_requests(n: int, rng: random.Random, max_new: int = 12) -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        reqs.append(Request(rid=f"r{i}", prompt_ids=prompt, params=params, eos_token_ids=frozenset({EOS})))
    return reqs


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        batch = sched.schedule()
        if batch is None:
            assert not sched.has_work, "work left but nothing schedulable: deadlock"
            return
        sched.commit(batch, runner.run(batch))
    raise AssertionError("did not finish")


@pytest.mark.parametrize("page_size", [1, 16])
def test_all_finish_with_expected_outputs(page_size):
    rng = random.Random(page_size)
    alloc = PageAllocator(1 + 4096 // page_size)
    sched = Scheduler(alloc, page_size, max_running_requests=8, chunked_prefill_size=32)
    runner = FakeRunner(page_size)
    reqs = make_requests(20, rng)
    for r in reqs:
        sched.add(r)
    run_all(sched, runner)
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 12), r.rid
        assert r.finish_reason.type == "length"
    assert alloc.num_free == alloc.capacity, "pages leaked"
    assert runner.max_batch_tokens <= 32, "prefill exceeded chunked_prefill_size"


@pytest.mark.parametrize("page_size", [1, 4])
def test_tiny_pool_retracts_and_still_matches(page_size):
    rng = random.Random(7)
    # Room for roughly two sequences: the scheduler must make requests wait and retract.
    alloc = PageAllocator(1 + 120 // page_size)
    sched = Scheduler(alloc, page_size, max_running_requests=16, chunked_prefill_size=64, conservativeness=0.05)
    runner = FakeRunner(page_size)
    reqs = make_requests(12, rng, max_new=20)
    for r in reqs:
        sched.add(r)
    run_all(sched, runner)
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 20), r.rid
    assert sched.num_retractions > 0, "the pool was meant to force a retraction"
    assert alloc.num_free == alloc.capacity


def test_max_running_requests_is_respected():
    rng = random.Random(3)
    alloc = PageAllocator(5000)
    sched = Scheduler(alloc, 1, max_running_requests=3, chunked_prefill_size=1000)
    runner = FakeRunner(1)
    for r in make_requests(10, rng):
        sched.add(r)
    while sched.has_work:
        batch = sched.schedule()
        assert len(sched.running) <= 3
        sched.commit(batch, runner.run(batch))


def test_abort_waiting_and_running_frees_pages():
    rng = random.Random(5)
    alloc = PageAllocator(1000)
    sched = Scheduler(alloc, 1, max_running_requests=1, chunked_prefill_size=1000)
    runner = FakeRunner(1)
    a, b = make_requests(2, rng, max_new=50)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.commit(batch, runner.run(batch))
    assert a in sched.running and b in sched.waiting
    assert sched.abort("r1") is b and b.finish_reason.type == "abort"
    assert sched.abort("r0") is a and a.finish_reason.type == "abort"
    assert sched.abort("r0") is None
    assert not sched.has_work and alloc.num_free == alloc.capacity


def test_eos_and_stop_token_ids_finish():
    alloc = PageAllocator(100)
    sched = Scheduler(alloc, 1, max_running_requests=4, chunked_prefill_size=100)
    prompt = [5, 6, 7]
    first = next_token(prompt)
    r1 = Request("a", prompt, SamplingParams(max_new_tokens=10, temperature=0), eos_token_ids=frozenset({first}))
    r2 = Request("b", prompt, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[first]))
    r3 = Request(
        "c", prompt, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True), eos_token_ids=frozenset({first})
    )
    for r in (r1, r2, r3):
        sched.add(r)
    run_all(sched, FakeRunner(1))
    assert r1.output_ids == [first] and r1.finish_reason.type == "stop" and r1.finish_reason.matched == first
    assert r2.output_ids == [first] and r2.finish_reason.matched == first
    assert len(r3.output_ids) == 3 and r3.finish_reason.type == "length"


def test_context_length_caps_generation():
    alloc = PageAllocator(100)
    sched = Scheduler(alloc, 1, max_running_requests=4, chunked_prefill_size=100)
    r = Request("a", [1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0), context_length=10)
    sched.add(r)
    run_all(sched, FakeRunner(1))
    assert r.num_tokens == 10 and len(r.output_ids) == 7 and r.finish_reason.type == "length"


def test_long_prompt_is_chunked():
    alloc = PageAllocator(1000)
    sched = Scheduler(alloc, 4, max_running_requests=4, chunked_prefill_size=16)
    runner = FakeRunner(4)
    r = Request("a", list(range(1, 101)), SamplingParams(max_new_tokens=4, temperature=0))
    sched.add(r)
    run_all(sched, runner)
    assert r.output_ids == expected_output(list(range(1, 101)), 4)
    assert runner.steps >= 100 // 16 + 3
