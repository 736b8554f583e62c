"""End to end on a GPU: every attention backend, CUDA graphs on and off, fp32 and bf16.

The reference is HF transformers on the same weights, teacher-forced on our own output: each
token we chose must be HF's argmax at that position, or within `tol` of it (a near-tie, where
fp rounding legitimately picks either). Checking every position against HF's logits on our
sequence (rather than comparing two free-running generations) keeps the test meaningful past
the first near-tie.
"""

from __future__ import annotations

import copy
import json
import os
import random
import zlib

import pytest
import torch

from pipeline_infer import Engine
from tiny_models import FAMILIES, VOCAB, make_tiny_model

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24
SHARED = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs")  # copies of ../shared/models


def _prompts(seed: int, n: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 200))] for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # head_dim 64: the smallest head size every backend supports (FlashInfer has no 16 or 32).
    return {f: make_tiny_model(str(tmp_path_factory.mktemp(f)), f, head_dim=64) for f in FAMILIES}


def _check_against_hf(hf_model, prompts, outputs, dtype, tol, lengths=None):
    # A copy: casting the fixture's fp32 model to bf16 and back would round its weights for
    # every later case (our engine reads the unrounded checkpoint).
    model = copy.deepcopy(hf_model).to("cuda", dtype)
    worst = 0.0
    for i, (p, out) in enumerate(zip(prompts, outputs)):
        assert len(out) == (NEW_TOKENS if lengths is None else lengths[i])
        ids = torch.tensor([p + out], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(out, device="cuda").view(-1, 1)).squeeze(1)
        gap = (logits.max(dim=1).values - chosen).max().item()
        worst = max(worst, gap)
    assert worst <= tol, f"a chosen token's logit is {worst:.4f} below HF's best (tolerance {tol})"
    del model


CASES = [
    # (backend, graphs, dtype, tolerance on the logit gap)
    ("triton", True, "bfloat16", 0.08),
    ("triton", False, "bfloat16", 0.08),
    ("torch", False, "bfloat16", 0.08),
    ("triton", True, "float32", 0.02),  # Triton runs fp32 dots as TF32
    ("torch", False, "float32", 0.02),
]
try:
    import flashinfer  # noqa: F401

    CASES += [("flashinfer", True, "bfloat16", 0.08), ("flashinfer", False, "bfloat16", 0.08)]
except ImportError:
    pass


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend,graphs,dtype,tol", CASES)
def test_tiny_families_match_hf_on_gpu(checkpoints, family, backend, graphs, dtype, tol):
    directory, hf_model = checkpoints[family]
    prompts = _prompts(zlib.crc32(family.encode()))  # str hash() differs per process
    opts = dict(device="cuda", dtype=dtype, attention_backend=backend, disable_cuda_graph=not graphs)
    with Engine(directory, page_size=16, cuda_graph_max_bs=16, **opts) as llm:
        outs = llm.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        )
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    _check_against_hf(hf_model, prompts, [o["output_ids"] for o in outs], torch_dtype, tol)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.08), ("float32", 0.02)])
def test_extend_graphs_match_hf(checkpoints, dtype, tol):
    """Extend CUDA graphs (on by default): prefill and mixed steps replay captured graphs, same tokens as HF."""
    directory, hf_model = checkpoints["qwen2"]
    prompts = _prompts(17, n=24)
    opts = dict(device="cuda", dtype=dtype, attention_backend="triton",
                chunked_prefill_size=256, max_running_requests=8)
    with Engine(directory, page_size=16, cuda_graph_max_bs=8, **opts) as llm:
        assert llm._runner.extend_graphs is not None and llm._runner.extend_graphs.graphs
        outs = llm.generate(
            input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
        )
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    _check_against_hf(hf_model, prompts, [o["output_ids"] for o in outs], torch_dtype, tol)


@pytest.mark.parametrize("dtype,tol,sampled", [("bfloat16", 0.08, False), ("float32", 0.02, False),
                                               ("bfloat16", 0.08, True)])
def test_decode_windows_match_hf_on_gpu(checkpoints, dtype, tol, sampled):
    """Decode windows (num_scheduler_steps: 4 by default with graphs and Triton): rows that
    finish inside a window, by length or by a stop token, half the rows through the shared-prefix
    graphs; every token teacher-forced against HF, and far fewer steps than one a schedule.
    sampled: seeded draws at temperature 0.005 with top-p (the sampling path in windows; a token
    more than tol below the best has a probability under e^-16 there)."""
    directory, hf_model = checkpoints["qwen2"]
    rng = random.Random(8)
    system = [rng.randrange(3, VOCAB) for _ in range(64)]
    prompts = [(system if i % 2 else []) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 90))]
               for i in range(40)]
    lens = [rng.randint(1, NEW_TOKENS) for _ in prompts]
    draw = {"temperature": 0.005, "top_p": 0.95} if sampled else {"temperature": 0}
    sps = [{**draw, "max_new_tokens": n, "ignore_eos": True, "sampling_seed": i} for i, n in enumerate(lens)]
    common = dict(device="cuda", dtype=dtype, attention_backend="triton", page_size=16)
    with Engine(directory, num_scheduler_steps=1, **common) as llm:
        one = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=sps)]
        one_steps = llm.get_server_info()["num_steps"]
    for i in range(0, len(prompts), 3):  # stop tokens: one emitted mid-way in the one-step run
        if len(one[i]) > 3:
            sps[i]["stop_token_ids"] = [one[i][len(one[i]) // 2]]
    with Engine(directory, **common) as llm:
        info = llm.get_server_info()
        assert info["num_scheduler_steps"] == 4 and llm._runner.shared_prefix_finder is not None
        outs = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=sps)]
        steps = llm.get_server_info()["num_steps"]
        shared_steps = llm._runner.shared_prefix_steps
    assert steps < 0.6 * one_steps, (steps, one_steps)
    assert shared_steps > 0, "no step went through the shared-prefix graphs"
    for out, sp, n in zip(outs, sps, lens):
        stop = sp.get("stop_token_ids", [None])[0]
        if stop in out:  # ends at its first stop token
            assert out.index(stop) == len(out) - 1
        else:
            assert len(out) == n
    _check_against_hf(hf_model, prompts, outs, torch.bfloat16 if dtype == "bfloat16" else torch.float32, tol,
                      lengths=[len(o) for o in outs])


