"""One engine, one file job after another: does the job's rate hold up as the engine ages? (issue 9)

Writes the "random" workload (`--copies` copies, ids shifted per copy so no prompts share a
prefix) as Parquet, builds one GenerateOp (its engine starts once, on a warm-up of 256 rows),
then runs `operators.run_job` over the whole input once per entry of `--windows`, in this
process, timing each; then the same job in a fresh process (start-up included), the way
`pipeline-infer generate` runs it. A job that is slower the second time over the same rows,
on the same engine, points at state that grows with the engine's age (the KV pool filling, the
prefix cache evicting, queues and tables that grow); docs/benchmarks.md has the run that found
one.

    python benchmarks/job_rate_over_time.py --model benchmarks/configs/qwen2.5-0.5b --copies 8 \
        [--windows 2,4,8,2] [--json out.json] [--tokenizer DIR [--incremental-text]]

With --tokenizer the model (still random weights) gets a tokenizer, so the job also writes
generated text, which the engine detokenizes on its thread: the cost a text dataset pays.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from multi_gpu_scaling import read_rows, write_workload  # noqa: E402

_FRESH = (
    "import json, sys, time; t = time.perf_counter(); "
    "from pipeline_infer.operators import GenerateOp, run_job; "
    "op = GenerateOp(input_ids_column='input_ids', sampling_params_column='params', model=sys.argv[1], "
    "engine_options=json.loads(sys.argv[2]), output_ids=True); "
    "run_job(op, sys.argv[3], sys.argv[4], window=int(sys.argv[5]), progress=False, resume=False); "
    "print(time.perf_counter() - t)"
)


class JobProbe:
    """--breakdown: what one job did inside the engine (step timing, engine counters), how long
    the cyclic GC stopped the process, and where the engine thread and this (caller) thread
    spent their time."""

    def __init__(self, engine):
        from thread_sampler import ThreadSampler

        self.engine = engine
        self.samplers = [ThreadSampler("pipeline-infer-engine", 0.005), ThreadSampler("MainThread", 0.005)]
        self.gc_pauses: list[tuple[int, float]] = []
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t = time.perf_counter()
        else:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_t))

    def start(self) -> None:
        self.engine.step_timing_summary(reset=True)
        self.info0 = self.engine.get_server_info()
        self.gc_pauses.clear()
        for s in self.samplers:
            s.start()

    def stop(self, wall_s: float) -> dict:
        from offline_throughput import print_breakdown

        for s in self.samplers:
            s.stop()
        b = self.engine.step_timing_summary(reset=True)
        info = self.engine.get_server_info()
        counters = {k: info[k] - self.info0[k] for k in ("num_steps", "num_generated_tokens", "num_retractions")}
        gen2 = [p for g, p in self.gc_pauses if g == 2]
        gc_s = {"all_s": round(sum(p for _, p in self.gc_pauses), 3), "gen2_count": len(gen2),
                "gen2_s": round(sum(gen2), 3), "gen2_max_s": round(max(gen2, default=0.0), 3)}
        print_breakdown(b, wall_s)
        print(f"  engine: {counters}; GC pauses: {gc_s}")
        for s in self.samplers:
            print(s.report())
        return {"steps": b, "counters": counters, "gc": gc_s,
                "samples": {s.thread_name: dict(s.counts.most_common(30)) for s in self.samplers}}


def with_tokenizer(model: str, tokenizer: str, target: str) -> str:
    """A copy of model's config.json with the tokenizer's files and vocabulary size, in target."""
    import shutil

    from transformers import AutoTokenizer

    os.makedirs(target)
    config = json.load(open(os.path.join(model, "config.json")))
    config["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer))
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(tokenizer):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or name.endswith(".jinja"):
            shutil.copy(os.path.join(tokenizer, name), target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with config.json (random weights are used)")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--windows", default="2,4,8,2", help="one in-process job per entry, in order")
    ap.add_argument("--fresh-window", type=int, default=2, help="window of the fresh-process job (0: skip it)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="per job: the engine's step timing, GC pauses, and where the engine and caller threads spent "
                         "their time (sampled)")
    ap.add_argument("--max-running-requests", type=int, default=None, help="engine option (default: the engine's)")
    ap.add_argument("--gil-switch-ms", type=float, default=None,
                    help="the GIL switch interval a CUDA engine sets while it runs (default 0.5; 5 is Python's own)")
    ap.add_argument("--tokenizer", default=None,
                    help="a folder with a Hugging Face tokenizer: the model gets it (and its vocabulary size), so the job "
                         "also writes generated text, detokenized by the engine")
    ap.add_argument("--incremental-text", action="store_true",
                    help="with --tokenizer: detokenize token by token as streams do (the engine's way before 820bf66)")
    args = ap.parse_args()

    import torch

    if args.gil_switch_ms is not None:
        from pipeline_infer import engine_setup

        engine_setup.GIL_SWITCH_INTERVAL_S = args.gil_switch_ms / 1000

    from pipeline_infer.operators import GenerateOp, run_job

    options = {"load_format": "dummy", "random_seed": 0}
    if torch.cuda.is_available():
        options["attention_backend"] = "triton"
    if args.breakdown:
        options["enable_step_timing"] = True
    if args.max_running_requests:
        options["max_running_requests"] = args.max_running_requests
    work = tempfile.mkdtemp(prefix="job-age-")
    if args.tokenizer:
        args.model = with_tokenizer(args.model, args.tokenizer, os.path.join(work, "model"))
        if args.incremental_text:
            from pipeline_infer import tokenizer as tokenizer_module

            class Incremental(tokenizer_module.IncrementalDetokenizer):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **{**kw, "incremental": True})

            tokenizer_module.IncrementalDetokenizer = Incremental  # the engine imports it per request
    inp = os.path.join(work, "in")
    os.makedirs(inp)
    rows, out_tokens = write_workload(inp, args.model, args.copies, None, args.files)
    print(f"{rows} rows, {out_tokens} output tokens", flush=True)
    op = GenerateOp(input_ids_column="input_ids", sampling_params_column="params", model=args.model,
                    engine_options=options, output_ids=True)
    t = time.perf_counter()
    run_job(op, inp, os.path.join(work, "warm-up"), limit=256, progress=False, resume=False)
    print(f"engine start-up + 256 rows: {time.perf_counter() - t:.1f} s", flush=True)
    probe = JobProbe(op.engine) if args.breakdown else None
    results = []
    for k, w in enumerate(int(x) for x in args.windows.split(",")):
        out = os.path.join(work, f"out-{k}")
        if probe:
            probe.start()
        t = time.perf_counter()
        run_job(op, inp, out, window=w, progress=False, resume=False)
        s = time.perf_counter() - t
        if probe:
            results.append({"job": k, "breakdown": probe.stop(s)})
        assert len(read_rows(out)) == rows
        results.append({"job": k, "process": "same", "window": w, "wall_s": round(s, 2),
                        "output_tok_s": round(out_tokens / s)})
        print(f"job {k} (same process), window {w}: {s:.1f} s, {out_tokens / s:,.0f} output tok/s", flush=True)
    if args.fresh_window:
        out = os.path.join(work, "out-fresh")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _FRESH, os.path.abspath(args.model), json.dumps(options), inp,
                               out, str(args.fresh_window)], capture_output=True, text=True, check=True)
        s = time.perf_counter() - t
        assert len(read_rows(out)) == rows
        inside = float(proc.stdout.strip().splitlines()[-1])
        results.append({"job": len(results), "process": "fresh", "window": args.fresh_window, "wall_s": round(s, 2),
                        "inside_s": round(inside, 2)})
        print(f"fresh process, window {args.fresh_window}: {s:.1f} s with start-up ({inside:.1f} s inside)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "output_tokens": out_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
