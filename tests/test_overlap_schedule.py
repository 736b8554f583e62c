"""The overlap schedule: step N+1 is scheduled and launched before step N's tokens are collected.

On CUDA it is the default; here it is switched on for the CPU (disable_overlap_schedule=False),
where the logic is the same: placeholders for tokens in flight, the next step's input ids
taken from the previous step's samples, finished requests dropped from a step already
launched, lockstep steps for requests that need their last token (penalties, grammars), and a
fallback to lockstep when a retraction could happen. Outputs must equal HF (greedy) and the
lockstep engine's (sampling with seeds, penalties, stop tokens, streaming).
"""

from __future__ import annotations

import random

import pytest

from pipeline_infer import Engine
from tiny_models import VOCAB, hf_greedy, make_tiny_model

NEW_TOKENS = 24


def _prompts(seed: int, n: int = 10, lo: int = 3, hi: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: make_tiny_model(str(tmp_path_factory.mktemp(f)), f) for f in ("llama", "qwen2")}


class _InFlight:
    """Counts launched-but-uncollected steps: proof that steps really overlapped."""

    def __init__(self, runner):
        self.now = self.max = self.overlapped = 0
        launch, collect = runner.launch, runner.collect

        def spy_launch(batch):
            step = launch(batch)
            self.now += 1
            self.max = max(self.max, self.now)
            self.overlapped += self.now > 1
            return step

        def spy_collect(step):
            self.now -= 1
            return collect(step)

        runner.launch, runner.collect = spy_launch, spy_collect


def _generate(directory, prompts, params, overlap: bool, **opts):
    with Engine(directory, disable_overlap_schedule=not overlap, **opts) as llm:
        free = llm.get_server_info()["num_free_pages"]
        spy = _InFlight(llm._runner)
        outs = llm.generate(input_ids=prompts, sampling_params=params)
        info = llm.get_server_info()
        # Every page is free again once the prefix cache lets go of its pages: none was handed
        # to the cache twice (a page keyed by a token still in flight) or leaked.
        llm.flush_cache()
        assert llm.get_server_info()["num_free_pages"] == free
    return outs, spy, info


@pytest.mark.parametrize(
    "family,opts",
    [
        ("llama", dict(page_size=1)),
        ("qwen2", dict(page_size=4, chunked_prefill_size=40)),
        ("llama", dict(page_size=4, chunked_prefill_size=40, enable_mixed_chunk=False)),
        ("qwen2", dict(page_size=1, max_running_requests=4, admission_batch=2)),
    ],
)
def test_greedy_matches_hf_with_overlap(checkpoints, family, opts):
    directory, hf_model = checkpoints[family]
    prompts = _prompts(len(str(opts)))
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    outs, spy, _ = _generate(directory, prompts, {"temperature": 0, "max_new_tokens": NEW_TOKENS}, True, **opts)
    assert [o["output_ids"] for o in outs] == expected
    assert spy.max == 2 and spy.overlapped > NEW_TOKENS // 2, "steps did not overlap"


def test_tiny_pool_falls_back_to_lockstep_and_still_matches(checkpoints):
    """A pool so small that decodes may need a retraction: those steps run in lockstep."""
    directory, hf_model = checkpoints["llama"]
    prompts = _prompts(5, n=10)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    outs, spy, info = _generate(
        directory, prompts, {"temperature": 0, "max_new_tokens": NEW_TOKENS}, True, max_total_tokens=160, page_size=4
    )
    assert [o["output_ids"] for o in outs] == expected
    assert info["num_retractions"] > 0, "the pool was meant to force a retraction"
    assert spy.overlapped > 0


def test_seeded_sampling_is_the_same_with_and_without_overlap(checkpoints):
    """A seeded row's draw depends on (seed, token index): the token in flight must count."""
    directory, _ = checkpoints["qwen2"]
    prompts = _prompts(8)
    params = [{"temperature": 0.9, "top_p": 0.9, "top_k": 50, "max_new_tokens": NEW_TOKENS, "sampling_seed": 100 + i}
              for i in range(len(prompts))]
    on, spy, _ = _generate(directory, prompts, params, True, page_size=1)
    off, _, _ = _generate(directory, prompts, params, False, page_size=1)
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    assert spy.overlapped > 0


