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
from pipeline_infer.request import PLACEHOLDER, Request
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
            # The scheduler has appended a placeholder for the token this chunk samples.
            end = c.start + c.length
            assert req.token_ids[end:] == [PLACEHOLDER], f"{req.rid}: a sampling chunk must reach the end"
            seen = [self.slots.get(req.pages[p // ps] * ps + p % ps) for p in range(end)]
            assert seen == req.token_ids[:end], f"{req.rid}: the cache does not hold the sequence"
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


# --- prefix sharing, policies and preemption with the radix cache ---------------------------------

from pipeline_infer.cache.radix import RadixCache  # noqa: E402
from pipeline_infer.request import RequestStatus  # noqa: E402


def check_ownership(sched: Scheduler) -> None:
    """Every page is free, owned by the tree, or owned by exactly one running request; each
    request's shared pages are exactly the path of the node it locks; lock counts add up."""
    alloc, cache = sched.allocator, sched.prefix_cache
    tree: list[int] = []
    if cache is not None:
        tree = [p for n in cache._iter_nodes() for p in n.pages]
    tree_set = set(tree)
    assert len(tree_set) == len(tree), "a page is held by two tree nodes"
    owned: list[int] = []
    expected_ref: dict[int, int] = {}
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        shared = r.pages[: r.num_shared_pages]
        if cache is None:
            assert r.num_shared_pages == 0
        else:
            node, path = r.prefix_node, []
            assert node is not None and not node.dead
            while node is not cache.root:
                path = list(node.pages) + path
                expected_ref[id(node)] = expected_ref.get(id(node), 0) + 1
                node = node.parent
            assert path == shared, f"{r.rid}: shared pages are not its locked node's path"
        owned.extend(r.pages[r.num_shared_pages :])
        assert len(r.pages) * sched.page_size >= r.num_computed
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING
        assert r.pages == [] and r.num_shared_pages == 0 and r.prefix_node is None
    assert len(set(owned)) == len(owned), "a page is owned by two requests"
    assert not tree_set & set(owned), "a page is owned by a request and by the tree"
    assert not any(alloc.is_free(p) for p in tree + owned), "a page in use is also free"
    assert alloc.num_free + len(tree) + len(owned) == alloc.capacity, "pages leaked"
    if cache is not None:
        for n in cache._iter_nodes():
            assert n.ref == expected_ref.get(id(n), 0), "lock counts do not match the running requests"
        ids = [r.rid for r in list(sched.waiting) + sched.running]
        assert len(ids) == len(set(ids)), "a request is queued twice"


def run_checked(sched: Scheduler, runner: FakeRunner, max_steps: int = 20_000, on_step=None) -> int:
    """run_all, checking page ownership after every step; returns the number of steps."""
    for step in range(max_steps):
        batch = sched.schedule()
        check_ownership(sched)
        if batch is None:
            assert not sched.has_work, "work left but nothing schedulable: deadlock"
            return step
        sched.commit(batch, runner.run(batch))
        check_ownership(sched)
        if on_step is not None:
            on_step(step, batch)
    raise AssertionError("did not finish")


def radix_sched(page_size: int, num_pages: int, **kw) -> tuple[PageAllocator, RadixCache, Scheduler]:
    alloc = PageAllocator(num_pages + 1)
    cache = RadixCache(alloc, page_size)
    return alloc, cache, Scheduler(alloc, page_size, prefix_cache=cache, **kw)


def req(rid: str, prompt: list[int], max_new: int = 8) -> Request:
    return Request(rid=rid, prompt_ids=prompt, params=SamplingParams(max_new_tokens=max_new, temperature=0.0))


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_prompt_is_shared_as_soon_as_its_prefill_lands(page_size):
    """B arrives while A is still decoding: A's prompt pages are already in the tree for it."""
    rng = random.Random(1)
    alloc, cache, sched = radix_sched(page_size, 1024, max_running_requests=8, chunked_prefill_size=256)
    runner = FakeRunner(page_size)
    prefix = rand_ids(rng, 50)
    a = req("a", prefix + rand_ids(rng, 7), max_new=30)
    sched.add(a)
    sched.commit(b := sched.schedule(), runner.run(b))  # A's whole prompt in one chunk
    full = a.prompt_len // page_size
    assert a.num_shared_pages == full and cache.total_pages == full and cache.locked_pages == full
    check_ownership(sched)
    late = req("b", prefix + rand_ids(rng, 9), max_new=5)
    sched.add(late)
    sched.commit(b := sched.schedule(), runner.run(b))
    assert late.status is RequestStatus.RUNNING and a.status is RequestStatus.RUNNING
    assert late.cached_tokens == 50 // page_size * page_size
    run_checked(sched, runner)
    assert a.output_ids == expected_output(a.prompt_ids, 30)
    assert late.output_ids == expected_output(late.prompt_ids, 5)
    assert cache.locked_pages == 0 and alloc.num_free + cache.total_pages == alloc.capacity


def test_chunked_prefill_shares_each_chunk():
    """A long prompt prefilled in chunks hands each chunk's whole pages to the tree."""
    alloc, cache, sched = radix_sched(4, 256, max_running_requests=4, chunked_prefill_size=16)
    runner = FakeRunner(4)
    a = req("a", list(range(1, 61)), max_new=3)
    sched.add(a)
    seen = []
    run_checked(sched, runner, on_step=lambda step, b: seen.append((a.num_computed, cache.total_pages)))
    # After the chunk ending at token 16k, the tree holds 4k pages.
    assert seen[:3] == [(16, 4), (32, 8), (48, 12)]
    assert a.output_ids == expected_output(a.prompt_ids, 3)


@pytest.mark.parametrize("page_size", [1, 4])
def test_concurrent_duplicate_prefill_frees_duplicates_once(page_size):
    """Two requests prefill the same short prefix in one step (too short to wait for): the
    second to commit finds it in the tree, switches to the tree's pages and frees its own.
    Only its pages_version moves (the page tables rewrite a row when it does): the first
    request's pages, taken by the tree as they were, stay as they were."""
    rng = random.Random(2)
    alloc, cache, sched = radix_sched(page_size, 512, max_running_requests=8, chunked_prefill_size=512)
    runner = FakeRunner(page_size)
    x = rand_ids(rng, 16)
    a, b = req("a", x + rand_ids(rng, 40), 6), req("b", x + rand_ids(rng, 40), 6)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [c.req.rid for c in batch.chunks] == ["a", "b"]  # neither waited for the other
    b_own = list(b.pages[: 16 // page_size])
    a_pages, versions = list(a.pages), (a.pages_version, b.pages_version)
    sched.commit(batch, runner.run(batch))
    check_ownership(sched)
    assert b.pages[: 16 // page_size] == a.pages[: 16 // page_size]  # b reads the tree's copy now
    assert all(alloc.is_free(p) for p in b_own)
    assert a.num_shared_pages == a.prompt_len // page_size and a.pages == a_pages
    assert a.pages_version == versions[0] and b.pages_version > versions[1]
    run_checked(sched, runner)
    assert a.output_ids == expected_output(a.prompt_ids, 6)
    assert b.output_ids == expected_output(b.prompt_ids, 6)


def _groups(rng: random.Random, num_groups: int, per_group: int, prefix_len: int, max_new: int = 6):
    reqs = []
    for g in range(num_groups):
        prefix = rand_ids(rng, prefix_len)
        for i in range(per_group):
            reqs.append(req(f"g{g}-{i}", prefix + rand_ids(rng, rng.randint(3, 12)), max_new))
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "batch"])
def test_shared_prefix_groups_hit_cache_under_every_policy(policy):
    """One member per group prefills the group prefix; the others wait for it and reuse it."""
    rng = random.Random(3)
    alloc, cache, sched = radix_sched(
        4, 4096, max_running_requests=64, chunked_prefill_size=4096, schedule_policy=policy
    )
    runner = FakeRunner(4)
    reqs = _groups(rng, 4, 6, 48)
    for r in reqs:
        sched.add(r)
    first_step = []
    run_checked(sched, runner, on_step=lambda s, b: s == 0 and first_step.extend(c.req.rid for c in b.chunks))
    assert sorted(rid.split("-")[0] for rid in first_step) == ["g0", "g1", "g2", "g3"]
    for g in range(4):
        members = [r for r in reqs if r.rid.startswith(f"g{g}-")]
        assert sorted(r.cached_tokens for r in members) == [0] + [48] * 5
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 6), r.rid
    assert alloc.num_free + cache.total_pages == alloc.capacity


def test_n_samples_prefill_the_prompt_once():
    """The samples of one prompt (n > 1 expands to requests with the same prompt) share it."""
    alloc, cache, sched = radix_sched(1, 1024, max_running_requests=16, chunked_prefill_size=1024)
    runner = FakeRunner(1)
    prompt = list(range(5, 25))  # short: below _HOLD_MIN_TOKENS, still shared in full
    reqs = [req(f"s{j}", prompt, 4) for j in range(4)]
    for r in reqs:
        sched.add(r)
    prefilled = []
    run_checked(sched, runner, on_step=lambda s, b: prefilled.extend(c.length for c in b.chunks if c.prefill))
    assert [r.cached_tokens for r in reqs] == [0, 19, 19, 19]
    assert sum(prefilled) == 20 + 3 * 1  # one full prefill, then one token each
    assert all(r.output_ids == expected_output(prompt, 4) for r in reqs)


def test_fcfs_admits_in_arrival_order_and_blocks_at_the_head():
    rng = random.Random(4)
    alloc, cache, sched = radix_sched(1, 100, max_running_requests=8, chunked_prefill_size=1000)
    runner = FakeRunner(1)
    big = req("big", rand_ids(rng, 70), 5)
    small = req("small", rand_ids(rng, 10), 5)
    hog = req("hog", rand_ids(rng, 40), 20)
    for r in (hog, big, small):
        sched.add(r)
    batch = sched.schedule()
    # hog fits; big does not fit next to it, and small must not overtake big.
    assert [c.req.rid for c in batch.chunks] == ["hog"]
    sched.commit(batch, runner.run(batch))  # a scheduled step has moved its requests on: run it
    run_checked(sched, runner)
    assert big.output_ids == expected_output(big.prompt_ids, 5)


def test_batch_skips_what_does_not_fit_for_what_does():
    rng = random.Random(4)
    alloc, cache, sched = radix_sched(
        1, 100, max_running_requests=8, chunked_prefill_size=1000, schedule_policy="batch"
    )
    runner = FakeRunner(1)
    hog, big, small = req("hog", rand_ids(rng, 40), 20), req("big", rand_ids(rng, 70), 5), req("small", rand_ids(rng, 10), 5)
    for r in (hog, big, small):
        sched.add(r)
    batch = sched.schedule()
    assert [c.req.rid for c in batch.chunks] == ["hog", "small"]
    sched.commit(batch, runner.run(batch))
    run_checked(sched, runner)
    for r in (hog, big, small):
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens)


def test_lpm_prefers_the_longest_cached_prefix():
    rng = random.Random(5)
    alloc, cache, sched = radix_sched(
        1, 2000, max_running_requests=1, chunked_prefill_size=2000, schedule_policy="lpm"
    )
    runner = FakeRunner(1)
    p1, p2 = rand_ids(rng, 30), rand_ids(rng, 60)
    for i, p in enumerate((p1, p2)):
        sched.add(req(f"warm{i}", p + [7], 1))
    run_checked(sched, runner)
    # Arrival order: none cached, p1 cached (30), p2 cached (60). max_running_requests=1
    # makes the admission order observable.
    reqs = [req("cold", rand_ids(rng, 20), 2), req("short", p1 + [9, 9], 2), req("long", p2 + [9, 9], 2)]
    for r in reqs:
        sched.add(r)
    order = []
    run_checked(sched, runner, on_step=lambda s, b: order.extend(c.req.rid for c in b.chunks if c.start == c.req.cached_tokens and c.prefill))
    assert order == ["long", "short", "cold"]
    assert [r.cached_tokens for r in reqs] == [0, 30, 60]


def test_batch_groups_cached_members_together():
    """With the group prefixes cached and room for one request at a time, batch runs each
    group's members back to back (fcfs would alternate between groups as they arrived)."""
    rng = random.Random(6)
    for policy in ("batch", "fcfs"):
        alloc, cache, sched = radix_sched(
            1, 4000, max_running_requests=1, chunked_prefill_size=4000, schedule_policy=policy
        )
        runner = FakeRunner(1)
        prefixes = [rand_ids(rng, 80) for _ in range(3)]
        for g, p in enumerate(prefixes):
            sched.add(req(f"warm{g}", p + [1], 1))
        run_checked(sched, runner)
        reqs = [req(f"g{i % 3}-{i}", prefixes[i % 3] + rand_ids(rng, 5), 2) for i in range(9)]
        for r in reqs:
            sched.add(r)
        order = []
        run_checked(sched, runner, on_step=lambda s, b: order.extend(c.req.rid[:2] for c in b.chunks if c.prefill))
        runs = sum(1 for i in range(len(order)) if i == 0 or order[i] != order[i - 1])
        assert runs == (3 if policy == "batch" else 9), (policy, order)


@pytest.mark.parametrize("policy", ["batch", "fcfs"])
def test_batch_starts_uncached_groups_early_within_a_share_of_the_budget(policy):
    """Two groups with cached prefixes and many members, then two groups whose prefix nobody
    computed yet, arriving last. batch admits each uncached group's first member whole ahead of
    the cached groups' members while it fits in a quarter of the step's budget (one a step
    here), so their siblings follow as soon as the prefixes land; fcfs keeps arrival order."""
    rng = random.Random(8)
    budget = 68 + 27 * 8  # one uncached prompt and 27 cached groups' suffixes fill a step exactly
    alloc, cache, sched = radix_sched(
        4, 4000, max_running_requests=128, chunked_prefill_size=budget, schedule_policy=policy
    )
    runner = FakeRunner(4)
    cached = [rand_ids(rng, 64) for _ in range(2)]  # _GROUP_KEY_TOKENS: groups share 64 tokens
    for g, p in enumerate(cached):
        sched.add(req(f"warm{g}", p + [1], 1))
    run_checked(sched, runner)
    fresh = [rand_ids(rng, 64) for _ in range(2)]
    reqs = [req(f"c{i % 2}-{i}", cached[i % 2] + rand_ids(rng, 8), 3) for i in range(40)]
    reqs += [req(f"u{g}-{i}", fresh[g] + rand_ids(rng, 4), 3) for g in range(2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    steps: list[dict[str, int]] = []  # per step: rid -> prefill tokens
    run_checked(sched, runner, on_step=lambda s, b: steps.append({c.req.rid: c.length for c in b.chunks if c.prefill}))
    if policy == "batch":
        assert {k: v for k, v in steps[0].items() if k[0] == "u"} == {"u0-0": 68}, steps[0]
        assert sum(1 for k in steps[0] if k[0] == "c") == 27
        # Then u0's siblings reuse its prefix; u1's first member (over the share left by the
        # step's decodes) comes in the order's turn, in the same step.
        assert steps[1]["u0-1"] == steps[1]["u0-2"] == 4 and steps[1]["u1-0"] == 68, steps[1]
    else:
        assert not any(k[0] == "u" and v == 68 for k, v in steps[0].items()), steps[0]
    for g in range(2):
        members = sorted(r.cached_tokens for r in reqs if r.rid.startswith(f"u{g}-"))
        assert members == [0, 64, 64], (policy, g, members)
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 3), r.rid
    assert alloc.num_free + cache.total_pages == alloc.capacity


def test_uncached_groups_first_members_never_pass_single_submissions():
    """Under auto a single submission still goes first: an uncached group's first member (a batch
    job) that would fit in the early share waits behind it."""
    rng = random.Random(9)
    alloc, cache, sched = radix_sched(4, 4000, max_running_requests=64, chunked_prefill_size=272, schedule_policy="auto")
    runner = FakeRunner(4)
    prefix = rand_ids(rng, 64)
    group = [req(f"u-{i}", prefix + rand_ids(rng, 4), 2) for i in range(3)]
    for r in group:
        r.batch_job = True
    single = req("single", rand_ids(rng, 220), 2)
    for r in [single] + group:
        sched.add(r)
    steps: list[dict[str, int]] = []
    run_checked(sched, runner, on_step=lambda s, b: steps.append({c.req.rid: c.length for c in b.chunks if c.prefill}))
    assert steps[0]["single"] == 220 and steps[0].get("u-0", 0) < 68, steps[0]
    for r in [single] + group:
        assert r.output_ids == expected_output(r.prompt_ids, 2), r.rid


def test_batch_packs_whole_prompts_before_chunking():
    rng = random.Random(7)
    alloc, cache, sched = radix_sched(1, 4000, max_running_requests=8, chunked_prefill_size=100, schedule_policy="batch")
    runner = FakeRunner(1)
    reqs = [req("a", rand_ids(rng, 60)), req("b", rand_ids(rng, 60)), req("c", rand_ids(rng, 30))]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    # b would be chunked after a (40 of 60 tokens): c fits whole, then b gets the last 10.
    assert [(c.req.rid, c.length) for c in batch.chunks] == [("a", 60), ("c", 30), ("b", 10)]
    sched.commit(batch, runner.run(batch))
    run_checked(sched, runner)
    assert all(r.output_ids == expected_output(r.prompt_ids, 8) for r in reqs)


def test_auto_runs_batch_submissions_as_batch_jobs():
    """The default policy ("auto"): requests submitted together (batch_job) are grouped like
    under "batch"; the same requests submitted one by one keep arrival order like "fcfs"."""
    rng = random.Random(6)
    prefixes = [rand_ids(rng, 80) for _ in range(3)]
    suffixes = [rand_ids(rng, 5) for _ in range(9)]
    for batch_job, expected_runs in ((True, 3), (False, 9)):
        alloc, cache, sched = radix_sched(
            1, 4000, max_running_requests=1, chunked_prefill_size=4000, schedule_policy="auto"
        )
        runner = FakeRunner(1)
        for g, p in enumerate(prefixes):
            sched.add(req(f"warm{g}", p + [1], 1))
        run_checked(sched, runner)
        reqs = [req(f"g{i % 3}-{i}", prefixes[i % 3] + suffixes[i], 2) for i in range(9)]
        for r in reqs:
            r.batch_job = batch_job
            sched.add(r)
        order = []
        run_checked(sched, runner, on_step=lambda s, b: order.extend(c.req.rid[:2] for c in b.chunks if c.prefill))
        runs = sum(1 for i in range(len(order)) if i == 0 or order[i] != order[i - 1])
        assert runs == expected_runs, (batch_job, order)
        assert all(r.output_ids == expected_output(r.prompt_ids, 2) for r in reqs)


def test_auto_tries_single_submissions_first_and_packs_batch_jobs():
    rng = random.Random(4)
    # Batch jobs hog, big, small, then a single submission: it goes first; big does not fit
    # and, being a batch job, is skipped for small (fcfs would admit only hog and block).
    alloc, cache, sched = radix_sched(1, 100, max_running_requests=8, chunked_prefill_size=1000, schedule_policy="auto")
    hog, big, small = req("hog", rand_ids(rng, 40), 20), req("big", rand_ids(rng, 70), 5), req("small", rand_ids(rng, 10), 5)
    solo = req("solo", rand_ids(rng, 10), 5)
    for r in (hog, big, small):
        r.batch_job = True
        sched.add(r)
    sched.add(solo)
    batch, runner = sched.schedule(), FakeRunner(1)
    assert [c.req.rid for c in batch.chunks] == ["solo", "hog", "small"]
    sched.commit(batch, runner.run(batch))
    run_checked(sched, runner)
    for r in (hog, big, small, solo):
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens)
    # Single submissions are head-of-line among themselves: one that does not fit blocks the
    # queue behind it (batch jobs included), so a long prompt is never starved.
    alloc, cache, sched = radix_sched(1, 100, max_running_requests=8, chunked_prefill_size=1000, schedule_policy="auto")
    hog, big, small = req("hog", rand_ids(rng, 40), 20), req("big", rand_ids(rng, 70), 5), req("small", rand_ids(rng, 10), 5)
    small.batch_job = True
    for r in (hog, big, small):
        sched.add(r)
    batch, runner = sched.schedule(), FakeRunner(1)
    assert [c.req.rid for c in batch.chunks] == ["hog"]
    sched.commit(batch, runner.run(batch))
    run_checked(sched, runner)
    assert big.output_ids == expected_output(big.prompt_ids, 5)


def test_decode_reserve_keeps_retraction_rare_and_adapts():
    """Admission sets aside a decode reserve (new_token_ratio x tokens still to generate): with
    the default reserve a tight pool retracts far less than with almost none; the ratio jumps at
    each retraction and decays back towards its floor while memory suffices."""
    retractions = {}
    for conservativeness in (1.0, 0.01):
        rng = random.Random(12)
        alloc, cache, sched = radix_sched(
            1, 300, max_running_requests=16, chunked_prefill_size=1000, conservativeness=conservativeness
        )
        reqs = [req(f"r{i}", rand_ids(rng, rng.randint(5, 30)), rng.randint(20, 60)) for i in range(24)]
        for r in reqs:
            sched.add(r)
        ratios = []
        run_checked(sched, FakeRunner(1), on_step=lambda s, b: ratios.append(sched.new_token_ratio))
        assert all(r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens) for r in reqs)
        retractions[conservativeness] = sched.num_retractions
        if conservativeness == 0.01:
            jumps = sum(1 for a, b in zip(ratios, ratios[1:]) if b > a)
            assert jumps > 0 and jumps <= sched.num_retractions  # rises only when retracting
            assert ratios[-1] < max(ratios)  # and decays afterwards
    assert retractions[0.01] > 0, "the pool was meant to be tight"
    assert retractions[1.0] * 4 <= retractions[0.01], retractions


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "batch"])
def test_retraction_newest_first_requeued_in_front(policy):
    """Decode growth overruns the pool: the newest request is retracted, goes back to the front
    of the queue ahead of never-admitted ones, resumes from the tree, and outputs are exact."""
    rng = random.Random(8)
    alloc, cache, sched = radix_sched(
        1, 90, max_running_requests=8, chunked_prefill_size=1000, schedule_policy=policy, conservativeness=0.01
    )
    runner = FakeRunner(1)
    reqs = [req(f"r{i}", rand_ids(rng, 20), 20) for i in range(3)]
    for r in reqs:
        sched.add(r)
    late = req("late", rand_ids(rng, 45), 5)  # does not fit until one of the others is done
    events = []
    ratio = []
    admitted = []

    def on_step(step, batch):
        if step == 0:
            sched.add(late)
        if sched.num_retractions and not events:
            events.append([r.rid for r in sched.waiting])
            ratio.append(sched.new_token_ratio)
        admitted.extend(c.req.rid for c in batch.chunks if c.prefill and c.start == 0 or c.req.num_retractions and c.prefill)

    run_checked(sched, runner, on_step=on_step)
    assert sched.num_retractions > 0
    assert events[0] == ["r2", "late"]  # the newest running request retracted, put first
    assert admitted.index("r2", 3) < admitted.index("late")  # and resumed first
    assert ratio[0] > sched.min_new_token_ratio  # the reserve ratio jumped
    assert reqs[2].num_retractions > 0 and reqs[0].num_retractions == 0
    assert reqs[2].cached_tokens == 0  # reported at first admission, not at resumption
    for r in reqs + [late]:
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens), r.rid
    assert alloc.num_free + cache.total_pages == alloc.capacity


