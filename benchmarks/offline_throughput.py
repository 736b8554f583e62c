"""Offline throughput on the workloads of ../shared/bench/workloads.json, with a same-run peer and floor.

For each workload: our engine's wall time (median of --repeats runs on a warm engine), output and
total tokens/s; the device's measured copy bandwidth and bf16 matmul rate; the workload's floor
(benchmarks/roofline.py) and our time as a percentage of it; with --peer hf, HF transformers
generate on the same weights and ids (optionally on the first --peer-num-prompts requests, with
ours re-run on the same subset for the ratio). Results append to --json; --plot draws them all.

    python benchmarks/offline_throughput.py --model benchmarks/configs/qwen2.5-0.5b --workload random \
        --num-prompts 1000 --repeats 3 [--peer hf] [--breakdown] [--json out.json --plot out.png]

--breakdown also prints and saves (key "breakdown") where the engine's steps spent their time:
device busy (forward + sample) vs host (schedule, batch build + plan, commit + outputs, other),
overall and per step kind (decode / prefill / mixed), for the repeat with the median wall time,
and the device's idle time before the steps' work (on CUDA: the host work the device waited for).
--steps-json PATH (with --breakdown) writes every step of every repeat (kind, batch size, tokens,
times in ms, idle included) by workload: where in a run the time went, e.g. by batch size.

Random bf16 weights on the real model shape (load_format="dummy"). Each request: ignore_eos,
greedy, max_new_tokens = its output_len. Reports wall seconds from first submit to last
result, output and total tokens/s; medians over --repeats runs (each on a warm engine).
The peer follows the workload's "peer" rule: prompts sorted by length, batches of 64, left
padding, min_new_tokens = max_new_tokens = the batch's largest output_len, only each request's
own output_len counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = os.path.join(HERE, "workloads.json")  # copy of ../shared/bench/workloads.json


def make_workload(name: str, vocab: int, num_prompts: int | None, path: str = WORKLOADS):
    spec = json.load(open(path))["workloads"][name]
    rng = np.random.default_rng(spec["seed"])
    lo, hi = 1000, vocab - 1000

    def draw(n):
        return rng.integers(lo, hi, size=n).tolist()

    def between(r):
        return int(rng.integers(r[0], r[1] + 1))

    reqs = []
    if name == "shared-prefix":
        for _ in range(spec["num_groups"]):
            prefix = draw(spec["prefix_len"])
            for _ in range(spec["prompts_per_group"]):
                reqs.append((prefix + draw(between(spec["suffix_len"])), between(spec["output_len"])))
        order = rng.permutation(len(reqs))
        reqs = [reqs[i] for i in order]
    else:
        for _ in range(spec["num_prompts"]):
            reqs.append((draw(between(spec["prompt_len"])), between(spec["output_len"])))
    return reqs[:num_prompts] if num_prompts else reqs


def run_ours(model_dir, reqs, repeats, breakdowns=None, engine_info=None, host_checks=None, step_records=False, **opts):
    """Wall seconds of each repeat; with breakdowns (a list), each repeat's step timing is appended;
    with engine_info (a dict), it receives the engine's get_server_info() (its resolved settings);
    with host_checks (a list), measure_host() taken just before each repeat is appended (the
    device machines' hosts have changed speed by 2x between one repeat and the next); with
    step_records, each breakdown holds every step's record too ("step_records")."""
    from pipeline_infer import Engine

    ids = [p for p, _ in reqs]
    sps = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for _, o in reqs]
    walls = []
    with Engine(model_dir, load_format="dummy", enable_step_timing=breakdowns is not None, **opts) as llm:
        llm.generate(input_ids=ids[:8], sampling_params=sps[:8])  # warm-up
        llm.flush_cache()  # else the first repeat finds the warm-up's prompts cached, the others not
        if engine_info is not None:
            engine_info.update(llm.get_server_info())
        if breakdowns is not None:
            llm.step_timing_summary(reset=True)  # drop the warm-up's steps
        for _ in range(repeats):
            if host_checks is not None:
                host_checks.append(measure_host(repeats=3))
            t = time.perf_counter()
            outs = llm.generate(input_ids=ids, sampling_params=sps)
            walls.append(time.perf_counter() - t)
            assert all(len(o["output_ids"]) == o_len for o, (_, o_len) in zip(outs, reqs))
            if breakdowns is not None:
                breakdowns.append(llm.step_timing_summary(reset=True, steps=step_records))
            llm.flush_cache()
    return walls