def test_graph_batch_sizes_cover_padding(checkpoints):
    """Batch sizes between buckets (padding rows) give the same tokens as running alone."""
    directory, _ = checkpoints["qwen2"]
    prompts = _prompts(3, n=11)
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    with Engine(directory, device="cuda", dtype="float32", cuda_graph_max_bs=16) as llm:
        together = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=sp)]
        alone = [llm.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-3.1-8b"])
def test_real_shapes_run_and_backends_agree(model, tmp_path):
    config = os.path.join(SHARED, model, "config.json")
    if not os.path.exists(config):
        pytest.skip(f"{config} not present")
    d = tmp_path / model
    d.mkdir()
    (d / "config.json").write_text(open(config).read())
    vocab = json.load(open(config))["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(16, 600))] for _ in range(24)]
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    results = {}
    for name, opts in {
        "triton+graphs": dict(attention_backend="triton"),
        "triton": dict(attention_backend="triton", disable_cuda_graph=True),
        "torch": dict(attention_backend="torch", disable_cuda_graph=True),
    }.items():
        with Engine(str(d), load_format="dummy", page_size=16, mem_fraction_static=0.8, **opts) as llm:
            outs = llm.generate(input_ids=prompts, sampling_params=sp)
        results[name] = [o["output_ids"] for o in outs]
        assert all(len(o) == 16 for o in results[name])
    # Random weights give near-uniform logits over 150k tokens (near-ties everywhere), and the torch
    # backend rounds differently from Triton in bf16: require the first tokens (prefill) to agree
    # for most prompts and report the full-sequence agreement. Measured on an H100 (2026-11-25):
    # Qwen2.5-0.5B 100% / 100%, Llama-3.1-8B 100% (triton) / 88% (torch). The logit-level check
    # against HF is test_tiny_families_match_hf_on_gpu.
    for name in ("triton", "torch"):
        first = sum(a[0] == b[0] for a, b in zip(results["triton+graphs"], results[name])) / len(prompts)
        same = sum(a == b for a, b in zip(results["triton+graphs"], results[name])) / len(prompts)
        print(f"{model}: triton+graphs vs {name}: first token {first:.0%}, whole sequence {same:.0%}")
        assert first >= 0.8


def test_shutdown_returns_gpu_memory(checkpoints):
    directory, _ = checkpoints["llama"]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with Engine(directory, device="cuda", max_total_tokens=1 << 20, cuda_graph_max_bs=32) as llm:
        llm.generate(input_ids=[[5, 6, 7]] * 4, sampling_params={"max_new_tokens": 4})
        during = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert during - before > 64 << 20
    # cuBLAS keeps a workspace per stream (tens of MiB) in the caching allocator: allowed.
    assert after - before < 128 << 20, f"{(after - before) >> 20} MiB still allocated after shutdown"


def test_cuda_engine_runs_torch_on_one_host_thread_and_gives_the_pool_back(checkpoints, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    directory, _ = checkpoints["llama"]
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        with Engine(directory, device="cuda", cuda_graph_max_bs=8) as llm:
            assert torch.get_num_threads() == 1
            out = llm.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4})
            assert len(out["output_ids"]) == 4
        assert torch.get_num_threads() == max(2, before)
    finally:
        torch.set_num_threads(before)


def test_engine_behaviours_hold_on_gpu(checkpoints):
    """Streaming, radix on/off equality, preemption and n > 1 on the GPU path (Triton + graphs)."""
    directory, _ = checkpoints["qwen3"]
    rng = random.Random(5)
    system = [rng.randrange(3, VOCAB) for _ in range(100)]
    prompts = [system + [rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 40))] for _ in range(16)]
    sp = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    common = dict(device="cuda", dtype="float32", page_size=16, cuda_graph_max_bs=16)
    with Engine(directory, disable_radix_cache=True, **common) as llm:
        reference = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=sp)]
    with Engine(directory, **common) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params=sp)
        assert [o["output_ids"] for o in outs] == reference
        assert sum(o["meta_info"]["cached_tokens"] > 0 for o in outs) >= len(prompts) - 1
        streamed = [c for c in llm.generate(input_ids=prompts[0], sampling_params=sp, stream=True)]
        assert streamed[-1]["output_ids"] == reference[0]
        samples = llm.generate(input_ids=prompts[1], sampling_params={**sp, "n": 3})
        assert [s["output_ids"] for s in samples] == [reference[1]] * 3
    # A pool of 40 pages of 16 tokens cannot hold 16 sequences of ~170 tokens: requests wait
    # or are retracted and resumed, with the same greedy outputs.
    with Engine(directory, max_total_tokens=640, schedule_conservativeness=0.02, **common) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params=sp)
        assert [o["output_ids"] for o in outs] == reference
        assert llm.get_server_info()["num_retractions"] > 0, "the pool was meant to force preemption"