def test_retracted_request_resumes_from_its_cached_kv():
    rng = random.Random(9)
    alloc, cache, sched = radix_sched(1, 90, max_running_requests=8, chunked_prefill_size=1000, conservativeness=0.01)
    runner = FakeRunner(1)
    a, b = req("a", rand_ids(rng, 30), 20), req("b", rand_ids(rng, 30), 20)
    sched.add(a)
    sched.add(b)
    resumed_at = []

    def on_step(step, batch):
        for c in batch.chunks:
            if c.req is b and b.num_retractions and c.prefill and not resumed_at:
                resumed_at.append(c.start)

    run_checked(sched, runner, on_step=on_step)
    assert b.num_retractions == 1 and a.num_retractions == 0
    # b resumed from the tree: its prompt (and maybe more) was not recomputed.
    assert resumed_at and resumed_at[0] >= 30
    assert a.output_ids == expected_output(a.prompt_ids, 20)
    assert b.output_ids == expected_output(b.prompt_ids, 20)


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "batch", "auto"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_random_workload_keeps_page_ownership(policy, page_size):
    """Shared prefixes, n > 1 siblings, a tight pool (eviction and retraction) and aborts, with
    page ownership checked after every step and every output checked at the end."""
    rng = random.Random(f"{policy}-{page_size}")  # str seeds are stable across processes
    alloc, cache, sched = radix_sched(
        page_size,
        240 // page_size,
        max_running_requests=6,
        chunked_prefill_size=rng.choice([16, 48]),
        schedule_policy=policy,
        conservativeness=0.05,
    )
    runner = FakeRunner(page_size)
    bases = [rand_ids(rng, 48) for _ in range(3)]
    reqs = []
    for i in range(30):
        prompt = bases[rng.randrange(3)][: rng.randint(0, 48)] + rand_ids(rng, rng.randint(1, 12))
        batch_job = rng.random() < 0.5  # "auto" mixes single submissions and batch jobs
        for j in range(rng.choice([1, 1, 1, 3])):  # sometimes n = 3 siblings of one prompt
            reqs.append(req(f"r{i}-{j}", prompt, rng.randint(1, 24)))
            reqs[-1].batch_job = batch_job
    aborted = set()
    pending = list(reqs)

    def on_step(step, batch):
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop(0))
        if rng.random() < 0.03:
            live = [r for r in list(sched.waiting) + sched.running]
            if live:
                victim = rng.choice(live)
                assert sched.abort(victim.rid) is victim
                aborted.add(victim.rid)

    sched.add(pending.pop(0))
    while True:
        run_checked(sched, runner, on_step=on_step)
        if not pending:
            break
        sched.add(pending.pop(0))
    for r in reqs:
        assert r.is_finished
        if r.rid in aborted:
            assert r.finish_reason.type == "abort"
            assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens)[: len(r.output_ids)]
        else:
            assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens), r.rid
    assert sum(r.cached_tokens for r in reqs) > 0
    assert cache.locked_pages == 0 and alloc.num_free + cache.total_pages == alloc.capacity
    cache.reset()
    assert alloc.num_free == alloc.capacity


