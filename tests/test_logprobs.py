"""Logprobs (return_logprob / top_logprobs_num / logprob_start_len) on the bundled model (CPU),
checked against Hugging Face transformers' log_softmax of the same model's logits."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Hello, my name is"]
TOL = 1e-3


@pytest.fixture(scope="module")
def hf_model(bundled_engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_engine.model_dir, dtype=torch.float32).eval()


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row p is log p(next token | ids[:p + 1])."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_values_match_hf_and_greedy_tokens_are_the_most_likely(bundled_engine, hf_model):
    outs = bundled_engine.generate(
        PROMPTS,
        {"temperature": 0, "max_new_tokens": 8},
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=5,
    )
    for prompt, out in zip(PROMPTS, outs):
        prompt_ids = bundled_engine.tokenizer.encode([prompt])[0]
        meta = out["meta_info"]
        ref = hf_logprobs(hf_model, prompt_ids + out["output_ids"][:-1])
        P = len(prompt_ids)

        inp = meta["input_token_logprobs"]
        assert [t for _, t, _ in inp] == prompt_ids
        assert inp[0][0] is None  # nothing predicts the first token (SGLang's convention)
        for j in range(1, P):
            assert abs(inp[j][0] - ref[j - 1, prompt_ids[j]].item()) < TOL
        assert all(text is None for _, _, text in inp)  # no text unless return_text_in_logprobs

        outp = meta["output_token_logprobs"]
        assert [t for _, t, _ in outp] == out["output_ids"]
        for i, (lp, tok, _) in enumerate(outp):
            assert abs(lp - ref[P - 1 + i, tok].item()) < TOL
            top = meta["output_top_logprobs"][i]
            assert top[0][1] == tok and abs(top[0][0] - lp) < 1e-6  # greedy = the most likely
            ref_top = ref[P - 1 + i].topk(5).values
            assert all(abs(a[0] - b.item()) < TOL for a, b in zip(top, ref_top))

        assert meta["input_top_logprobs"][0] is None
        for j in range(1, P):
            ref_top = ref[j - 1].topk(5)
            got = meta["input_top_logprobs"][j]
            assert all(abs(a[0] - b.item()) < TOL for a, b in zip(got, ref_top.values))
            assert got[0][1] == ref_top.indices[0].item()


@pytest.mark.parametrize("k", [1, 4])
def test_top_logprobs_num_returns_k_sorted(bundled_engine, k):
    out = bundled_engine.generate(
        PROMPTS[0], {"temperature": 0.9, "max_new_tokens": 6}, return_logprob=True, top_logprobs_num=k
    )
    tops = out["meta_info"]["output_top_logprobs"]
    assert len(tops) == len(out["output_ids"])
    for top in tops:
        assert len(top) == k
        values = [v for v, _, _ in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
    # The default (output only) still reports the last prompt token, without a logprob.
    assert out["meta_info"]["input_token_logprobs"] == [(None, out["meta_info"]["input_token_logprobs"][0][1], None)]
    assert out["meta_info"]["input_top_logprobs"] == [None]


def test_sampled_tokens_get_the_distribution_before_temperature_and_top_k(bundled_engine, hf_model):
    prompt = PROMPTS[2]
    out = bundled_engine.generate(
        prompt,
        {"temperature": 1.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 8, "sampling_seed": 3},
        return_logprob=True,
    )
    prompt_ids = bundled_engine.tokenizer.encode([prompt])[0]
    ref = hf_logprobs(hf_model, prompt_ids + out["output_ids"][:-1])
    for i, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert abs(lp - ref[len(prompt_ids) - 1 + i, tok].item()) < TOL


def test_logprob_start_len_text_and_prompt_scoring(bundled_engine, hf_model):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = bundled_engine.tokenizer.encode([prompt])[0]
    ref = hf_logprobs(hf_model, ids)
    out = bundled_engine.generate(
        prompt, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=3, return_text_in_logprobs=True
    )
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["output_token_logprobs"] == []
    inp = meta["input_token_logprobs"]
    assert [t for _, t, _ in inp] == ids[3:] and inp[0][0] is None
    for j in range(1, len(inp)):
        assert abs(inp[j][0] - ref[3 + j - 1, ids[3 + j]].item()) < TOL
    assert "".join(text for _, _, text in inp) == bundled_engine.tokenizer.decode(ids[3:])

    # The same prompt again: the prefix cache holds it now, yet every position is recomputed.
    again = bundled_engine.generate(prompt, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=3)
    assert [v for v, _, _ in again["meta_info"]["input_token_logprobs"]] == [v for v, _, _ in inp]


def test_mixed_batch_and_per_prompt_arguments(bundled_engine):
    params = {"temperature": 0, "max_new_tokens": 6}
    plain = bundled_engine.generate(PROMPTS, params)
    mixed = bundled_engine.generate(
        PROMPTS, params, return_logprob=[True, False, True], logprob_start_len=[0, -1, 1], top_logprobs_num=[2, 0, 0]
    )
    for a, b in zip(plain, mixed):
        assert a["output_ids"] == b["output_ids"]  # asking for logprobs does not change the output
    assert "output_token_logprobs" not in mixed[1]["meta_info"]
    assert len(mixed[0]["meta_info"]["output_top_logprobs"][0]) == 2
    assert "output_top_logprobs" not in mixed[2]["meta_info"]
    assert len(mixed[2]["meta_info"]["input_token_logprobs"]) == mixed[2]["meta_info"]["prompt_tokens"] - 1


def test_stream_chunks_carry_logprobs(bundled_engine):
    params = {"temperature": 0, "max_new_tokens": 6}
    full = bundled_engine.generate(PROMPTS[0], params, return_logprob=True, top_logprobs_num=2)
    chunks = list(bundled_engine.generate(PROMPTS[0], params, return_logprob=True, top_logprobs_num=2, stream=True))
    for c in chunks:
        assert len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"])
    last = chunks[-1]["meta_info"]
    assert last["output_token_logprobs"] == full["meta_info"]["output_token_logprobs"]
    assert last["output_top_logprobs"] == full["meta_info"]["output_top_logprobs"]


def test_async_generate_returns_logprobs(bundled_engine):
    import asyncio

    async def go():
        return await bundled_engine.async_generate(
            PROMPTS[0], {"temperature": 0, "max_new_tokens": 4}, return_logprob=True
        )

    out = asyncio.run(go())
    assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"]) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(return_logprob=True, logprob_start_len=99), "logprob_start_len"),
        (dict(return_logprob=True, logprob_start_len=-2), "logprob_start_len"),
        (dict(return_logprob=True, top_logprobs_num=-1), "top_logprobs_num"),
        (dict(return_logprob=[True, False]), "return_logprob"),
        (dict(return_hidden_states=True), "enable_return_hidden_states"),
    ],
)
def test_bad_arguments_are_clear_errors_and_the_engine_keeps_serving(bundled_engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bundled_engine.generate("Hi there", {"max_new_tokens": 2}, **kwargs)
    assert len(bundled_engine.generate("Hi there", {"max_new_tokens": 2})["output_ids"]) == 2


@pytest.mark.gpu
def test_gpu_logprobs_and_hidden_states_with_and_without_cuda_graphs(tmp_path):
    """On CUDA: decode logprobs through graph replay equal the eager ones and HF's; hidden-state
    requests (eager) mixed with plain ones (graphs) change nobody's tokens."""
    import random

    from pipeline_infer import Engine
    from tiny_models import VOCAB, make_tiny_model

    directory, hf = make_tiny_model(str(tmp_path / "llama"), "llama", head_dim=64)
    hf = hf.to("cuda", torch.float32)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 60))] for _ in range(6)]
    sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    results = {}
    for graphs in (True, False):
        with Engine(directory, device="cuda", dtype="float32", attention_backend="triton",
                    disable_cuda_graph=not graphs, cuda_graph_max_bs=8, enable_return_hidden_states=True) as llm:
            assert (llm._runner.graph_runner is not None) == graphs
            plain = llm.generate(input_ids=prompts, sampling_params=sp)
            lp = llm.generate(input_ids=prompts, sampling_params=sp, return_logprob=True, top_logprobs_num=3,
                              logprob_start_len=0)
            mixed = llm.generate(input_ids=prompts, sampling_params=sp, return_hidden_states=[True, False] * 3)
        assert [o["output_ids"] for o in lp] == [o["output_ids"] for o in plain] == [o["output_ids"] for o in mixed]
        results[graphs] = lp
        for p, out, m in zip(prompts, lp, mixed):
            seq = p + out["output_ids"][:-1]
            with torch.no_grad():
                ref = hf(torch.tensor([seq], device="cuda"), output_hidden_states=True)
            ref_lp = torch.log_softmax(ref.logits[0].float(), dim=-1).cpu()
            got = [v for v, _, _ in out["meta_info"]["input_token_logprobs"][1:]] + [
                v for v, _, _ in out["meta_info"]["output_token_logprobs"]]
            want = [ref_lp[i, t].item() for i, t in enumerate(p[1:] + out["output_ids"])]
            assert max(abs(a - b) for a, b in zip(got, want)) < 2e-2  # Triton runs fp32 dots as TF32
            for top, (_, tok, _) in zip(out["meta_info"]["output_top_logprobs"], out["meta_info"]["output_token_logprobs"]):
                assert top[0][1] == tok
            if "hidden_states" in m["meta_info"]:
                hs = m["meta_info"]["hidden_states"]
                got_h = torch.cat([torch.tensor(h).view(-1, 64) for h in hs])
                torch.testing.assert_close(got_h, ref.hidden_states[-1][0].cpu(), atol=2e-2, rtol=2e-2)
    for a, b in zip(results[True], results[False]):
        ga = [v for v, _, _ in a["meta_info"]["output_token_logprobs"]]
        gb = [v for v, _, _ in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(ga, gb)) < 1e-3
