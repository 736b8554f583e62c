"""Greedy outputs of our engine equal HF transformers `generate`, token for token.

Each family's tiny random checkpoint is run by HF (one prompt at a time, no padding)
and by our engine (all prompts submitted together, continuous batching, paged KV).
"""

from __future__ import annotations

import random

import pytest

from pipeline_infer import Engine
from tiny_models import FAMILIES, VOCAB, hf_greedy, make_tiny_model

NEW_TOKENS = 32


def _prompts(seed: int, n: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        out[family] = make_tiny_model(str(d), family)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf(checkpoints, family):
    directory, hf_model = checkpoints[family]
    prompts = _prompts(hash(family) % 1000)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    with Engine(directory, page_size=1) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o["output_ids"] == e, f"{family} prompt {i} diverged"
        assert o["meta_info"]["prompt_tokens"] == len(prompts[i])


@pytest.mark.parametrize("page_size", [16])
def test_page_size_16_matches_hf(checkpoints, page_size):
    directory, hf_model = checkpoints["qwen2"]
    prompts = _prompts(11)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    with Engine(directory, page_size=page_size, chunked_prefill_size=48) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
    assert [o["output_ids"] for o in outs] == expected


def test_tiny_kv_pool_still_matches(checkpoints):
    """A pool far smaller than the batch needs: requests wait (and may be retracted)."""
    directory, hf_model = checkpoints["llama"]
    prompts = _prompts(5, n=10)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    # The largest sequence needs ~92 tokens; 160 holds fewer than two of them at a time.
    with Engine(directory, max_total_tokens=160, page_size=4) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
        info = llm.get_server_info()
    assert [o["output_ids"] for o in outs] == expected
    assert info["max_total_tokens"] == 160
    assert all(o["meta_info"]["finish_reason"]["type"] in ("stop", "length") for o in outs)


@pytest.mark.parametrize("pool", [None, 160])
def test_unmixed_steps_match_hf(checkpoints, pool):
    """enable_mixed_chunk=False: every step is prefill-only or decode-only, outputs unchanged
    (with chunked prefills, and with a pool small enough that requests wait and retract)."""
    directory, hf_model = checkpoints["llama"]
    prompts = _prompts(21, n=10)
    expected = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    with Engine(directory, page_size=4, chunked_prefill_size=40, max_total_tokens=pool,
                enable_mixed_chunk=False) as llm:
        kinds = []
        runner = llm._runner
        launch = runner.launch

        def spy(batch):
            kinds.append({c.prefill for c in batch.chunks})
            return launch(batch)

        runner.launch = spy
        outs = llm.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS})
    assert [o["output_ids"] for o in outs] == expected
    assert kinds and all(len(k) == 1 for k in kinds)  # never prefill and decode in one step
    assert {True} in kinds and {False} in kinds