def test_inflight_trie_against_brute_force():
    """The in-flight index (a compressed trie with counts, maintained incrementally) answers
    `shared` exactly like a scan over the sequences it holds, through adds, splits and removes."""
    from pipeline_infer.scheduler import _InFlight

    rng = random.Random(10)
    index = _InFlight()
    bases = [[rng.randrange(4) for _ in range(30)] for _ in range(3)]
    live: list[Request] = []

    def brute(ids):
        best = 0
        for r in live:
            k = 0
            while k < min(len(ids), r.num_tokens) and ids[k] == r.token_ids[k]:
                k += 1
            best = max(best, k)
        return best

    for step in range(600):
        if live and rng.random() < 0.4:
            index.remove(live.pop(rng.randrange(len(live))))
        else:
            ids = rng.choice(bases)[: rng.randint(0, 30)] + [rng.randrange(4) for _ in range(rng.randint(0, 6))]
            r = req(f"x{step}", ids or [1])
            index.add(r)
            live.append(r)
        probe = rng.choice(bases)[: rng.randint(0, 30)] + [rng.randrange(4) for _ in range(rng.randint(0, 4))]
        assert index.shared(probe) == brute(probe)
        cut = rng.randint(0, len(probe) + 2)
        assert index.shared(probe, cut) == brute(probe[:cut])
        n = rng.randint(0, len(probe))
        assert index.covers(probe, n) == (brute(probe[:n]) >= n)
        assert index.root.count == len(live) == len(index.members)
    for r in live:
        index.remove(r)
    assert index.root.children == {} and index.root.count == 0