def test_stop_tokens_penalties_and_lengths_match_lockstep(checkpoints):
    """Requests finishing at different steps (stop tokens, lengths) are dropped from the step
    already launched; requests with penalties or min_new_tokens make their steps lockstep."""
    directory, _ = checkpoints["llama"]
    prompts = _prompts(9, n=12)
    greedy, _, _ = _generate(directory, prompts, {"temperature": 0, "max_new_tokens": NEW_TOKENS}, False, page_size=1)
    params = []
    for i, o in enumerate(greedy):
        p = {"temperature": 0, "max_new_tokens": 5 + 2 * i}
        if i % 3 == 0:  # stop at a token the greedy run produces mid-way
            p["stop_token_ids"] = [o["output_ids"][3 + i % 5]]
        if i % 4 == 1:
            p["repetition_penalty"] = 1.3
        if i == 2:
            p["min_new_tokens"] = 4
        params.append(p)
    on, spy, _ = _generate(directory, prompts, params, True, page_size=1)
    off, _, _ = _generate(directory, prompts, params, False, page_size=1)
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    assert [o["meta_info"]["finish_reason"] for o in on] == [o["meta_info"]["finish_reason"] for o in off]
    assert any(o["meta_info"]["finish_reason"]["type"] == "stop" for o in on)
    # Penalised requests run in lockstep while they are in flight; once they finish, overlap resumes.
    plain = [p for p in params if "repetition_penalty" not in p and "min_new_tokens" not in p]
    on_plain, spy_plain, _ = _generate(directory, prompts[: len(plain)], plain, True, page_size=1)
    assert spy_plain.overlapped > 0


def test_streaming_and_abort_with_overlap(checkpoints):
    directory, _ = checkpoints["qwen2"]
    prompt = _prompts(3, n=1, lo=20, hi=20)[0]
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    with Engine(directory, page_size=4, disable_overlap_schedule=False) as llm:
        free = llm.get_server_info()["num_free_pages"]
        whole = llm.generate(input_ids=prompt, sampling_params=params)
        streamed = []
        for chunk in llm.generate(input_ids=prompt, sampling_params=params, stream=True):
            streamed.append(chunk)
        assert streamed[-1]["output_ids"] == whole["output_ids"]  # cumulative by default
        gen = llm.generate(input_ids=prompt, sampling_params={**params, "max_new_tokens": 500}, stream=True)
        next(gen)
        gen.close()  # abort while a step is in flight
        llm.flush_cache()
        assert llm.get_server_info()["num_free_pages"] == free, "pages leaked"
        again = llm.generate(input_ids=prompt, sampling_params=params)
    assert again["output_ids"] == whole["output_ids"]


def test_bad_option_type():
    with pytest.raises(TypeError, match="disable_overlap_schedule"):
        Engine(disable_overlap_schedule="yes")


def test_logprob_requests_run_in_lockstep_with_the_same_results(checkpoints):
    """Logprob requests (their values come back with the token) next to plain ones."""
    directory, _ = checkpoints["qwen2"]
    prompts = _prompts(12, n=6)
    wants = [i % 2 == 0 for i in range(len(prompts))]
    results = []
    for overlap in (True, False):
        with Engine(directory, page_size=1, disable_overlap_schedule=not overlap) as llm:
            outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 12},
                                return_logprob=wants, top_logprobs_num=3)
            # Once the logprob requests are done, plain ones overlap again.
            spy = _InFlight(llm._runner)
            llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 12})
            results.append((outs, spy.overlapped))
    (on, on_overlapped), (off, _) = results
    assert [o["output_ids"] for o in on] == [o["output_ids"] for o in off]
    for a, b, want in zip(on, off, wants):
        assert ("output_token_logprobs" in a["meta_info"]) == want
        if want:
            assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
            assert a["meta_info"]["output_top_logprobs"] == b["meta_info"]["output_top_logprobs"]
    assert on_overlapped > 0


