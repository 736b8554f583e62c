"""Prefix sharing, scheduling policies and preemption on the real Engine (tiny checkpoint, CPU).

The independent reference is HF transformers `generate` on the same weights, one prompt at a
time (tests/tiny_models.py). Every engine run, radix cache on or off, any policy, ample or
starved KV pool, must reproduce it token for token. Page accounting is checked after each
run on the engine thread: every page is free or held by the radix tree once nothing runs.

The shared-prefix batch is ../shared/bench/workloads.json's "shared-prefix" workload scaled
down for the CPU: 4 groups x 6 prompts, a 64-128 token prefix per group, an 8-24 token suffix
per prompt, 8-16 new tokens, shuffled across groups.
"""

from __future__ import annotations

import random

import pytest

from pipeline_infer import Engine
from pipeline_infer import model_runner
from tiny_models import VOCAB, hf_greedy, make_tiny_model

GROUPS, PER_GROUP = 4, 6
POLICIES = ("fcfs", "lpm", "batch", "auto")  # "auto", the default, runs these batch submissions as "batch"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="module")
def workload(tiny):
    """(prompts, group of each prompt, prefix length of each group, max_new_tokens, HF outputs)."""
    _, hf_model = tiny
    rng = random.Random(1)
    items = []
    prefix_lens = []
    for g in range(GROUPS):
        prefix = [rng.randrange(3, VOCAB) for _ in range(rng.randint(64, 128))]
        prefix_lens.append(len(prefix))
        for _ in range(PER_GROUP):
            suffix = [rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 24))]
            items.append((prefix + suffix, g, rng.randint(8, 16)))
    rng.shuffle(items)
    prompts = [p for p, _, _ in items]
    groups = [g for _, g, _ in items]
    max_new = [n for _, _, n in items]
    expected = [hf_greedy(hf_model, p, n) for p, n in zip(prompts, max_new)]
    return prompts, groups, prefix_lens, max_new, expected


def generate(llm: Engine, prompts, max_new) -> list[dict]:
    params = [{"temperature": 0, "max_new_tokens": n} for n in max_new]
    return llm.generate(input_ids=prompts, sampling_params=params)


def page_accounting(llm: Engine) -> tuple[int, int, int, int]:
    """(free pages, tree pages, locked tree pages, capacity), read on the engine thread."""

    def read():
        s, cache = llm._scheduler, llm._prefix_cache
        assert not s.running and not s.waiting
        tree = cache.total_pages if cache is not None else 0
        locked = cache.locked_pages if cache is not None else 0
        return s.allocator.num_free, tree, locked, s.allocator.capacity

    return llm._core.call(read)


def assert_all_pages_accounted(llm: Engine) -> None:
    free, tree, locked, capacity = page_accounting(llm)
    assert locked == 0, "a finished request left a lock on the tree"
    assert free + tree == capacity, f"pages leaked: {free} free + {tree} in the tree != {capacity}"
    llm.flush_cache()
    free, tree, _, capacity = page_accounting(llm)
    assert tree == 0 and free == capacity


@pytest.mark.parametrize("page_size", [1, 4])
def test_shared_prefix_batch_radix_on_off_every_policy(tiny, workload, page_size):
    """Greedy outputs are identical (and equal HF's) with the radix cache off and on, under each
    policy. With it on, exactly one request per group computes the group prefix: every other
    request reports cached_tokens > 0. This holds for every policy, since each lets a
    request wait for an in-flight prefill of its prefix; they differ in order, not in sharing."""
    directory, _ = tiny
    prompts, groups, prefix_lens, max_new, expected = workload
    for policy in POLICIES:
        for disable in (True, False):
            with Engine(
                directory,
                page_size=page_size,
                max_total_tokens=8192,
                schedule_policy=policy,
                disable_radix_cache=disable,
                chunked_prefill_size=1024,
            ) as llm:
                outs = generate(llm, prompts, max_new)
                assert [o["output_ids"] for o in outs] == expected, (policy, disable)
                cached = [o["meta_info"]["cached_tokens"] for o in outs]
                if disable:
                    assert cached == [0] * len(prompts)
                else:
                    for g in range(GROUPS):
                        mine = [c for c, gg in zip(cached, groups) if gg == g]
                        assert sorted(mine)[0] == 0 and all(c > 0 for c in sorted(mine)[1:]), (policy, g, mine)
                        # Each later member reuses at least the whole pages of the group prefix.
                        aligned = prefix_lens[g] // page_size * page_size
                        assert all(c >= aligned for c in sorted(mine)[1:]), (policy, g, mine)
                assert_all_pages_accounted(llm)


