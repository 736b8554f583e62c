"""The Engine API contract on the bundled SmolLM2-135M-Instruct (CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pipeline_infer import Engine
from pipeline_infer.utils import async_stream_and_merge, stream_and_merge

GREEDY = {"temperature": 0, "max_new_tokens": 24}

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "List three primary colors:",
    "Write one sentence about the ocean and the creatures that live in its deepest trenches.",
    "2 + 2 =",
    "def fibonacci(n):",
    "Translate to French: I would like a cup of coffee, please, with a little milk and no sugar.",
    "Q: What is the boiling point of water at sea level? A:",
]


def test_greedy_matches_hf_on_bundled_model(bundled_engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(bundled_engine.model_dir, dtype=torch.float32).eval()
    params = {"temperature": 0, "max_new_tokens": 32}
    outs = bundled_engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([bundled_engine.tokenizer.encode([prompt])[0]])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        assert out["output_ids"] == ref[0, ids.shape[1] :].tolist(), prompt


def test_single_and_list_shapes(bundled_engine):
    one = bundled_engine.generate("The capital of France is", GREEDY)
    assert isinstance(one, dict) and set(one) >= {"text", "output_ids", "meta_info"}
    meta = one["meta_info"]
    assert set(meta) >= {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason", "e2e_latency"}
    assert meta["completion_tokens"] == len(one["output_ids"]) > 0
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert "Paris" in one["text"]
    many = bundled_engine.generate(["a", "b"], GREEDY)
    assert isinstance(many, list) and len(many) == 2


def test_only_streams_and_stop_strings_detokenize_token_by_token(bundled_engine):
    """A non-streaming request's text is decoded once at the end (per-token decoding is engine-
    thread work every step); streams and stop strings need it as it grows."""
    def deferred(stream, params=GREEDY):
        reqs, _ = bundled_engine._make_requests("Hi", params, None, None, stream=stream)
        return reqs[0].detokenizer._deferred

    assert deferred(stream=False)
    assert not deferred(stream=True)
    assert not deferred(stream=False, params={**GREEDY, "stop": ["."]})
    assert not deferred(stream=False, params={**GREEDY, "stop_regex": [r"\d"]})
    # ... and the text is the same either way, stop token trimming included
    text = bundled_engine.generate(PROMPTS[:3], {"temperature": 0, "max_new_tokens": 40})
    streamed = [stream_and_merge(bundled_engine, p, {"temperature": 0, "max_new_tokens": 40}) for p in PROMPTS[:3]]
    assert [t["text"] for t in text] == streamed


def test_input_ids_equal_text_prompt(bundled_engine):
    ids = bundled_engine.tokenizer.encode(["The capital of France is"])[0]
    a = bundled_engine.generate("The capital of France is", GREEDY)
    b = bundled_engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]


@pytest.mark.parametrize("incremental", [False, True])
def test_stream_merges_to_the_non_streamed_result(incremental):
    with Engine(incremental_streaming_output=incremental) as llm:
        params = {"temperature": 0, "max_new_tokens": 40, "stop": ["\n\n"]}
        prompt = "Write a short, neutral self-introduction for a fictional character. Hello, my name is"
        full = llm.generate(prompt, params)
        assert stream_and_merge(llm, prompt, params) == full["text"]

        chunks = list(llm.generate(prompt, params, stream=True))
        assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
        ids = [t for c in chunks for t in c["output_ids"]] if incremental else chunks[-1]["output_ids"]
        assert ids == full["output_ids"]
        if not incremental:  # each chunk carries everything so far
            for a, b in zip(chunks, chunks[1:]):
                assert b["text"].startswith(a["text"])

        async def merged_async() -> str:
            return "".join([piece async for piece in async_stream_and_merge(llm, prompt, params)])

        assert asyncio.run(merged_async()) == full["text"]


def test_async_batch_and_async_stream(bundled_engine):
    async def main():
        outs = await bundled_engine.async_generate(PROMPTS[:3], GREEDY)
        gen = await bundled_engine.async_generate(PROMPTS[0], GREEDY, stream=True)
        last = None
        async for chunk in gen:
            last = chunk
        return outs, last

    outs, last = asyncio.run(main())
    sync = bundled_engine.generate(PROMPTS[:3], GREEDY)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in sync]
    assert last["output_ids"] == sync[0]["output_ids"]


def test_sync_api_inside_a_running_loop(bundled_engine):
    async def notebook_cell():
        return bundled_engine.generate("The capital of France is", GREEDY)

    out = asyncio.run(notebook_cell())
    assert out["output_ids"] == bundled_engine.generate("The capital of France is", GREEDY)["output_ids"]


def test_per_prompt_params_n_and_seeds(bundled_engine):
    params = [
        {"temperature": 0, "max_new_tokens": 5},
        {"temperature": 1.0, "max_new_tokens": 9, "sampling_seed": 1234},
    ]
    outs = bundled_engine.generate(["Hello", "Once upon a time"], params)
    assert outs[0]["meta_info"]["completion_tokens"] <= 5
    assert outs[1]["meta_info"]["completion_tokens"] <= 9
    # The same seed gives the same sample, alone or in another batch.
    again = bundled_engine.generate(["x", "Once upon a time"], [params[0], params[1]])[1]
    alone = bundled_engine.generate("Once upon a time", params[1])
    assert outs[1]["output_ids"] == again["output_ids"] == alone["output_ids"]

    samples = bundled_engine.generate(
        "Once upon a time", {"temperature": 1.0, "max_new_tokens": 12, "n": 4, "sampling_seed": 7}
    )
    assert isinstance(samples, list) and len(samples) == 4
    assert len({tuple(s["output_ids"]) for s in samples}) > 1, "n samples should differ"
    again = bundled_engine.generate(
        "Once upon a time", {"temperature": 1.0, "max_new_tokens": 12, "n": 4, "sampling_seed": 7}
    )
    assert [s["output_ids"] for s in samples] == [s["output_ids"] for s in again]


def test_max_new_tokens_zero(bundled_engine):
    out = bundled_engine.generate("Hello", {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"]["type"] == "length"


BAD_INPUTS = [
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, ValueError, "max_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"temperature": -0.5}}, ValueError, "temperature"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0.0}}, ValueError, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_p": 1.5}}, ValueError, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_k": 0}}, ValueError, "top_k"),
    ({"prompt": "hi", "sampling_params": {"top_k": -2}}, ValueError, "top_k"),
    ({"prompt": "hi", "sampling_params": {"max_tokens": 3}}, TypeError, "max_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"temperature": "hot"}}, TypeError, "temperature"),
    ({"prompt": 42}, TypeError, "prompt"),
    ({"prompt": []}, ValueError, "empty"),
    ({"prompt": "hi", "input_ids": [1, 2]}, ValueError, "exactly one"),
    ({}, ValueError, "exactly one"),
    ({"input_ids": [1, 10**9]}, ValueError, "vocabulary"),
    ({"input_ids": [1, -1]}, ValueError, "vocabulary"),
    ({"input_ids": [[1, 2], "x"]}, TypeError, "input_ids"),
    # A batch's ids are checked in whole-list passes; the error still names the bad element.
    ({"input_ids": [[1, 2], [3, 2.5]]}, TypeError, r"input_ids\[1\] holds 2.5 \(float\)"),
    ({"input_ids": [[1, 2], [3, True]]}, TypeError, r"holds True \(bool\)"),
    ({"input_ids": [[1, 2], [3, 10**9, 4]]}, ValueError, r"token id 1000000000 \(prompt 1\)"),
    # From 256 ids on the range check runs in numpy (engine_inputs._ids_in_range): the same errors.
    ({"input_ids": [[5] * 300, [7] * 299 + [10**9]]}, ValueError, r"token id 1000000000 \(prompt 1\)"),
    ({"input_ids": [[5] * 300, [-3] + [7] * 299]}, ValueError, r"token id -3 \(prompt 1\)"),
    ({"input_ids": [7] * 300 + [2**70]}, ValueError, r"token id 1180591620717411303424 is outside"),
    ({"input_ids": [7] * 300 + [49152]}, ValueError, r"token id 49152 is outside the vocabulary \[0, 49152\)"),
    ({"input_ids": []}, ValueError, "empty"),
    ({"prompt": ["a", "b"], "sampling_params": [{}, {}, {}]}, ValueError, "sampling_params"),
    # Prompts asking for equal parameters share one checked object (engine_inputs._params); a
    # value equal to an earlier prompt's but of another type is still checked on its own.
    ({"input_ids": [[1, 2], [3, 4]], "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 2.0}]},
     TypeError, r"'max_new_tokens' must be an int, got 2\.0"),
    ({"input_ids": [[1, 2], [3, 4]], "sampling_params": [{"ignore_eos": True}, {"ignore_eos": 1}]},
     TypeError, r"'ignore_eos' must be a bool, got 1"),
]


@pytest.mark.parametrize("kwargs,exc,word", BAD_INPUTS)
def test_bad_inputs_raise_and_engine_keeps_serving(bundled_engine, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        bundled_engine.generate(**kwargs)
    assert bundled_engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0})["meta_info"]["completion_tokens"] > 0


def test_prompt_longer_than_context_is_refused_and_output_capped():
    with Engine(context_length=64) as llm:
        with pytest.raises(ValueError, match="context"):
            llm.generate(input_ids=list(range(100, 200)))
        prompt = list(range(100, 150))  # 50 tokens; 14 fit before the context ends
        out = llm.generate(input_ids=prompt, sampling_params={"max_new_tokens": 100, "ignore_eos": True})
        assert len(out["output_ids"]) == 14
        assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_unknown_engine_option_names_nearest():
    with pytest.raises(TypeError, match="page_size"):
        Engine(page_sise=16)
    with pytest.raises(ValueError, match="trust_remote_code"):
        Engine(trust_remote_code=True)
    with pytest.raises(ValueError, match="admission_batch must be >= 1, got 0"):
        Engine(admission_batch=0)
    with pytest.raises(TypeError, match="admission_batch must be an int"):
        Engine(admission_batch="8")
    with pytest.raises(ValueError, match="cuda_graph_max_bs must be >= 1, got 0"):
        Engine(cuda_graph_max_bs=0)


def test_decode_graphs_cover_every_batch_the_scheduler_can_form_by_default():
    # A decode batch above the largest captured graph runs eagerly (on an H200, 13 ms a
    # 512-row step instead of ~3): by default the graphs reach max_running_requests.
    from pipeline_infer.config import EngineConfig
    from pipeline_infer.engine_setup import decode_graph_max_bs

    assert decode_graph_max_bs(EngineConfig(), 512) == 512
    assert decode_graph_max_bs(EngineConfig(cuda_graph_max_bs=64), 512) == 64
    assert decode_graph_max_bs(EngineConfig(cuda_graph_max_bs=1024), 512) == 512
    assert decode_graph_max_bs(EngineConfig(disable_cuda_graph=True), 512) == 0


@pytest.mark.parametrize("name,cpu,small_gpu,large_gpu", [
    ("default_max_running_requests", 64, 256, 1024),
    ("default_chunked_prefill_size", 8192, 8192, 16384),
])
def test_defaults_follow_the_devices_memory(name, cpu, small_gpu, large_gpu):
    from pipeline_infer import engine_setup

    default = getattr(engine_setup, name)
    gib = 2**30
    assert default(torch.device("cpu")) == cpu
    assert default(torch.device("cuda"), total_memory=140 * gib) == large_gpu  # H200
    assert default(torch.device("cuda"), total_memory=80 * gib) == large_gpu  # H100
    assert default(torch.device("cuda"), total_memory=24 * gib) == small_gpu


def test_server_info_reports_the_resolved_defaults_and_the_users_choice():
    with Engine(context_length=64) as llm:  # the bundled model on the CPU
        info = llm.get_server_info()
        assert (info["max_running_requests"], info["chunked_prefill_size"]) == (64, 8192)
    with Engine(context_length=64, chunked_prefill_size=40) as llm:
        assert llm.get_server_info()["chunked_prefill_size"] == 40
        assert llm.generate("Hello there, how are you", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        Engine(context_length=64, chunked_prefill_size=0)


def test_abandoned_stream_aborts_and_frees_pages():
    with Engine(disable_radix_cache=True) as llm:
        free_before = llm.get_server_info()["num_free_pages"]
        gen = llm.generate("Once upon a time", {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
        next(gen)
        gen.close()

        async def cancel():
            task = asyncio.ensure_future(llm.async_generate("Once upon a time", {"max_new_tokens": 500, "ignore_eos": True}))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel())
        # The aborts are processed between steps; a call through the engine thread waits for them.
        llm.generate("x", {"max_new_tokens": 1})
        info = llm.get_server_info()
        assert info["num_running"] == 0 and info["num_waiting"] == 0
        assert info["num_free_pages"] == free_before


def test_shutdown_then_calls_raise():
    llm = Engine()
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("hi")
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(llm.async_generate("hi"))
    llm.shutdown()  # idempotent


def test_a_non_streaming_request_gets_one_output_call_a_streaming_one_one_per_token(bundled_engine, monkeypatch):
    # A non-streaming call waits for the finish only: the engine thread skips the output
    # callback of its running requests on every other step (one Python call per row per step).
    from pipeline_infer import engine_core

    calls: dict[str, list[bool]] = {}
    emit = engine_core.EngineCore._emit

    def counting_emit(self, req):
        calls.setdefault(req.rid, []).append(req.is_finished)
        emit(self, req)

    monkeypatch.setattr(engine_core.EngineCore, "_emit", counting_emit)
    params = {"max_new_tokens": 5, "ignore_eos": True, "temperature": 0}
    prompts = ["The sea is", "A short poem:"]
    outs = bundled_engine.generate(prompts, params)
    assert [len(o["output_ids"]) for o in outs] == [5, 5]
    assert sorted(calls.values()) == [[True], [True]]
    calls.clear()
    streamed = list(bundled_engine.generate(prompts[0], params, stream=True))
    assert [len(v) for v in calls.values()] == [5] and list(calls.values())[0][-1] is True
    assert streamed[-1]["output_ids"] == outs[0]["output_ids"]


def _count_submits(engine, monkeypatch) -> list[int]:
    sizes: list[int] = []
    submit = engine._core.submit

    def counting(reqs):
        sizes.append(len(reqs))
        submit(reqs)

    monkeypatch.setattr(engine._core, "submit", counting)
    return sizes


def test_a_large_call_goes_to_the_engine_in_slices_with_the_same_results(bundled_engine, monkeypatch):
    """A non-streaming call over more than _SUBMIT_SLICE prompts hands each slice's requests to
    the engine as soon as they are made (the first _SUBMIT_SLICE, then _LATER_SLICE at a time);
    per-prompt arguments are cut to each slice."""
    from pipeline_infer import engine as engine_module

    prompts = PROMPTS[:7]
    kwargs = dict(
        sampling_params=[{"temperature": 0, "max_new_tokens": 3 + i, "ignore_eos": True} for i in range(7)],
        rid=[f"r{i}" for i in range(7)],
        return_logprob=[i % 2 == 0 for i in range(7)],
        top_logprobs_num=2,
    )
    whole = bundled_engine.generate(prompts, **kwargs)
    sizes = _count_submits(bundled_engine, monkeypatch)
    monkeypatch.setattr(engine_module, "_SUBMIT_SLICE", 3)
    monkeypatch.setattr(engine_module, "_LATER_SLICE", 2)
    sliced = bundled_engine.generate(prompts, **kwargs)
    assert sizes == [3, 2, 2]
    assert [o["output_ids"] for o in sliced] == [o["output_ids"] for o in whole]
    assert [len(o["output_ids"]) for o in sliced] == [3 + i for i in range(7)]
    assert [o["meta_info"]["id"] for o in sliced] == kwargs["rid"]
    assert [("output_token_logprobs" in o["meta_info"]) for o in sliced] == kwargs["return_logprob"]
    # (other batches, so the logprobs agree to float rounding only)
    got, want = sliced[2]["meta_info"]["output_token_logprobs"], whole[2]["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in got] == [t for _, t, _ in want]
    assert [lp for lp, _, _ in got] == pytest.approx([lp for lp, _, _ in want], abs=1e-4)
    # ids, one params dict for all, n samples each: prompt by prompt, its samples together
    sizes.clear()
    ids = bundled_engine.tokenizer.encode(PROMPTS[:5])
    params = {"temperature": 0, "max_new_tokens": 4, "n": 2}
    outs = bundled_engine.generate(input_ids=ids, sampling_params=params)
    assert sizes == [6, 4] and len(outs) == 10  # slices of 3 prompts, then 2
    alone = [bundled_engine.generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 4}) for p in ids]
    assert [o["output_ids"] for o in outs] == [a["output_ids"] for a in alone for _ in range(2)]


def test_a_mistake_in_a_later_slice_aborts_what_was_submitted(monkeypatch):
    from pipeline_infer import engine as engine_module

    with Engine(disable_radix_cache=True) as llm:
        free_before = llm.get_server_info()["num_free_pages"]
        monkeypatch.setattr(engine_module, "_SUBMIT_SLICE", 2)
        monkeypatch.setattr(engine_module, "_LATER_SLICE", 2)
        sizes = _count_submits(llm, monkeypatch)
        long_job = {"max_new_tokens": 300, "ignore_eos": True}
        with pytest.raises(ValueError, match=r"token id 1000000000 \(prompt 4\)"):  # the call's index, not the slice's
            llm.generate(input_ids=[[1, 2, 3]] * 4 + [[1, 10**9]], sampling_params=long_job)
        assert sizes == [2, 2]  # two slices went in before the third failed
        with pytest.raises(TypeError, match=r"prompt\[3\] must be a str"):
            llm.generate(["a", "b", "c", 4], long_job)
        # A list that does not match the prompts is refused whole, before anything is submitted.
        sizes.clear()
        with pytest.raises(ValueError, match="got 3 sampling_params for 5 prompts"):
            llm.generate(["a"] * 5, [long_job] * 3)
        assert sizes == []
        # The aborts are handled between steps; a call through the engine thread waits for them.
        assert llm.generate("x", {"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1
        info = llm.get_server_info()
        assert info["num_running"] == 0 and info["num_waiting"] == 0
        assert info["num_free_pages"] == free_before


def test_the_wait_counts_requests_added_after_the_first_ones_finished(bundled_engine):
    import time

    from pipeline_infer.engine import _SyncCollector

    first, _ = bundled_engine._make_requests(["a"], {"max_new_tokens": 1}, None, None, stream=False)

    def later():
        while not first[0].is_finished:
            time.sleep(0.005)
        params = {"max_new_tokens": 3, "ignore_eos": True, "temperature": 0}
        yield bundled_engine._make_requests(["b"], params, None, None, stream=False)[0]

    outs = _SyncCollector(bundled_engine, first).wait(False, later())
    assert [len(o["output_ids"]) for o in outs] == [1, 3]
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)


def test_request_ids_are_distinct_32_digit_hex_unless_given():
    from pipeline_infer.engine import _request_ids

    ids = _request_ids(None, 1000)
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert _request_ids(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="rid must be a str per prompt"):
        _request_ids(["a"], 2)


def test_finished_requests_are_freed_without_the_cyclic_gc(tmp_path):
    """A call's requests make no reference cycle (their output callback, which closes over the
    call's collector, is dropped at their last output): reference counting frees them once the
    engine lets go, with the cyclic GC off. Streamed and async calls too."""
    import gc
    import weakref

    from tiny_models import make_tiny_model

    directory, _ = make_tiny_model(str(tmp_path), "llama", head_dim=16)
    params = {"temperature": 0, "max_new_tokens": 4}
    with Engine(directory, attention_backend="torch", dtype="float32") as llm:
        refs = []
        submit = llm._core.submit

        def recording_submit(reqs):
            refs.extend(weakref.ref(r) for r in reqs)
            return submit(reqs)

        llm._core.submit = recording_submit
        gc.collect()
        gc.disable()
        try:
            llm.generate(input_ids=[[5, 6, 7], [8, 9, 10, 11]], sampling_params=params)
            list(llm.generate(input_ids=[5, 6, 7, 8], sampling_params=params, stream=True))
            asyncio.run(llm.async_generate(input_ids=[[9, 8, 7]], sampling_params=params))
            first = list(refs)
            # The engine holds its last step's batch until the next step: one more call.
            llm.generate(input_ids=[3, 4], sampling_params=params)
            assert len(first) == 4 and all(r() is None for r in first)
        finally:
            gc.enable()


def test_prompts_asking_for_the_same_parameters_share_one_checked_object():
    from pipeline_infer.engine_inputs import _params

    same = _params({"max_new_tokens": 3, "temperature": 0.5}, 4)
    assert len(same) == 4 and all(p is same[0] for p in same)
    made: dict = {}  # one call's slices share it (generate -> _make_requests)
    a = _params([{"max_new_tokens": 3}, {"max_new_tokens": 4}, {"max_new_tokens": 3}], 3, made)
    b = _params([{"max_new_tokens": 4}, {"max_new_tokens": 3, "temperature": 0.0}], 2, made)
    assert a[0] is a[2] and a[1] is b[0] and a[0] is not a[1] and b[1] not in a
    assert [p.max_new_tokens for p in a + b] == [3, 4, 3, 4, 3] and b[1].temperature == 0.0
    # Unhashable values (lists) are simply not shared; each object is still right.
    c = _params([{"stop": ["x"]}, {"stop": ["x"]}], 2)
    assert c[0].stop == c[1].stop == ["x"]


def test_shared_parameters_give_each_request_its_own_result(bundled_engine):
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7]]
    params = [{"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
              {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
              {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}]
    outs = bundled_engine.generate(input_ids=prompts, sampling_params=params)
    assert [len(o["output_ids"]) for o in outs] == [3, 2, 3]
    assert outs[0]["output_ids"] == outs[2]["output_ids"]


def test_split_call_cuts_a_first_slice_then_smaller_ones():
    from pipeline_infer.engine_inputs import split_call
    from pipeline_infer.extra_outputs import OutputArgs

    ids = [[i + 1] for i in range(7)]
    params = [{"max_new_tokens": i + 1} for i in range(7)]
    slices = split_call(None, params, ids, None, OutputArgs(), 2, 3)
    assert [s.first_index for s in slices] == [0, 3, 5]
    assert [s.input_ids for s in slices] == [ids[:3], ids[3:5], ids[5:]]
    assert [s.sampling_params for s in slices] == [params[:3], params[3:5], params[5:]]
    assert split_call(None, params, ids, None, OutputArgs(), 2, 7) is None  # no more than the first slice
    assert [len(s.input_ids) for s in split_call(None, params, ids, None, OutputArgs(), 3)] == [3, 3, 1]