def print_breakdown(b: dict, wall_s: float) -> None:
    """The step timing of one run (Engine.step_timing_summary()) as a small table."""
    print(f"  step breakdown: {b['steps']} steps, {b['wall_s']:.2f} s in steps of the run's {wall_s:.2f} s "
          f"(span {b['span_s']:.2f} s); device = forward + sample (on CUDA the stream span), host = the rest of each step; "
          f"idle = the device's idle time before the steps' work (CUDA)")
    print(f"  {'steps':<8} {'n':>6} {'wall s':>8} {'device s':>9} {'%':>5} {'host s':>8} {'%':>5} "
          f"{'sched s':>8} {'build s':>8} {'post s':>7} {'other s':>8} {'idle s':>7}   median ms: {'step':>7} {'device':>7} {'host':>7}")
    for name, k in [("all", b)] + list(b["by_kind"].items()):
        if not k["steps"]:
            continue
        print(f"  {name:<8} {k['steps']:>6} {k['wall_s']:>8.2f} {k['device_s']:>9.2f} {k['device_pct']:>5.1f} "
              f"{k['host_s']:>8.2f} {k['host_pct']:>5.1f} {k['schedule_s']:>8.2f} {k['build_s']:>8.2f} "
              f"{k['post_s']:>7.2f} {k['other_host_s']:>8.2f} {k['idle_s']:>7.2f}   {'':>10} {k['median_step_ms']:>7.2f} "
              f"{k['median_device_ms']:>7.2f} {k['median_host_ms']:>7.2f}")


def breakdown_totals(b: dict) -> dict:
    """One repeat's step timing cut to its totals by step kind (seconds, to the millisecond)."""
    keys = ("steps", "wall_s", "device_s", "host_s", "schedule_s", "build_s", "post_s", "idle_s")
    out = {"span_s": round(b["span_s"], 3), "wall_s": round(b["wall_s"], 3)}
    out["by_kind"] = {kind: {k: round(v[k], 3) for k in keys} for kind, v in b["by_kind"].items() if v["steps"]}
    return out


