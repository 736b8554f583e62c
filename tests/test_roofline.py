"""The throughput floor (benchmarks/roofline.py) against hand-computed cases and published sizes."""

import json
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
from roofline import ModelShape, floor_seconds, shared_prefix_lens, unique_prefill_tokens  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "benchmarks", "configs")


@pytest.mark.parametrize("model,params", [("qwen2.5-0.5b", 494_032_768), ("llama-3.1-8b", 8_030_261_248)])
def test_parameter_counts_match_the_published_models(model, params):
    shape = ModelShape.from_config(json.load(open(os.path.join(CONFIGS, model, "config.json"))))
    assert shape.total_params() == params


def test_unique_prefill_tokens_is_the_trie_size():
    assert unique_prefill_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [7]]) == 3 + 1 + 1 + 1
    assert unique_prefill_tokens([[1, 2], [1, 2]]) == 2
    assert unique_prefill_tokens([]) == 0


def test_floor_of_one_request_by_hand():
    shape = ModelShape(vocab=10, hidden=4, intermediate=8, layers=1, q_heads=2, kv_heads=1, head_dim=2,
                       qkv_bias=False, qk_norm=False, tied_embeddings=True)
    layer = 4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 8 + 2 * 4  # q, k+v, o, mlp, norms
    assert shape.layer_params() == layer == 152
    kv_tok = 1 * 2 * 1 * 2 * 2
    # One prompt of 3 tokens, 3 outputs: prefill 3 tokens, then 2 decode steps at context 4 and 5.
    out = floor_seconds(shape, [([1, 2, 3], 3)], max_running=8, copy_bytes_per_s=1.0, matmul_flops_per_s=1e30)
    weights = 2 * (layer + 4 + 10 * 4)
    assert out["decode_steps"] == 2 and out["prefill_tokens"] == 3
    assert out["decode_s"] == pytest.approx(2 * weights + (4 + 5) * kv_tok)
    # Compute-bound prefill: 2 FLOPs per weight per token, causal attention pairs 3*4/2 = 6, LM head once.
    fast_memory = floor_seconds(shape, [([1, 2, 3], 1)], 8, copy_bytes_per_s=1e30, matmul_flops_per_s=1.0)
    assert fast_memory["prefill_s"] == pytest.approx(2 * layer * 3 + 4 * 2 * 2 * 6 + 2 * 10 * 4)
    assert fast_memory["decode_s"] == 0


def test_max_running_caps_the_batch():
    shape = ModelShape.from_config(json.load(open(os.path.join(CONFIGS, "qwen2.5-0.5b", "config.json"))))
    reqs = [([1] * 10 + [i], 11) for i in range(8)]
    wide = floor_seconds(shape, reqs, 8, 3e12, 8e14)
    narrow = floor_seconds(shape, reqs, 2, 3e12, 8e14)
    assert wide["decode_steps"] == 10 and narrow["decode_steps"] == 40
    assert narrow["decode_s"] > 3 * wide["decode_s"]  # weights re-read 4x as often


def test_a_shared_prefix_is_read_once_a_decode_step_with_prefix_sharing():
    shape = ModelShape(vocab=10, hidden=4, intermediate=8, layers=1, q_heads=2, kv_heads=1, head_dim=2,
                       qkv_bias=False, qk_norm=False, tied_embeddings=True)
    weights, kv_tok = 2 * (152 + 4 + 10 * 4), 1 * 2 * 1 * 2 * 2
    # Two prompts sharing [1, 2, 3], a third alone; one decode step each, at context 5, 5 and 3.
    reqs = [([1, 2, 3, 9], 2), ([1, 2, 3, 8], 2), ([4, 5], 2)]
    assert shared_prefix_lens([p for p, _ in reqs]) == [3, 3, 0]
    rates = dict(copy_bytes_per_s=1.0, matmul_flops_per_s=1e30)
    shared = floor_seconds(shape, reqs, 8, prefix_sharing=True, **rates)
    private = floor_seconds(shape, reqs, 8, prefix_sharing=False, **rates)
    assert private["decode_s"] == pytest.approx(weights + (5 + 5 + 3) * kv_tok)
    assert shared["decode_s"] == pytest.approx(weights + (2 + 2 + 3 + 3) * kv_tok)  # [1, 2, 3] once