def test_a_large_calls_later_slices_are_made_while_the_engine_waits_on_the_device(checkpoints, monkeypatch):
    """With the overlap schedule, generate() makes a large call's later slices of requests while
    the engine thread waits for a step's tokens (EngineCore.wait_for_device), not beside the
    host work of a step (one GIL); the results are those of the call made whole."""
    import time

    from pipeline_infer import engine as engine_module

    directory, _ = checkpoints["qwen2"]
    prompts = _prompts(21, n=12)
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    with Engine(directory, page_size=4, disable_overlap_schedule=False) as llm:
        whole = llm.generate(input_ids=prompts, sampling_params=params)
        collect = llm._runner.collect

        def slow_collect(step):  # a device that takes a while to compute a step, as a GPU does
            time.sleep(0.02)
            return collect(step)

        llm._runner.collect = slow_collect
        make = llm._make_requests
        waiting: list[bool] = []

        def spy(*args, **kwargs):
            if kwargs.get("first_index"):
                waiting.append(llm._core._device_wait.is_set())
            return make(*args, **kwargs)

        llm._make_requests = spy
        monkeypatch.setattr(engine_module, "_SUBMIT_SLICE", 4)
        monkeypatch.setattr(engine_module, "_LATER_SLICE", 2)
        monkeypatch.setattr(engine_module, "_SLICE_WAIT_S", 30.0)  # past the gate only by the engine's wait
        sliced = llm.generate(input_ids=prompts, sampling_params=params)
        assert waiting == [True] * 4
        # Idle, the engine is not waited for.
        start = time.perf_counter()
        llm._core.wait_for_device(30.0)
        assert time.perf_counter() - start < 5.0
    assert [o["output_ids"] for o in sliced] == [o["output_ids"] for o in whole]


def test_a_front_end_waiting_as_the_engine_goes_idle_is_not_held_for_its_timeout(checkpoints):
    """wait_for_device returns once the engine thread blocks on its empty inbox, also when it is
    called in the moment between a call's last results and that block (on_idle runs in it):
    checking for an idle engine only on entry, it waited its whole timeout there (CI, 30 s)."""
    import threading
    import time

    directory, _ = checkpoints["qwen2"]
    with Engine(directory, page_size=4, disable_overlap_schedule=False) as llm:
        runner = llm._runner
        on_idle = runner.on_idle
        in_on_idle = threading.Event()

        def slow_on_idle():  # widens the moment to a certain catch
            in_on_idle.set()
            time.sleep(0.3)
            on_idle()

        runner.on_idle = slow_on_idle
        llm.generate(input_ids=_prompts(3, n=2), sampling_params={"max_new_tokens": 2})
        assert in_on_idle.wait(10.0)
        start = time.perf_counter()
        llm._core.wait_for_device(30.0)
        assert time.perf_counter() - start < 5.0

        # A message put in while the engine is on its way to block (here: in on_idle) wakes it at
        # once: that block is not a wait for the front end to take (it would make its next slice
        # beside the scheduling of the requests just submitted).
        core = llm._core
        sets: list[bool] = []  # whether the inbox was empty at each set()

        class Recording(threading.Event):
            def set(self):
                sets.append(core._inbox.empty())
                super().set()

        release = threading.Event()

        def held_on_idle():
            in_on_idle.set()
            release.wait(10.0)
            on_idle()

        core._device_wait = Recording()
        in_on_idle.clear()
        runner.on_idle = held_on_idle
        core.submit([])  # wakes the idle engine; it finds nothing to run and goes idle again
        assert in_on_idle.wait(10.0)
        core.submit([])  # put in before it blocks
        release.set()
        assert core._device_wait.wait(10.0)  # Recording.set appends before it sets
        runner.on_idle = on_idle
        assert sets and all(sets)
