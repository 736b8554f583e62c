"""The engine's host work per step, on the CPU, with a model too small to matter (issue 6).

Runs the real Engine (scheduler, model runner, sampler, engine thread, sync front end) on a
1-layer Qwen2-shaped model with hidden size 64 and random weights, `--requests` greedy requests
decoding together (256: a GPU engine's full batch), and prints the step timing summary:
schedule / build / post seconds are the host work a GPU step must hide (the overlap schedule
hides it only while it is shorter than the device step). On the CPU "forward" also holds the
tiny model and the CPU attention backend's planning, which have no GPU counterpart.
With --profile, a cProfile table of the engine thread (top functions by own time).

    python benchmarks/engine_host_profile.py [--requests 256] [--new-tokens 300] [--repeats 3] [--profile]
        [--page-size 1] [--attention-backend torch|triton --stub-model]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pipeline_infer import Engine  # noqa: E402
from pipeline_infer import engine_core  # noqa: E402

TINY_QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=2000, hidden_size=64, intermediate_size=128,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, torch_dtype="float32",
)


class HostOnlyModel(torch.nn.Module):
    """--stub-model: the model's forward and logits as zeros of the right shapes, so a step is
    its host work (schedule, build with the attention backend's plan, sampling set-up, post)
    and a trivial "forward"; with the Triton backend this times the GPU path's build on the
    CPU (its kernels never run)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.hidden, self.vocab = hidden, vocab

    def forward(self, fb):
        return torch.zeros(fb.num_tokens, self.hidden)

    def compute_logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.vocab)


def run_once(model_dir: str, requests: int, prompt_len: int, new_tokens: int, prof: cProfile.Profile | None,
             stub_model: bool = False, prefix_groups: int = 0, prefix_len: int = 0, **engine_options) -> dict:
    loop = engine_core.EngineCore._loop

    def profiled_loop(self, *a, **k):  # cProfile sees only the thread that enables it
        prof.enable()
        try:
            return loop(self, *a, **k)
        finally:
            prof.disable()

    if prof is not None:
        engine_core.EngineCore._loop = profiled_loop
    try:
        llm = Engine(model_dir, load_format="dummy", device="cpu", max_running_requests=requests,
                     enable_step_timing=True, random_seed=0, **engine_options)
        if stub_model:
            llm._runner.model = HostOnlyModel(TINY_QWEN2["hidden_size"], TINY_QWEN2["vocab_size"])
        rng = np.random.default_rng(0)
        ids = [rng.integers(10, TINY_QWEN2["vocab_size"] - 10, prompt_len).tolist() for _ in range(requests)]
        if prefix_groups:  # the shared-prefix workload's shape: groups share their first prefix_len tokens
            prefixes = [rng.integers(10, TINY_QWEN2["vocab_size"] - 10, prefix_len).tolist() for _ in range(prefix_groups)]
            ids = [prefixes[i % prefix_groups] + p for i, p in enumerate(ids)]
        llm.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True})
        summary = llm.step_timing_summary()
        llm.shutdown()
    finally:
        engine_core.EngineCore._loop = loop
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--attention-backend", default="torch",
                    help="torch, or triton (needs --stub-model: on the CPU its kernels would run in Triton's "
                         "interpreter, far too slowly); build then times the GPU path's host work")
    ap.add_argument("--stub-model", action="store_true", help="zeros for hidden states and logits (HostOnlyModel)")
    ap.add_argument("--profile", action="store_true", help="cProfile the engine thread of the last run")
    ap.add_argument("--prefix-groups", type=int, default=0,
                    help="prompts in this many groups, each group's starting with the same --prefix-len tokens")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--disable-cascade-attn", action="store_true")
    args = ap.parse_args()
    if args.attention_backend == "triton":
        if not args.stub_model:
            raise SystemExit("--attention-backend triton needs --stub-model on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # lets the engine build a Triton backend on the CPU
    torch.set_num_threads(1)  # host work is one Python thread; keep torch's pool out of the way
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(TINY_QWEN2, f)
    runs = []
    for i in range(args.repeats):
        prof = cProfile.Profile() if args.profile and i == args.repeats - 1 else None
        s = run_once(model_dir, args.requests, args.prompt_len, args.new_tokens, prof,
                     stub_model=args.stub_model, page_size=args.page_size, attention_backend=args.attention_backend,
                     prefix_groups=args.prefix_groups, prefix_len=args.prefix_len,
                     enable_cascade_attn=not args.disable_cascade_attn)
        runs.append(s)
        print(f"run {i + 1}: {s['steps']} steps, schedule {s['schedule_s']:.3f} s, build {s['build_s']:.3f} s, "
              f"post {s['post_s']:.3f} s, forward {s['forward_s']:.3f} s, wall {s['wall_s']:.3f} s", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("schedule_s", "build_s", "post_s", "forward_s", "wall_s")}
    steps = runs[-1]["steps"]
    host = med["schedule_s"] + med["build_s"] + med["post_s"]
    print(f"median of {len(runs)}: schedule {med['schedule_s']:.3f} + build {med['build_s']:.3f} + post "
          f"{med['post_s']:.3f} = {host:.3f} s host over {steps} steps ({host / steps * 1e3:.2f} ms a step); "
          f"forward {med['forward_s']:.3f} s")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
