"""How long generate() takes before the engine's first step, on the CPU with a stub model.

The shared-prefix or random workload of benchmarks/workloads.json (the throughput harness's
make_workload; 1,024 prompts of ~1,100 ids, or 1,000 of 128-1,024 ids), submitted in one
generate() call to an engine whose model returns zeros (HostOnlyModel), so what is timed is
host work: _make_requests (validation, requests), the wait until the engine thread's first
schedule(), that schedule, and the first step's build and launch. Medians of --repeats calls.

    python benchmarks/front_end_latency.py [--workload shared-prefix|random] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend's host path, on the CPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine_host_profile import TINY_QWEN2, HostOnlyModel  # noqa: E402
from offline_throughput import make_workload  # noqa: E402

VOCAB = 4000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="shared-prefix", choices=["shared-prefix", "random"])
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()

    import torch

    import pipeline_infer.engine as engine_module
    from pipeline_infer import Engine
    from pipeline_infer.model_runner import ModelRunner
    from pipeline_infer.scheduler import Scheduler

    torch.set_num_threads(1)
    marks: dict[str, list[tuple[float, float]]] = {}

    def timed(cls, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            out = original(*a, **k)
            marks.setdefault(name, []).append((start, time.perf_counter()))
            return out

        setattr(cls, name, wrapper)

    timed(engine_module.Engine, "_make_requests")
    timed(Scheduler, "schedule")
    timed(ModelRunner, "launch")
    directory = tempfile.mkdtemp()
    json.dump(dict(TINY_QWEN2, vocab_size=VOCAB), open(os.path.join(directory, "config.json"), "w"))
    reqs = make_workload(args.workload, VOCAB, None)  # the workloads file's shape, ids in [1000, VOCAB - 1000)
    ids = [p for p, _ in reqs]
    params = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for _, o in reqs]
    rows = []
    with Engine(directory, load_format="dummy", device="cpu", page_size=16, attention_backend="triton",
                max_running_requests=1024, admission_batch=128) as llm:
        llm._runner.model = HostOnlyModel(TINY_QWEN2["hidden_size"], VOCAB)
        llm.generate(input_ids=ids[:8], sampling_params=params[:8])
        llm.flush_cache()
        for _ in range(args.repeats):
            marks.clear()
            start = time.perf_counter()
            llm.generate(input_ids=ids, sampling_params=params)
            make, sched, launch = marks["_make_requests"][0], marks["schedule"][0], marks["launch"][0]
            rows.append({"make_requests": make[1] - make[0], "wait": sched[0] - make[1],
                         "first_schedule": sched[1] - sched[0], "to_first_launch": launch[1] - start})
            llm.flush_cache()
    print(f"{args.workload}, {len(reqs)} prompts, medians of {args.repeats} (ms): " + ", ".join(
        f"{k} {statistics.median(r[k] for r in rows) * 1e3:.1f}" for k in rows[0]))


if __name__ == "__main__":
    main()