def run_hf(model_dir, reqs, repeats, batch=64):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))
    groups = [[reqs[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]

    def run_group(group, new_tokens=None):
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, (p, _) in enumerate(group):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        n = new_tokens or max(o for _, o in group)
        with torch.no_grad():
            model.generate(
                input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )
        return width, n

    # Untimed warm-up (CUDA context, cuBLAS handles, kernel caches), as ours gets one, at each
    # batch size the run meets (a full batch and the last one). After a one-row warm-up, HF's
    # first 64-row batch took 41 s and its last (40 rows) 35 s, the others 12-17 s. Part of that
    # may be set-up per new shape along the way, which 8 tokens do not reach: --peer-repeats > 1.
    for group in {len(g): g for g in groups}.values():
        run_group(group, new_tokens=8)
    walls = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for k, group in enumerate(groups):
            tb = time.perf_counter()
            width, n = run_group(group)
            # Progress: a whole workload takes HF minutes.
            print(f"  HF batch {k}: {len(group)} prompts up to {width} tokens, {n} new, "
                  f"{time.perf_counter() - tb:.2f} s", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return walls


def summary(walls, reqs):
    wall = statistics.median(walls)
    out_tok = sum(o for _, o in reqs)
    total = out_tok + sum(len(p) for p, _ in reqs)
    return {"wall_s": round(wall, 3), "walls": [round(w, 3) for w in walls],
            "output_tok_s": round(out_tok / wall, 1), "total_tok_s": round(total / wall, 1)}


def measure_device() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, medians."""
    import torch

    def median_ms(fn, reps=10):
        fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * n / (median_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm = 2 * m**3 / (median_ms(lambda: x @ y) * 1e-3)
    return {"name": torch.cuda.get_device_name(), "copy_Bps": copy, "matmul_flops": mm}


def measure_host(repeats: int = 7) -> dict:
    """How fast this host runs Python, in microseconds (medians): a list comprehension over
    1,024 ints and a sort of 1,024 floats. The scheduler, the batch building and the front end
    are Python; the GPU machines' hosts have run these 2-3x slower than the 2-core CPU the
    host work is tuned on, and host-bound steps move with them, so every result records it
    next to the device's rates (compare runs of different sessions by it)."""
    import random
    import timeit

    rng = random.Random(0)
    ints = list(range(1024))
    floats = [rng.random() for _ in range(1024)]

    def per_call_us(stmt: str, number: int = 200) -> float:
        times = timeit.repeat(stmt, globals={"ints": ints, "floats": floats}, number=number, repeat=repeats)
        return round(statistics.median(times) / number * 1e6, 2)

    return {"listcomp_us": per_call_us("[i + 1 for i in ints]"), "sort_us": per_call_us("sorted(floats)")}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['workload']}\n{r['config']}"
              + (f"\n{r['max_running_requests']} running" if r.get("max_running_requests") else "") for r in results]
    tok = [r["ours"]["output_tok_s"] for r in results]
    pct = [r.get("pct_of_floor", 0) for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(results)), 4.5))
    a.bar(range(len(tok)), tok, color="tab:blue")
    peers = [i for i, r in enumerate(results) if "peer_hf" in r]
    for i in peers:
        a.bar(i, results[i]["peer_hf"]["output_tok_s"], color="tab:orange", width=0.4,
              label="HF generate" if i == peers[0] else None)
    if peers:
        a.legend(fontsize=7)
    a.set_xticks(range(len(tok)), labels, fontsize=7)
    a.set_ylabel("output tokens/s")
    a.set_title("throughput (median of runs)")
    b.bar(range(len(pct)), pct, color="tab:green")
    b.set_xticks(range(len(pct)), labels, fontsize=7)
    b.set_ylabel("% of computed floor")
    b.set_title("floor time / our time")
    fig.suptitle(f"{results[0]['device']}, {results[0]['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with config.json (random weights are used)")
    ap.add_argument("--workload", default="random", help="comma-separated names from workloads.json")
    ap.add_argument("--num-prompts", type=int, default=None, help="only the first N requests of each workload")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", choices=["hf"], default=None, help="also time HF transformers generate")
    ap.add_argument("--peer-repeats", type=int, default=None,
                    help="HF runs (default --repeats): on a whole workload one takes minutes")
    ap.add_argument("--peer-num-prompts", type=int, default=None,
                    help="peer (and ours again, for the ratio) on the first N requests only")
    ap.add_argument("--backend", default=None, help="attention backend (default: the engine's choice)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-running-requests", type=int, default=None)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--disable-cascade-attn", action="store_true",
                    help="Engine(enable_cascade_attn=False): decode rows read a shared cached prefix each (on by default)")
    ap.add_argument("--no-mixed-chunk", action="store_true",
                    help="Engine(enable_mixed_chunk=False): prefill-only or decode-only steps")
    ap.add_argument("--disable-extend-cuda-graph", action="store_true",
                    help="Engine(disable_extend_cuda_graph=True): prefill and mixed steps run eagerly")
    ap.add_argument("--disable-overlap-schedule", action="store_true",
                    help="Engine(disable_overlap_schedule=True): collect each step's tokens before the next")
    ap.add_argument("--chunked-prefill-size", type=int, default=None,
                    help="prefill tokens per step (the engine's default: 16384 on a GPU of >= 70 GiB, else 8192)")
    ap.add_argument("--admission-batch", type=int, default=None,
                    help="Engine(admission_batch=N); 1 admits as soon as a slot frees (default: the engine's)")
    ap.add_argument("--num-scheduler-steps", type=int, default=None,
                    help="Engine(num_scheduler_steps=N): decode steps a window runs from one schedule; 1: every "
                         "step scheduled (default: the engine's)")
    ap.add_argument("--breakdown", action="store_true",
                    help="per-step host vs device time (Engine(enable_step_timing=True)): print and save it")
    ap.add_argument("--steps-json", default=None,
                    help="with --breakdown: write every repeat's per-step records (kind, batch size, tokens, host "
                         "phases, device time, the device's idle time before the step; ms) to this file")
    ap.add_argument("--json", default=None, help="append results (a JSON list) to this file")
    ap.add_argument("--plot", default=None, help="PNG of every result in --json")
    args = ap.parse_args()

    sys.path.insert(0, HERE)
    from roofline import ModelShape, floor_seconds

    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(args.model, "config.json"), tmp)
    cfg = json.load(open(os.path.join(tmp, "config.json")))
    import torch

    if torch.cuda.is_available():
        device = measure_device()
        print(f"{device['name']}: copy {device['copy_Bps'] / 1e12:.2f} TB/s, bf16 matmul {device['matmul_flops'] / 1e12:.0f} TFLOP/s")
    else:  # a CPU run (a check of the harness on a small config): no device rates, no floor
        device = {"name": "cpu", "copy_Bps": None, "matmul_flops": None}
        print("no CUDA device: running on the CPU, without the floor")
    host = measure_host()
    print(f"host Python: 1,024-int list comprehension {host['listcomp_us']:.1f} us, sort of 1,024 floats {host['sort_us']:.1f} us")
    opts = dict(page_size=args.page_size, disable_cuda_graph=args.disable_cuda_graph,
                disable_radix_cache=args.disable_radix_cache, enable_mixed_chunk=not args.no_mixed_chunk)
    if args.backend:
        opts["attention_backend"] = args.backend
    if args.max_running_requests:
        opts["max_running_requests"] = args.max_running_requests
    if args.admission_batch:
        opts["admission_batch"] = args.admission_batch
    if args.num_scheduler_steps:
        opts["num_scheduler_steps"] = args.num_scheduler_steps
    if args.chunked_prefill_size:
        opts["chunked_prefill_size"] = args.chunked_prefill_size
    if args.disable_overlap_schedule:
        opts["disable_overlap_schedule"] = True
    if args.disable_extend_cuda_graph:
        opts["disable_extend_cuda_graph"] = True
    if args.disable_cascade_attn:
        opts["enable_cascade_attn"] = False
    config = ",".join(
        [args.backend or "auto"] + (["no-graphs"] if args.disable_cuda_graph else [])
        + (["no-radix"] if args.disable_radix_cache else [])
        + (["no-mixed"] if args.no_mixed_chunk else [])
        + ([f"admit{args.admission_batch}"] if args.admission_batch else [])
        + ([f"steps{args.num_scheduler_steps}"] if args.num_scheduler_steps else [])
        + ([f"chunk{args.chunked_prefill_size}"] if args.chunked_prefill_size else [])
        + (["no-overlap"] if args.disable_overlap_schedule else [])
        + (["no-extend-graphs"] if args.disable_extend_cuda_graph else [])
        + (["no-cascade"] if args.disable_cascade_attn else [])
    )
    shape = ModelShape.from_config(cfg)
    results = []
    step_runs: dict = {}  # --steps-json
    for workload in args.workload.split(","):
        reqs = make_workload(workload, cfg["vocab_size"], args.num_prompts)
        r = {"model": os.path.basename(os.path.normpath(args.model)), "workload": workload, "config": config,
             "num_prompts": len(reqs), "device": device["name"], "date": time.strftime("%Y-%m-%d"),
             "copy_TBps": round(device["copy_Bps"] / 1e12, 3) if device["copy_Bps"] else None,
             "matmul_TFLOPs": round(device["matmul_flops"] / 1e12, 1) if device["matmul_flops"] else None,
             "host_python": host}
        breakdowns = [] if args.breakdown else None
        info: dict = {}
        host_checks: list = []
        walls = run_ours(tmp, reqs, args.repeats, breakdowns=breakdowns, engine_info=info, host_checks=host_checks,
                         step_records=bool(args.steps_json), **opts)
        if args.steps_json and breakdowns:
            runs = [{"wall_s": round(w, 4), "steps": b.pop("step_records")} for w, b in zip(walls, breakdowns)]
            step_runs[workload] = {"config": config, "repeats": runs}
            with open(args.steps_json, "w") as f:  # every workload of the call so far, by name
                json.dump(step_runs, f)
        r["host_python_runs"] = host_checks  # before each repeat, in the order of ours["walls"]
        r["max_running_requests"] = info["max_running_requests"]
        r["chunked_prefill_size"] = info["chunked_prefill_size"]
        r["ours"] = summary(walls, reqs)
        if breakdowns:  # the repeat whose wall time is the median one reported
            r["breakdown"] = breakdowns[walls.index(sorted(walls)[(len(walls) - 1) // 2])]
            # Every repeat's totals by step kind, in the order of ours["walls"] (the first repeat
            # after start-up is often the slowest: this says in which steps).
            r["breakdown_runs"] = [breakdown_totals(b) for b in breakdowns]
        floor = None
        if device["copy_Bps"]:
            floor = floor_seconds(shape, reqs, info["max_running_requests"], device["copy_Bps"],
                                  device["matmul_flops"], prefix_sharing=not args.disable_radix_cache)
            r["floor"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in floor.items()}
            r["pct_of_floor"] = round(100 * floor["floor_s"] / r["ours"]["wall_s"], 1)
        if args.peer:
            peer_reqs = reqs[: args.peer_num_prompts] if args.peer_num_prompts else reqs
            r["peer_hf"] = summary(run_hf(tmp, peer_reqs, args.peer_repeats or args.repeats), peer_reqs)
            r["peer_hf"]["num_prompts"] = len(peer_reqs)
            ours_same = r["ours"] if len(peer_reqs) == len(reqs) else summary(run_ours(tmp, peer_reqs, args.repeats, **opts), peer_reqs)
            r["ours_on_peer_prompts"] = ours_same
            r["speedup_vs_hf"] = round(ours_same["output_tok_s"] / r["peer_hf"]["output_tok_s"], 2)
        results.append(r)
        line = (f"{r['model']:<14} {workload:<14} {config:<22} {r['num_prompts']:>5} prompts  "
                f"{r['ours']['wall_s']:>8.2f} s  {r['ours']['output_tok_s']:>9.0f} out tok/s  ")
        if floor:
            line += f"floor {floor['floor_s']:.2f} s ({r['pct_of_floor']:.0f}% of floor)"
        if args.peer:
            line += f"  HF {r['peer_hf']['output_tok_s']:.0f} out tok/s on {len(peer_reqs)} -> {r['speedup_vs_hf']:.1f}x"
        print(line, flush=True)
        print("  host Python before each repeat (list comprehension us): "
              + ", ".join(f"{h['listcomp_us']:.1f} ({w:.2f} s)" for h, w in zip(host_checks, walls)))
        if "breakdown" in r:
            print_breakdown(r["breakdown"], r["ours"]["wall_s"])
        if args.json:  # after each workload, so a cut-off run keeps what it measured
            old = json.load(open(args.json)) if os.path.exists(args.json) else []
            json.dump(old + [r], open(args.json, "w"), indent=1)
    if args.json and args.plot:
        plot(json.load(open(args.json)), args.plot)


if __name__ == "__main__":
    main()