def test_reserved_pages_matches_future_pages():
    """The inlined admission reserve equals the per-request definition it replaces."""
    from pipeline_infer.cache.kv_pool import PageAllocator
    from pipeline_infer.request import Request
    from pipeline_infer.sampling_params import SamplingParams

    rng = random.Random(2)
    sched = Scheduler(PageAllocator(100_000), 16, max_running_requests=64, chunked_prefill_size=512)
    for i in range(64):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 300))]
        req = Request(f"r{i}", prompt, SamplingParams(max_new_tokens=rng.choice([0, 1, 50, 5000, 100_000])),
                      context_length=rng.choice([1 << 30, len(prompt) + rng.randint(0, 40)]))
        req.output_ids = [1] * rng.randint(0, 60)
        req.token_ids = list(prompt) + req.output_ids
        req.pages = list(range(rng.randint(0, 40)))
        sched.running.append(req)
    for ratio in (0.0, 0.15, 0.37, 1.0):
        sched.new_token_ratio = ratio
        assert sched._reserved_pages() == sum(sched._future_pages(r) for r in sched.running)


def _varied_requests(n: int, rng: random.Random) -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 30))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 30), temperature=0.0, ignore_eos=True)
        reqs.append(Request(rid=f"v{i}", prompt_ids=prompt, params=params, eos_token_ids=frozenset({EOS})))
    return reqs


