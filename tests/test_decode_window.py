"""Decode windows (num_scheduler_steps): several decode steps from one schedule, on the real Engine.

The reference is HF transformers `generate` on the same weights, one prompt at a time
(tests/tiny_models.py). A window's later steps take their input from the step before on the
device, so every output must still be HF's token for token, including requests that finish
inside a window (by length or by a stop token) and requests retracted under a starved pool.
The windows must also have happened: fewer engine steps than with one step a schedule.
"""

from __future__ import annotations

import random

import pytest

from pipeline_infer import Engine
from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.request import PLACEHOLDER, Request
from pipeline_infer.sampling_params import SamplingParams
from pipeline_infer.scheduler import Scheduler
from test_prefix_sharing import assert_all_pages_accounted
from test_scheduler import expected_output, next_token
from tiny_models import VOCAB, hf_greedy, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="module")
def cases(tiny):
    """(prompts, sampling params, HF outputs): lengths 1-19, every third request stopped by a
    token HF emits mid-way (so it finishes inside a window), two prompts sharing a prefix."""
    _, hf_model = tiny
    rng = random.Random(4)
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]
    prompts, params, expected = [], [], []
    for i in range(11):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 50))]
        if i < 2:
            prompt = shared + prompt
        n = rng.randint(1, 19)
        out = hf_greedy(hf_model, prompt, n)
        p = {"temperature": 0, "max_new_tokens": n}
        if i % 3 == 0 and len(out) > 3:
            stop = out[len(out) // 2]
            p["stop_token_ids"] = [stop]
            out = out[: out.index(stop) + 1]  # a stop token stays in the output
        prompts.append(prompt)
        params.append(p)
        expected.append(out)
    return prompts, params, expected


def _run(directory, prompts, params, **options):
    with Engine(directory, random_seed=0, **options) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params=params)
        info = llm.get_server_info()
        assert_all_pages_accounted(llm)
    return outs, info


@pytest.mark.parametrize("page_size,overlap,running", [(1, True, None), (4, True, None), (4, False, None), (4, True, 3)])
def test_windows_match_hf_with_stops_and_lengths(tiny, cases, page_size, overlap, running):
    """running=3: most requests wait for a slot, so windows alternate with admitting steps (a
    window's samples feed the next step's decode rows beside the new prompts)."""
    directory, _ = tiny
    prompts, params, expected = cases
    steps_taken = {}
    for steps in (1, 4):
        outs, info = _run(directory, prompts, params, page_size=page_size, num_scheduler_steps=steps,
                          disable_overlap_schedule=not overlap, max_running_requests=running)
        assert info["num_scheduler_steps"] == steps
        assert [o["output_ids"] for o in outs] == expected, steps
        stopped = [i for i, p in enumerate(params) if "stop_token_ids" in p]
        assert all(outs[i]["meta_info"]["finish_reason"]["type"] == "stop" for i in stopped)
        assert info["num_generated_tokens"] == sum(map(len, expected))
        steps_taken[steps] = info["num_steps"]
    assert steps_taken[4] < steps_taken[1] * 0.6, steps_taken  # the windows ran


def test_seeded_sampling_in_windows_draws_as_step_by_step(tiny, cases):
    """Sampled requests (temperature, top-p, top-k, a logit_bias) run in windows too: a seeded
    row's draw depends on its seed and its token's index only, so the outputs equal the
    one-step-a-schedule run's; an unseeded row gets its length."""
    directory, _ = tiny
    prompts, _, _ = cases
    params = [{"temperature": 0.9, "top_p": 0.9 if i % 2 else 1.0, "top_k": 50 if i % 3 == 0 else -1,
               "max_new_tokens": 5 + 2 * i, "ignore_eos": True, "sampling_seed": 100 + i,
               "logit_bias": {"7": 2.0} if i == 4 else None} for i in range(len(prompts))]
    params[-1].pop("sampling_seed")
    runs = {}
    for steps in (1, 4):
        outs, info = _run(directory, prompts, params, page_size=4, num_scheduler_steps=steps, disable_overlap_schedule=False)
        runs[steps] = ([o["output_ids"] for o in outs], info["num_steps"])
    assert runs[4][0][:-1] == runs[1][0][:-1]
    assert [len(o) for o in runs[4][0]] == [p["max_new_tokens"] for p in params]
    assert runs[4][1] < 0.6 * runs[1][1], (runs[4][1], runs[1][1])
    assert len(set(map(tuple, runs[1][0]))) == len(prompts)  # sampled, not one greedy answer


def test_windows_under_a_starved_pool_retract_and_match_hf(tiny, cases):
    directory, _ = tiny
    prompts, params, expected = cases
    outs, info = _run(directory, prompts, params, page_size=4, num_scheduler_steps=4, max_total_tokens=128,
                      schedule_conservativeness=0.02, chunked_prefill_size=64, disable_overlap_schedule=False)
    assert info["num_retractions"] > 0, "the pool was meant to force preemption"
    assert [o["output_ids"] for o in outs] == expected


def test_a_streaming_request_runs_one_step_a_schedule(tiny, cases):
    """A request that streams gets each token as it is sampled: no windows while it runs."""
    directory, _ = tiny
    prompts, params, expected = cases
    steps = {}
    for k in (1, 4):
        with Engine(directory, random_seed=0, page_size=4, num_scheduler_steps=k, disable_overlap_schedule=False) as llm:
            chunks = list(llm.generate(input_ids=prompts[1], sampling_params=params[1], stream=True))
            assert chunks[-1]["output_ids"] == expected[1]
            steps[k] = llm.get_server_info()["num_steps"]
    assert steps[4] == steps[1]


