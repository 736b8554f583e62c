"""Scheduler host time per step on the CPU, with a stub model that answers instantly (issue 6).

Drives the real `Scheduler` (+ `RadixCache` when on) with GPU-like settings: page_size 16,
max_running_requests 256, chunked_prefill_size 8192, a KV pool of ~1.5M tokens (what an
80 GB H100 leaves for Qwen2.5-0.5B's KV). The "model" returns token 1 for every sampling chunk
at once, so all time measured is host time: `schedule()` + `commit()` of each step, plus the
per-request output callback the engine core would run (`--emit`, on by default: it is one
Python call per updated request, as EngineCore._emit). Workloads come from
benchmarks/workloads.json (ids drawn as in offline_throughput.py; ignore_eos, every request
runs its full output_len), all submitted at once as one batch `generate` would (batch_job).

    python benchmarks/host_overhead.py [--workload random,shared-prefix,decode-heavy]
        [--policy auto,fcfs,lpm,batch] [--radix on,off] [--num-prompts N] [--json out.json]

Reports per configuration: steps, median / p90 / max per-step host microseconds (thread CPU
time by default, so other load on a shared machine does not count; --wall for wall time), total host
seconds, and the median over "decode-only" steps taken while >= 600 requests still waited
(the issue's 256 running + ~700 waiting case). Profile with
    py-spy record -o prof.svg -- python benchmarks/host_overhead.py --workload random --policy auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from offline_throughput import make_workload  # noqa: E402  (same ids as the GPU benchmark)

from pipeline_infer.cache.kv_pool import PageAllocator  # noqa: E402
from pipeline_infer.cache.radix import RadixCache  # noqa: E402
from pipeline_infer.request import Request  # noqa: E402
from pipeline_infer.sampling_params import SamplingParams  # noqa: E402
from pipeline_infer.scheduler import Scheduler  # noqa: E402

VOCAB = 151936  # Qwen2.5-0.5B
PAGE_SIZE = 16
POOL_TOKENS = 1_500_000


def stub_tokens(batch) -> list[int | None]:
    """Token 1 for each row that samples; a decode-only step (columns) without building its chunks."""
    if batch.decode_reqs is not None:
        return [1] * batch.size
    return [1 if c.samples else None for c in batch.chunks]


def run(workload: str, policy: str, radix: bool, num_prompts: int | None, emit: bool, cpu_clock: bool = True) -> dict:
    reqs_spec = make_workload(workload, VOCAB, num_prompts)
    alloc = PageAllocator(POOL_TOKENS // PAGE_SIZE + 1)
    cache = RadixCache(alloc, PAGE_SIZE) if radix else None
    sched = Scheduler(alloc, PAGE_SIZE, max_running_requests=256, chunked_prefill_size=8192,
                      schedule_policy=policy, prefix_cache=cache)
    sink = []

    def on_output(req, finished):  # what EngineCore._emit calls; a queue put in the real engine
        if finished:
            sink.append(req)

    reqs = []
    for i, (ids, out_len) in enumerate(reqs_spec):
        params = SamplingParams(max_new_tokens=out_len, ignore_eos=True, temperature=0)
        reqs.append(Request(f"r{i}", ids, params, batch_job=True, on_output=on_output if emit else None))
    for r in reqs:
        sched.add(r)
    step_us, decode_busy_us = [], []
    out_tokens = 0
    # CPU time of this thread: the machine is shared, and time spent preempted is not ours.
    clock = time.thread_time if cpu_clock else time.perf_counter
    while sched.has_work:
        t0 = clock()
        batch = sched.schedule()
        if batch is None:
            raise RuntimeError("scheduler stalled with work queued")
        tokens = stub_tokens(batch)
        updated = sched.commit(batch, tokens)
        if emit:
            for r in updated:
                r.on_output(r, r.is_finished)
        dt = (clock() - t0) * 1e6
        step_us.append(dt)
        out_tokens += len(updated)
        if len(sched.waiting) >= 600 and batch.decode_reqs is not None:
            decode_busy_us.append(dt)
    assert len(sink) == len(reqs) or not emit
    assert all(r.num_output == r.params.max_new_tokens for r in reqs)
    s = sorted(step_us)
    return {
        "workload": workload, "policy": policy, "radix": radix, "requests": len(reqs), "steps": len(step_us),
        "median_us": round(statistics.median(s), 1), "p90_us": round(s[int(0.9 * (len(s) - 1))], 1),
        "max_us": round(s[-1], 1), "total_s": round(sum(s) / 1e6, 3), "output_tokens": out_tokens,
        "decode_busy_steps": len(decode_busy_us),
        "decode_busy_median_us": round(statistics.median(decode_busy_us), 1) if decode_busy_us else None,
        "retractions": sched.num_retractions,
        "cached_tokens": sum(r.cached_tokens for r in reqs),
    }


class _StubRunner:
    """The model: token 1 for every sampling chunk; sleeps step_s per step (a GPU step, GIL released)."""

    def __init__(self, step_s: float):
        self.step_s = step_s

    def run(self, batch):
        if self.step_s:
            time.sleep(self.step_s)
        return stub_tokens(batch)

    # The engine core's launch / collect API (ModelRunner.launch returns a step to collect later).
    def launch(self, batch):
        from types import SimpleNamespace

        return SimpleNamespace(batch=batch, tokens=self.run(batch))

    def collect(self, step):
        return step.tokens

    def on_idle(self):
        pass


def run_engine(workload: str, policy: str, radix: bool, num_prompts: int | None, step_ms: float) -> dict:
    """The whole host path of `Engine.generate(list)`: EngineCore's thread + the sync front end's collector."""
    from types import SimpleNamespace

    from pipeline_infer.engine import _SyncCollector
    from pipeline_infer.engine_core import EngineCore

    reqs_spec = make_workload(workload, VOCAB, num_prompts)
    alloc = PageAllocator(POOL_TOKENS // PAGE_SIZE + 1)
    cache = RadixCache(alloc, PAGE_SIZE) if radix else None
    sched = Scheduler(alloc, PAGE_SIZE, max_running_requests=256, chunked_prefill_size=8192,
                      schedule_policy=policy, prefix_cache=cache)
    core = EngineCore(sched, _StubRunner(step_ms / 1e3))
    engine = SimpleNamespace(config=SimpleNamespace(incremental_streaming_output=False, stream_interval=1),
                             _core=core, _closed=False)
    reqs = [Request(f"r{i}", ids, SamplingParams(max_new_tokens=o, ignore_eos=True, temperature=0), batch_job=True)
            for i, (ids, o) in enumerate(reqs_spec)]
    t0, c0 = time.perf_counter(), time.process_time()
    outs = _SyncCollector(engine, reqs).wait(single=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    core.stop()
    assert all(len(o["output_ids"]) == n for o, (_, n) in zip(outs, reqs_spec))
    steps = core.num_steps
    return {"workload": workload, "policy": policy, "radix": radix, "mode": "engine", "step_ms": step_ms,
            "steps": steps, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "host_ms_per_step": round((wall - steps * step_ms / 1e3) / steps * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="random,shared-prefix,decode-heavy")
    ap.add_argument("--policy", default="auto,fcfs,lpm,batch")
    ap.add_argument("--radix", default="on,off")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--no-emit", action="store_true", help="skip the per-request output callback")
    ap.add_argument("--wall", action="store_true", help="time steps by wall clock, not thread CPU time")
    ap.add_argument("--engine", action="store_true",
                    help="run the whole host path (EngineCore thread + sync generate's collector) instead")
    ap.add_argument("--step-ms", type=float, default=0.0, help="--engine: stub GPU time per step (sleeps)")
    ap.add_argument("--json", default=None, help="append results to this JSON-lines file")
    args = ap.parse_args()
    if args.engine:
        for w in args.workload.split(","):
            for p in args.policy.split(","):
                for rx in args.radix.split(","):
                    r = run_engine(w, p, rx == "on", args.num_prompts, args.step_ms)
                    print(json.dumps(r), flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(r) + "\n")
        return
    hdr = f"{'workload':14} {'policy':6} {'radix':5} {'steps':>6} {'med_us':>8} {'p90_us':>8} {'max_us':>9} " \
          f"{'total_s':>8} {'busy_dec_us':>11} {'cached':>8}"
    print(hdr)
    for w in args.workload.split(","):
        for p in args.policy.split(","):
            for rx in args.radix.split(","):
                r = run(w, p, rx == "on", args.num_prompts, not args.no_emit, not args.wall)
                print(f"{w:14} {p:6} {rx:5} {r['steps']:6d} {r['median_us']:8.0f} {r['p90_us']:8.0f} "
                      f"{r['max_us']:9.0f} {r['total_s']:8.2f} {str(r['decode_busy_median_us']):>11} "
                      f"{r['cached_tokens']:8d}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