@pytest.mark.parametrize("mixed", [True, False])
def test_admission_batch_groups_admissions_and_bounds_the_hold(mixed):
    # Requests finish at different steps; with admission_batch=4 a freed slot waits for three
    # more (or for 4 held steps) before anyone is admitted, so admissions come in groups.
    rng = random.Random(11)
    alloc = PageAllocator(1 + 4096)
    sched = Scheduler(alloc, 1, max_running_requests=8, chunked_prefill_size=1000, mixed_chunk=mixed, admission_batch=4)
    runner = FakeRunner(1)
    reqs = _varied_requests(60, rng)
    for r in reqs:
        sched.add(r)
    admitted_per_step, held, max_held = [], 0, 0
    while sched.has_work:
        before = len(sched.waiting)
        free_before = sched.max_running_requests - len(sched.running)
        decoding = bool(sched.running)
        batch = sched.schedule()
        n = before - len(sched.waiting)
        admitted_per_step.append(n)
        if decoding and free_before > 0 and before > free_before:
            # The hold: while requests decode and more wait than fit, admit in groups.
            if n == 0:
                held += 1
                max_held = max(max_held, held)
            else:
                assert free_before >= 4 or held == 4, (free_before, held)
                held = 0
        sched.commit(batch, runner.run(batch))
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens), r.rid
    assert max_held == 4, "the hold is bounded by admission_batch steps and was reached"
    assert alloc.num_free == alloc.capacity
    # Fewer admission steps than requests (the default admits one per freed slot).
    assert sum(1 for n in admitted_per_step if n) < len(reqs) // 3


