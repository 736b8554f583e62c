"""A workload's host path against an emulated GPU: how much of a run the host's work would show (issue 6).

Runs the real Engine on the CPU (front end, scheduler, radix cache, the model runner's build with
the Triton backend's planning and the device page table, the overlap schedule, commit) with the
model replaced by a stub that returns at once; each step is then charged the time an H200 takes
for it (a sleep that releases the GIL, as waiting on a CUDA event does), back to back as on the
device. The wall time is then the emulated device time plus whatever host work the overlap could
not hide, as on a GPU machine whose host runs Python at this machine's speed.

The device-time model is rough, fitted to the H200 figures of docs/benchmarks.md (Qwen2.5-0.5B,
cascade attention on): a decode step 0.9 ms + 2.85 us a row (3.8 ms at 1,024 rows); a step that
prefills 1.5 ms + 1.6 us a prompt token + 10 us a decode row (15 x 1,092 tokens: 27.7 ms).
--scale multiplies it: the GPU machines' hosts run Python 1.3-3x slower than a 2-core CI-like
CPU, so --scale 0.5 shows this machine as such a host would be against an H200.

    python benchmarks/emulated_device.py [--workload shared-prefix] [--scale 0.5] [--repeats 5] [--num-scheduler-steps 4]
        [--disable-radix-cache] [--disable-cascade-attn] [--requests-made-before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from engine_host_profile import TINY_QWEN2  # noqa: E402
from offline_throughput import make_workload  # noqa: E402

VOCAB = 151_936  # Qwen2.5's: the workloads draw ids from it; the stub model never embeds them


def device_seconds(batch, scale: float) -> float:
    """The H200's time for one step of the Qwen2.5-0.5B shape (see the module doc)."""
    if batch.decode_reqs is not None:  # a decode window runs num_steps such steps
        return (0.9e-3 + 2.85e-6 * len(batch.decode_reqs)) * scale * batch.num_steps
    prefill = sum(c.length for c in batch.chunks if c.prefill)
    decodes = sum(1 for c in batch.chunks if not c.prefill)
    return (1.5e-3 + 1.6e-6 * prefill + 10e-6 * decodes) * scale


def emulate(runner, scale: float) -> dict:
    """Make the runner's steps take device time: launch returns at once, collect waits for the step."""
    state = {"ready": 0.0, "busy": 0.0}
    model = runner.model
    model.forward = lambda fb: torch.empty(fb.num_tokens, TINY_QWEN2["hidden_size"])
    model.compute_logits = lambda hidden: torch.empty(hidden.shape[0], 8)
    runner.sampler = lambda logits, info: torch.full((logits.shape[0],), 1000, dtype=torch.long)
    launch, collect = runner.launch, runner.collect

    def timed_launch(batch):
        step = launch(batch)
        t = device_seconds(batch, scale)
        state["busy"] += t
        state["ready"] = step.emulated_ready = max(time.perf_counter(), state["ready"]) + t
        return step

    def timed_collect(step):
        wait = step.emulated_ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return collect(step)

    runner.launch, runner.collect = timed_launch, timed_collect
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="shared-prefix", help="a workload of workloads.json")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the emulated device time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--disable-cascade-attn", action="store_true")
    ap.add_argument("--max-running-requests", type=int, default=1024)
    ap.add_argument("--requests-made-before", action="store_true",
                    help="make the call's requests before the timed part and time their submission: the "
                         "engine's own host share, without the front end's work beside it")
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="Engine(num_scheduler_steps=N): decode steps a window runs (the GPU's default is 4)")
    args = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"  # lets the engine build a Triton backend on the CPU (no kernel runs)
    torch.set_num_threads(1)
    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({**TINY_QWEN2, "vocab_size": VOCAB, "max_position_embeddings": 8192}, f)
    from pipeline_infer import Engine

    reqs = make_workload(args.workload, VOCAB, None)
    ids = [p for p, _ in reqs]
    params = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for _, o in reqs]
    llm = Engine(model_dir, load_format="dummy", device="cpu", random_seed=0, enable_step_timing=True,
                 attention_backend="triton", page_size=16, max_running_requests=args.max_running_requests,
                 chunked_prefill_size=16384,
                 admission_batch=max(1, args.max_running_requests // 8),  # the engine's default on CUDA
                 disable_overlap_schedule=False, disable_radix_cache=args.disable_radix_cache,
                 enable_cascade_attn=not args.disable_cascade_attn, num_scheduler_steps=args.num_scheduler_steps)
    device = emulate(llm._runner, args.scale)
    llm.generate(input_ids=ids[:8], sampling_params=params[:8])  # warm-up, as the GPU harness does
    llm.flush_cache()
    llm.step_timing_summary(reset=True)
    walls = []
    for i in range(args.repeats):
        device["busy"] = 0.0
        if args.requests_made_before:
            from pipeline_infer.engine import _SyncCollector

            made = llm._make_requests(None, params, ids, None, None, stream=False)[0]
            t = time.perf_counter()
            _SyncCollector(llm, made).wait(False)  # what generate() does once its requests are made
        else:
            t = time.perf_counter()
            llm.generate(input_ids=ids, sampling_params=params)
        walls.append(time.perf_counter() - t)
        s = llm.step_timing_summary(reset=True)
        llm.flush_cache()
        kinds = ", ".join(f"{k} {v['steps']} steps {v['wall_s']:.3f} s (host {v['host_s']:.3f})"
                          for k, v in s["by_kind"].items() if v["steps"])
        print(f"run {i + 1}: wall {walls[-1]:.3f} s, emulated device {device['busy']:.3f} s, "
              f"outside the steps {walls[-1] - s['span_s']:.3f} s; {kinds}", flush=True)
    print(f"median wall {statistics.median(walls):.3f} s of {len(walls)}; emulated device {device['busy']:.3f} s")
    llm.shutdown()


if __name__ == "__main__":
    main()