def test_sharing_comes_from_holding_back(tiny, workload):
    """The sharing above comes from holding requests back, not from luck: in one admission step
    fcfs meets each group's second member while the first is still in flight."""
    directory, _ = tiny
    prompts, groups, _, max_new, _ = workload
    with Engine(directory, page_size=4, max_total_tokens=8192, chunked_prefill_size=1024) as llm:
        generate(llm, prompts, max_new)
        held = llm._core.call(lambda: llm._scheduler.num_held)
    assert held >= GROUPS * (PER_GROUP - 1)


@pytest.mark.parametrize("page_size", [1, 4])
def test_starved_pool_preempts_and_matches_ample_run(tiny, workload, page_size):
    """A KV pool far smaller than the batch: requests are retracted (asserted), resume, and every
    one finishes with the output of the ample-memory run (HF's)."""
    directory, _ = tiny
    prompts, _, _, max_new, expected = workload
    for policy, disable in (("batch", False), ("fcfs", False), ("fcfs", True)):
        with Engine(
            directory,
            page_size=page_size,
            max_total_tokens=192,  # the longest sequence is 168 tokens
            schedule_policy=policy,
            disable_radix_cache=disable,
            schedule_conservativeness=0.02,  # tiny decode reserve: admission over-commits
            chunked_prefill_size=256,
        ) as llm:
            outs = generate(llm, prompts, max_new)
            info = llm.get_server_info()
            assert info["num_retractions"] > 0, (policy, disable, "the pool was meant to force preemption")
            assert [o["output_ids"] for o in outs] == expected, (policy, disable)
            assert all(o["meta_info"]["finish_reason"]["type"] in ("stop", "length") for o in outs)
            assert info["new_token_ratio"] > 0.15 * 0.02  # the reserve ratio rose after retracting
            assert_all_pages_accounted(llm)


@pytest.mark.parametrize("policy", POLICIES)
def test_n_samples_share_the_prompt(tiny, policy):
    """n > 1 expands into n requests with one prompt: one computes it, the others reuse its
    pages (cached_tokens = every whole page but the last token's), and greedy samples agree."""
    directory, hf_model = tiny
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (21, 90)]
    page_size = 4
    with Engine(directory, page_size=page_size, max_total_tokens=4096, schedule_policy=policy) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 6, "n": 3})
        assert len(outs) == 6
        for i, p in enumerate(prompts):
            mine = outs[3 * i : 3 * i + 3]
            assert all(o["output_ids"] == hf_greedy(hf_model, p, 6) for o in mine)
            shared = (len(p) - 1) // page_size * page_size
            assert sorted(o["meta_info"]["cached_tokens"] for o in mine) == [0, shared, shared]
        assert_all_pages_accounted(llm)


def test_second_batch_reuses_first_and_tree_survives_pressure(tiny, workload):
    """A repeat of the batch hits the cache on every request (cached_tokens > 0 everywhere),
    with outputs unchanged; a small pool evicts from the tree instead of failing."""
    directory, _ = tiny
    prompts, _, _, max_new, expected = workload
    with Engine(directory, page_size=4, max_total_tokens=1024, schedule_policy="batch") as llm:
        first = generate(llm, prompts, max_new)
        second = generate(llm, prompts, max_new)
        assert [o["output_ids"] for o in first] == expected
        assert [o["output_ids"] for o in second] == expected
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in second)
        assert_all_pages_accounted(llm)


def test_flush_cache_refused_while_requests_run(tiny):
    """flush_cache empties the tree only when nothing runs; while a request runs it raises a
    RuntimeError saying why, and the engine keeps serving."""
    directory, hf_model = tiny
    prompt = [5 + i % 300 for i in range(37)]
    greedy = {"temperature": 0, "max_new_tokens": 4}
    with Engine(directory, page_size=4, max_total_tokens=4096) as llm:
        assert llm.generate(input_ids=prompt, sampling_params=greedy)["meta_info"]["cached_tokens"] == 0
        assert llm.generate(input_ids=prompt, sampling_params=greedy)["meta_info"]["cached_tokens"] == 36
        stream = llm.generate(
            input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}, stream=True
        )
        next(stream)  # the request is running now, with 399 tokens to go
        with pytest.raises(RuntimeError, match="flush_cache refused: 1 running and 0 waiting"):
            llm.flush_cache()
        stream.close()  # abandoning the stream aborts the request (queued before the read below)
        _, tree, _, _ = page_accounting(llm)
        assert tree > 0, "the refused flush must not have emptied the tree"
        llm.flush_cache()
        out = llm.generate(input_ids=prompt, sampling_params=greedy)
        assert out["meta_info"]["cached_tokens"] == 0  # the flush emptied it
        assert out["output_ids"] == hf_greedy(hf_model, prompt, 4)
        assert_all_pages_accounted(llm)