def test_admission_batch_admits_at_once_when_idle_or_when_the_rest_fits():
    rng = random.Random(5)
    alloc = PageAllocator(1 + 4096)
    sched = Scheduler(alloc, 1, max_running_requests=8, chunked_prefill_size=1000, admission_batch=8)
    runner = FakeRunner(1)
    first = _varied_requests(8, rng)
    for r in first:
        sched.add(r)
    batch = sched.schedule()  # nothing runs yet: no hold
    assert len(sched.running) == 8
    sched.commit(batch, runner.run(batch))
    # One late request while 8 run and none is free: it waits for a slot, then starts at once
    # (it is the only one waiting, so holding would gain nothing).
    late = _varied_requests(1, random.Random(99))[0]
    sched.add(late)
    while late.status.name == "WAITING":
        free = sched.max_running_requests - len(sched.running)
        batch = sched.schedule()
        if free > 0:
            assert late in sched.running, "a lone waiting request must not be held"
        sched.commit(batch, runner.run(batch))
    run_all(sched, runner)
    assert late.output_ids == expected_output(late.prompt_ids, late.params.max_new_tokens)


def test_admission_batch_must_be_positive():
    with pytest.raises(ValueError, match="admission_batch"):
        Scheduler(PageAllocator(10), 1, max_running_requests=2, chunked_prefill_size=8, admission_batch=0)