class WindowRunner:
    """A stand-in device for the scheduler alone: runs each batch's steps (a window's several),
    keeps a slot -> token 'KV cache' and checks every read against the truth (test_scheduler.py's
    FakeRunner, with windows: step k decodes each row at its start + k from step k - 1's token)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.slots: dict[int, int] = {}
        self.windows = 0
        self.windows_while_waiting = 0

    def run(self, batch, scheduler) -> list[int | None]:
        ps = self.page_size
        if batch.decode_reqs is None:
            out = []
            for c in batch.chunks:
                req = c.req
                for pos in range(c.start, c.start + c.length):
                    self.slots[req.pages[pos // ps] * ps + pos % ps] = req.token_ids[pos]
                out.append(self._next(req, c.start + c.length) if c.samples else None)
            return out
        steps = batch.num_steps
        if steps > 1 and scheduler.waiting:  # only when no admission was due: no slot, or held ones
            free = scheduler.max_running_requests - len(scheduler.running)
            assert free <= 0 or free < scheduler.admission_batch, "a window while a free slot waits"
            self.windows_while_waiting += 1
        self.windows += steps > 1
        reqs, starts = batch.decode_reqs, batch.decode_starts
        assert all(len(r.pages) * ps >= s + steps for r, s in zip(reqs, starts)), "pages short of the window"
        tokens = [r.token_ids[s] for r, s in zip(reqs, starts)]
        out: list[int] = []
        for k in range(steps):
            for i, (req, start) in enumerate(zip(reqs, starts)):
                pos = start + k
                token = tokens[i] if tokens[i] != PLACEHOLDER else None
                assert token is not None, "a placeholder fed to the device"
                self.slots[req.pages[pos // ps] * ps + pos % ps] = token
                tokens[i] = self._next(req, pos + 1)
            out += tokens
        return out

    def _next(self, req, end: int) -> int:
        ps = self.page_size
        seen = [self.slots.get(req.pages[p // ps] * ps + p % ps) for p in range(end)]
        return next_token(seen)


@pytest.mark.parametrize("page_size,admission_batch", [(1, 1), (4, 1), (4, 3)])
def test_scheduler_windows_run_only_when_no_admission_is_due_and_keep_every_output(page_size, admission_batch):
    rng = random.Random(9)
    alloc = PageAllocator(1 + 2048 // page_size)
    sched = Scheduler(alloc, page_size, max_running_requests=3 + 2 * (admission_batch > 1), chunked_prefill_size=64,
                      num_scheduler_steps=4, admission_batch=admission_batch)
    runner = WindowRunner(page_size)
    reqs = []
    for i in range(8 + 8 * (admission_batch > 1)):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 30))]
        req = Request(rid=f"r{i}", prompt_ids=prompt, params=SamplingParams(max_new_tokens=rng.randint(1, 15), temperature=0.0),
                      eos_token_ids=frozenset({0}), output_every_step=i == 7 + 8 * (admission_batch > 1))
        reqs.append(req)
        sched.add(req)
    assert [r.window_ok for r in reqs] == [True] * (len(reqs) - 1) + [False]  # the last one streams
    for _ in range(1000):
        batch = sched.schedule()
        if batch is None:
            break
        if batch.num_steps > 1:
            assert all(r.window_ok for r in batch.decode_reqs)
        sched.commit(batch, runner.run(batch, sched))
    assert not sched.has_work
    assert runner.windows_while_waiting > 0  # requests waited while slots were taken or held
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens), r.rid
    assert alloc.num_free == alloc.capacity, "pages leaked"


@pytest.mark.parametrize("bad", [0, 17, 2.0, True])
def test_num_scheduler_steps_is_checked(tiny, bad):
    directory, _ = tiny
    with pytest.raises((ValueError, TypeError), match="num_scheduler_steps"):
        Engine(directory, num_scheduler_steps=bad)


def test_a_request_aborted_inside_a_window_is_dropped_at_commit():
    """Aborting a request whose window is in flight (the caller gave up on it): the window's
    commit skips it, the others keep their outputs, and every page comes back."""
    rng = random.Random(3)
    page_size = 4
    alloc = PageAllocator(1 + 1024 // page_size)
    sched = Scheduler(alloc, page_size, max_running_requests=8, chunked_prefill_size=256, num_scheduler_steps=4)
    runner = WindowRunner(page_size)
    reqs = []
    for i in range(5):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(3, 20))]
        req = Request(rid=f"r{i}", prompt_ids=prompt, params=SamplingParams(max_new_tokens=14, temperature=0.0),
                      eos_token_ids=frozenset({0}), output_every_step=False)
        reqs.append(req)
        sched.add(req)
    aborted = None
    while sched.has_work:
        batch = sched.schedule()
        tokens = runner.run(batch, sched)
        if aborted is None and batch.num_steps > 1:
            aborted = sched.abort("r2")  # between the window's launch and its commit
            assert aborted is reqs[2] and aborted.finish_reason.type == "abort"
        sched.commit(batch, tokens)
    assert aborted is not None, "no window ran"
    assert reqs[2].output_ids == expected_output(reqs[2].prompt_ids, 14)[: len(reqs[2].output_ids)]
    for r in reqs[:2] + reqs[3:]:
        assert r.output_ids == expected_output(r.prompt_ids, 14), r.rid
    assert alloc.num_free == alloc.capacity, "pages leaked"