def test_default_policy_treats_multi_request_calls_as_batch_jobs(tiny):
    """schedule_policy defaults to "auto": a generate call that submits several requests (a
    list, or n > 1) marks them batch jobs, a call for one prompt does not."""
    directory, _ = tiny
    with Engine(directory, max_total_tokens=1024) as llm:
        assert llm.get_server_info()["schedule_policy"] == "auto"
        assert llm._scheduler.schedule_policy == "auto"
        one, _ = llm._make_requests(None, None, [3, 4, 5], None)
        many, _ = llm._make_requests(None, None, [[3, 4, 5], [6, 7]], None)
        samples, _ = llm._make_requests(None, {"n": 2}, [3, 4, 5], None)
        assert [r.batch_job for r in one] == [False]
        assert [r.batch_job for r in many] == [True, True]
        assert [r.batch_job for r in samples] == [True, True]


def _shared_prefix_workload(vocab_size: int):
    """workloads.json "shared-prefix" through the benchmark's own generator, scaled down further."""
    import importlib.util
    import os

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
    spec = importlib.util.spec_from_file_location("radix_cpu", os.path.join(here, "radix_cpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    workload, _ = bench.load_workload([os.path.join(here, "workloads.json")])
    assert workload["seed"] == 1 and workload["prefix_len"] == 1024  # the real entry, not a fallback
    workload.update(num_groups=2, prompts_per_group=3, prefix_len=96, suffix_len=[8, 24], output_len=[6, 10])
    return bench.make_workload(workload, vocab_size)


def test_bundled_model_shared_prefix_radix_on_off(bundled_engine):
    """The done-means check on the real model: the "shared-prefix" workload (scaled down), greedy,
    gives identical outputs with the radix cache on and off, and every request but the first of
    each group reuses the group's prefix."""
    prompts, out_lens, groups = _shared_prefix_workload(bundled_engine.vocab_size)
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in out_lens]
    bundled_engine.flush_cache()  # the session's engine: start from an empty tree
    on = bundled_engine.generate(input_ids=prompts, sampling_params=params)
    with Engine(disable_radix_cache=True, max_total_tokens=2048) as llm:
        off = llm.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    assert [len(o["output_ids"]) for o in on] == out_lens
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in off)
    for g in set(groups):
        mine = sorted(o["meta_info"]["cached_tokens"] for o, gg in zip(on, groups) if gg == g)
        assert mine[0] == 0 and all(c >= 96 for c in mine[1:]), (g, mine)
    bundled_engine.flush_cache()


@pytest.mark.parametrize("page_size", [1, 4])
def test_cascade_decode_through_shared_prefixes_matches_hf(tiny, workload, page_size, monkeypatch):
    """enable_cascade_attn=True, the Triton backend (Triton's interpreter on the CPU) and the radix
    cache: decode steps attend to each group's shared prefix once per group of rows
    (shared_prefix_attention.py). Outputs equal HF's, as without it, and the shared path ran."""
    pytest.importorskip("triton")
    # Groups here have PER_GROUP rows, fewer than the engine's threshold for using the path.
    monkeypatch.setattr(model_runner, "_MIN_SHARED_PREFIX_GROUP_ROWS", 2)
    directory, _ = tiny
    prompts, _, _, max_new, expected = workload
    n = 2 * PER_GROUP  # two groups' worth keeps the interpreter's run short
    steps = {}
    for enable in (True, False):
        with Engine(
            directory, page_size=page_size, max_total_tokens=8192, attention_backend="triton", dtype="float32",
            chunked_prefill_size=1024, enable_cascade_attn=enable,
        ) as llm:
            outs = generate(llm, prompts[:n], max_new[:n])
            assert [o["output_ids"] for o in outs] == expected[:n], enable
            steps[enable] = llm._runner.shared_prefix_steps
            assert_all_pages_accounted(llm)
    assert steps[False] == 0  # off by default
    assert steps[True] >= 8  # every decode step while both groups' rows run together