def _decode_page_trace(page_size: int, radix: bool, one_by_one: bool) -> dict:
    """A tight pool's whole run: each step's chunks and pages, each request's tokens, retractions,
    prefix-cache evictions (calls and pages), and the steps whose decodes got their pages in
    one allocation."""
    rng = random.Random(f"one-by-one-{page_size}")
    kw = dict(max_running_requests=8, chunked_prefill_size=32, conservativeness=0.05)
    if radix:
        _, cache, sched = radix_sched(page_size, 120 // page_size, **kw)
    else:
        cache, sched = None, Scheduler(PageAllocator(1 + 120 // page_size), page_size, **kw)
    out = {"fast": 0, "evict_calls": 0}
    if cache is not None:
        evict = cache.evict

        def counted_evict(n):
            out["evict_calls"] += 1
            return evict(n)

        cache.evict = counted_evict
    if one_by_one:
        sched._ensure_decode_pages = lambda d, steps=1: (
            sched._decode_pages_one_by_one(sorted(d, key=lambda r: r.queue_seq)), 1
        )
    else:
        general = sched._decode_pages_one_by_one

        def counted(d):
            out["fast"] -= 1  # the general path ran: not a fast step
            return general(d)

        sched._decode_pages_one_by_one = counted
    base = rand_ids(rng, 24)
    reqs = [req(f"r{i}", base[: rng.randint(0, 24)] + rand_ids(rng, rng.randint(1, 16)), rng.randint(4, 30))
            for i in range(24)]
    for r in reqs:
        sched.add(r)
    steps: list = []
    while sched.has_work:
        batch = sched.schedule()
        assert batch is not None
        out["fast"] += any(c.is_decode for c in batch.chunks)
        steps.append([(c.req.rid, c.start, c.length, tuple(c.req.pages)) for c in batch.chunks])
        sched.commit(batch, [next_token(c.req.token_ids[: c.start + c.length]) if c.samples else None
                             for c in batch.chunks])
    out.update(steps=steps, retractions=sched.num_retractions, tokens={r.rid: list(r.token_ids) for r in reqs})
    return out


@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_pages_in_one_allocation_equal_one_by_one(page_size):
    """Without a prefix cache, _ensure_decode_pages hands out the pages of a step's decodes in one
    allocation when the free pages cover them: the same pages, to the same requests, as the
    page-by-page loop, step after step, through admissions and retractions (a tight pool takes
    both paths)."""
    fast = _decode_page_trace(page_size, radix=False, one_by_one=False)
    reference = _decode_page_trace(page_size, radix=False, one_by_one=True)
    assert fast["steps"] == reference["steps"]
    assert fast["retractions"] == reference["retractions"] > 0  # the tight pool did retract
    assert fast["fast"] > len(fast["steps"]) // 2  # and most steps took the one-allocation path


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_full_pool_evicts_once_for_all_decodes_of_a_step(page_size):
    """With the prefix cache holding the rest of the pool, a step's decodes that find too few
    free pages evict what they all need (and as much again) in one call, not one call per decode:
    far fewer evictions, and every request still gets exactly the tokens of the page-by-page run."""
    fast = _decode_page_trace(page_size, radix=True, one_by_one=False)
    reference = _decode_page_trace(page_size, radix=True, one_by_one=True)
    assert fast["tokens"] == reference["tokens"]
    assert reference["evict_calls"] > 80  # the pool was full for much of the run
    # (at page size 4 a quarter of the decodes need a page on a step, so fewer calls to save)
    assert fast["evict_calls"] <= reference["evict_calls"] // (4 if page_size == 1 else 1.5)
    assert fast["fast"] > len(fast["steps"]) // 2


@pytest.mark.parametrize("page_size", [1, 4])
def test_held_matches_the_shared_prefix_formula(page_size):
    """`_held` decides through `_InFlight.covers` whether the in-flight prefills cover a target
    length; it must answer exactly as the formula over `_InFlight.shared` it replaced."""
    from pipeline_infer.scheduler import _HOLD_MIN_TOKENS

    rng = random.Random(page_size)
    alloc, cache, sched = radix_sched(page_size, 4096, max_running_requests=8, chunked_prefill_size=64)
    bases = [rand_ids(rng, 160) for _ in range(3)]

    def reference(r: Request) -> bool:
        ps, limit = page_size, r.max_prefix_len
        shared = sched._inflight.shared(r.token_ids, limit) // ps * ps
        if shared == 0:
            return False
        cached = cache.match_len(r.token_ids[:limit])
        in_flight, own = shared - cached, limit // ps * ps - cached
        return in_flight > 0 and in_flight >= min(_HOLD_MIN_TOKENS, own)

    live: list[Request] = []
    answers: list[bool] = []
    for step in range(400):
        ids = rng.choice(bases)[: rng.randint(0, 160)] + rand_ids(rng, rng.randint(1, 40))
        if rng.random() < 0.2:  # some cached prefixes
            n = rng.randint(0, len(ids)) // page_size * page_size
            pages = alloc.alloc(n // page_size)
            if pages:
                alloc.free(cache.insert(ids[:n], pages).duplicate_pages)
        if live and rng.random() < 0.4:
            sched._inflight.remove(live.pop(rng.randrange(len(live))))
        else:
            r = req(f"f{step}", ids)
            sched._inflight.add(r)
            live.append(r)
        probe = req(f"p{step}", rng.choice(bases)[: rng.randint(0, 160)] + rand_ids(rng, rng.randint(1, 40)))
        held = sched._held(probe, {})
        assert held == reference(probe)
        answers.append(held)
    assert 0 < sum(answers) < len(answers)
