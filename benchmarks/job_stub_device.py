"""The file job's host path against a stub device: does it keep a GPU engine's batch full? (issues 6, 9)

Runs the real Engine (scheduler, radix cache, engine thread, sync front end) and the real file
job (`operators.run_job`: Parquet parts, the look-ahead window, result columns) on the CPU, with
the model runner replaced by a stub "device": launching a step returns at once, collecting it
waits until `--step-ms` after the previous step finished (what a GPU's decode step looks like
to the host, ~2 ms for Qwen2.5-0.5B at 256 rows on an H200). Every request samples token 1.
So the wall time is the device time of the steps run, plus whatever host work the overlap
schedule could not hide, and the step count shows how full the batches were: all rows
submitted at once (`gen`) is the reference.

    python benchmarks/job_stub_device.py [--rows 2000] [--files 16] [--step-ms 2] [--runs gen,2,8] [--page-size 16] [--json out.json]

Runs: `gen` (one Engine.generate over every row), or a window size N (run_job(window=N)).
The workload is one of workloads.json ("random" by default) with the real vocabulary (ids
shifted per copy of it, so copies share no prefix), written as --files Parquet files; a part never spans two files,
so small files cut the window's batches short. Page size 16, 256 running requests (--max-running-requests), a KV pool
of --pool-tokens tokens (a full pool makes the radix cache evict on most steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from engine_host_profile import TINY_QWEN2  # noqa: E402
from host_overhead import stub_tokens  # noqa: E402
from multi_gpu_scaling import write_workload  # noqa: E402
from offline_throughput import make_workload  # noqa: E402


class StubDevice:
    """A model runner whose steps take step_s of "device" time each, back to back, off the host."""

    timer = None

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.ready = 0.0  # when the last launched step finishes

    def launch(self, batch):
        self.ready = max(time.perf_counter(), self.ready) + self.step_s
        return SimpleNamespace(batch=batch, ready=self.ready,
                               tokens=stub_tokens(batch))

    def collect(self, step):
        wait = step.ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # releases the GIL, as waiting on a CUDA event does
        return step.tokens

    def run(self, batch):
        return self.collect(self.launch(batch))

    def on_idle(self):
        pass


def time_schedule(scheduler) -> list[float]:
    """Wrap scheduler.schedule to add its wall time to the returned one-element list: the
    scheduler's share of the host work, which the stub device cannot hide forever."""
    total = [0.0]
    schedule = scheduler.schedule

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return schedule(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t

    scheduler.schedule = timed
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs", "qwen2.5-0.5b"),
                    help="model directory whose vocabulary the prompts use")
    ap.add_argument("--workload", default="random", help="a workload of workloads.json")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--step-ms", type=float, default=2.0)
    ap.add_argument("--pool-tokens", type=int, default=1_500_000)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-running-requests", type=int, default=256,
                    help="(1024: a GPU engine's default on an H200; pair it with that step time, ~3.5 ms)")
    ap.add_argument("--runs", default="gen,2,8", help="comma-separated: gen or a window size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from pipeline_infer.operators import GenerateOp, run_job

    vocab = json.load(open(os.path.join(args.config, "config.json")))["vocab_size"]
    work = tempfile.mkdtemp(prefix="job-stub-")
    model = os.path.join(work, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({**TINY_QWEN2, "vocab_size": vocab}, f)
    inp = os.path.join(work, "in")
    os.makedirs(inp)
    base = len(make_workload(args.workload, vocab, None))
    rows, out_tokens = write_workload(inp, model, -(-args.rows // base), min(args.rows, base), args.files,
                                      workload=args.workload)
    options = {"load_format": "dummy", "skip_tokenizer_init": True, "device": "cpu", "random_seed": 0,
               "page_size": args.page_size, "max_running_requests": args.max_running_requests, "max_total_tokens": args.pool_tokens,
               "disable_overlap_schedule": False}
    op = GenerateOp(input_ids_column="input_ids", sampling_params_column="params", model=model,
                    engine_options=options, output_ids=True)
    engine = op.engine
    engine._core.runner = StubDevice(args.step_ms / 1e3)  # between steps: the engine is idle
    sched_s = time_schedule(engine._scheduler)
    import pyarrow.parquet as pq

    ids = params = None
    if "gen" in args.runs.split(","):
        # Only the `gen` run needs the rows as Python lists: millions of list items the cyclic
        # GC would otherwise walk in every full collection of the file-job runs too.
        table = pq.read_table(inp)
        ids = table["input_ids"].to_pylist()
        params = [json.loads(p) for p in table["params"].to_pylist()]
    print(f"{rows} rows in {args.files} files, {out_tokens} output tokens, stub step {args.step_ms} ms")
    results = []
    for run in args.runs.split(","):
        times, steps, scheds = [], [], []
        for k in range(args.repeats):
            engine.flush_cache()
            s0, t = engine._core.num_steps, time.perf_counter()
            sched_s[0] = 0.0
            if run == "gen":
                engine.generate(input_ids=ids, sampling_params=params)
            else:
                run_job(op, inp, os.path.join(work, f"out-{run}-{k}"), window=int(run), progress=False, resume=False)
            times.append(time.perf_counter() - t)
            steps.append(engine._core.num_steps - s0)
            scheds.append(sched_s[0])
        wall, n = statistics.median(times), statistics.median(steps)
        r = {"run": run, "rows": rows, "files": args.files, "step_ms": args.step_ms, "wall_s": round(wall, 3),
             "walls": [round(x, 3) for x in times], "steps": n, "ms_per_step": round(wall / n * 1e3, 3),
             "device_s": round(n * args.step_ms / 1e3, 3), "schedule_s": round(statistics.median(scheds), 3)}
        results.append(r)
        label = "all rows at once" if run == "gen" else f"file job, window {run}"
        print(f"{label:22} {wall:7.2f} s  {n:6d} steps  {r['ms_per_step']:.2f} ms/step  "
              f"(device {r['device_s']:.2f} s; schedule() {r['schedule_s']:.2f} s; runs {r['walls']})", flush=True)
    engine.shutdown()
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
