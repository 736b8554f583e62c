"""return_hidden_states on the bundled model (CPU), checked against Hugging Face transformers.

The engine returns the final layer's output after the final norm, which is what HF reports as
`output_hidden_states=True`'s `hidden_states[-1]` (the LM head's input). The engine here uses
small prefill chunks and a small KV pool so that chunking, prefix-cache hits and retraction
all happen to requests that return hidden states.
"""

from __future__ import annotations

import pytest
import torch

from pipeline_infer import Engine

PROMPTS = [
    "Today is",
    "Today is a sunny day and I like to walk along the river with my dog, who loves the water",
    "The capital of France is",
]
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def engine():
    with Engine(enable_return_hidden_states=True, chunked_prefill_size=16, max_total_tokens=128, random_seed=0) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()


def hf_last_hidden(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0]


def stacked(hidden_states: list) -> torch.Tensor:
    """SGLang's layout -> one [tokens, hidden] tensor: the prompt matrix, then one row per fed token."""
    return torch.cat([torch.tensor(h).view(-1, len(hidden_states[0][0])) for h in hidden_states])


def test_hidden_states_match_hf_last_layer(engine, hf_model):
    outs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 6}, return_hidden_states=True)
    size = engine.hf_config.hidden_size
    for prompt, out in zip(PROMPTS, outs):
        hs = out["meta_info"]["hidden_states"]
        ids = engine.tokenizer.encode([prompt])[0]
        assert len(hs) == out["meta_info"]["completion_tokens"] == 6  # SGLang's shape
        assert len(hs[0]) == len(ids) and all(len(row) == size for row in hs[0])
        assert all(len(h) == size and isinstance(h[0], float) for h in hs[1:])
        ref = hf_last_hidden(hf_model, ids + out["output_ids"][:-1])
        torch.testing.assert_close(stacked(hs), ref, atol=ATOL, rtol=RTOL)


def test_prefix_cache_hits_still_return_every_prompt_row(engine, hf_model):
    prompt = PROMPTS[1]
    engine.generate(prompt, {"temperature": 0, "max_new_tokens": 2})  # leaves the prompt in the cache
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 3}, return_hidden_states=True)
    ids = engine.tokenizer.encode([prompt])[0]
    ref = hf_last_hidden(hf_model, ids + out["output_ids"][:-1])
    torch.testing.assert_close(stacked(out["meta_info"]["hidden_states"]), ref, atol=ATOL, rtol=RTOL)
    # Only the prompt-only part is skipped by requests that do not ask: they reuse the cache.
    plain = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 3})
    assert "hidden_states" not in plain["meta_info"] and plain["meta_info"]["cached_tokens"] > 0
    assert plain["output_ids"] == out["output_ids"]


def test_prompt_only_request_and_stream(engine, hf_model):
    prompt = PROMPTS[2]
    ids = engine.tokenizer.encode([prompt])[0]
    only = engine.generate(prompt, {"max_new_tokens": 0}, return_hidden_states=True)
    assert only["output_ids"] == [] and len(only["meta_info"]["hidden_states"]) == 1
    torch.testing.assert_close(stacked(only["meta_info"]["hidden_states"]), hf_last_hidden(hf_model, ids), atol=ATOL, rtol=RTOL)

    params = {"temperature": 0, "max_new_tokens": 4}
    full = engine.generate(prompt, params, return_hidden_states=True)
    chunks = list(engine.generate(prompt, params, return_hidden_states=True, stream=True))
    assert chunks[-1]["meta_info"]["hidden_states"] == full["meta_info"]["hidden_states"]


def test_prompt_logprobs_across_prefill_chunks_and_retraction(engine, hf_model):
    # Four ~48-token sequences in a 128-token pool: decoding runs out of pages and retracts.
    before = engine.get_server_info()["num_retractions"]
    prompts = [f"Story {i}: once upon a time, in a land far away, there lived a" for i in range(4)]
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    outs = engine.generate(prompts, params, return_hidden_states=True, return_logprob=True, logprob_start_len=0)
    assert engine.get_server_info()["num_retractions"] > before
    for prompt, out in zip(prompts, outs):
        ids = engine.tokenizer.encode([prompt])[0]
        seq = ids + out["output_ids"][:-1]
        ref = hf_last_hidden(hf_model, seq)
        torch.testing.assert_close(stacked(out["meta_info"]["hidden_states"]), ref, atol=ATOL, rtol=RTOL)
        with torch.no_grad():
            lp = torch.log_softmax(hf_model.lm_head(ref), dim=-1)
        meta = out["meta_info"]
        got = [v for v, _, _ in meta["input_token_logprobs"][1:]] + [v for v, _, _ in meta["output_token_logprobs"]]
        want = [lp[p, tok].item() for p, tok in enumerate(ids[1:] + out["output_ids"])]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3
