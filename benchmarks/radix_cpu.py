"""Radix prefix cache on vs off, CPU, on the shared-prefix workload scaled down (issue 3).

Workload: ../shared/bench/workloads.json "shared-prefix" (ids drawn with
numpy.random.default_rng(seed) uniformly from [1000, vocab_size - 1000), each group's prompts
share one prefix draw then get a fresh suffix, prompts shuffled across groups, ignore_eos,
temperature 0, max_new_tokens = the prompt's output_len), scaled down for the CPU by default
to 4 groups x 8 prompts, a 512-token prefix, 32-128 token suffixes, 16-32 new tokens.

Model: the bundled SmolLM2-135M-Instruct (`Engine()`), float32 on the CPU.

Two engines, identical but for `disable_radix_cache`, each with a KV pool that holds the whole
batch at once (so memory limits neither side), are timed interleaved (on, off, on, off,
...) so drift in machine load hits both; the radix cache is flushed before each timed run so
every run starts cold (the first prompt of each group computes the prefix). Reports each
side's median wall time from submit to the last result, the ratio off/on, and whether greedy
outputs agree token for token.

    python benchmarks/radix_cpu.py [--repeats 3] [--policy auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# The shared copy next to the checkout first, then the copy bundled with the benchmarks.
_WORKLOADS = [os.path.join(_HERE, "..", "..", "shared", "bench", "workloads.json"), os.path.join(_HERE, "workloads.json")]
# Used when neither file exists (the files' "shared-prefix" entry).
_FALLBACK = {"seed": 1, "num_groups": 32, "prompts_per_group": 32, "prefix_len": 1024, "suffix_len": [32, 128],
             "output_len": [128, 256]}


def load_workload(paths: list[str]) -> tuple[dict, str]:
    """(the "shared-prefix" spec, where it came from)."""
    for path in paths:
        try:
            with open(path) as f:
                return json.load(f)["workloads"]["shared-prefix"], os.path.normpath(path)
        except OSError:
            continue
    return dict(_FALLBACK), "built-in copy of workloads.json"


def make_workload(spec: dict, vocab_size: int) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompts, output lengths, group of each prompt), shuffled across groups."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    lo, hi = 1000, vocab_size - 1000
    items = []
    for g in range(spec["num_groups"]):
        prefix = rng.integers(lo, hi, size=spec["prefix_len"]).tolist()
        for _ in range(spec["prompts_per_group"]):
            n_suffix = int(rng.integers(spec["suffix_len"][0], spec["suffix_len"][1] + 1))
            suffix = rng.integers(lo, hi, size=n_suffix).tolist()
            out_len = int(rng.integers(spec["output_len"][0], spec["output_len"][1] + 1))
            items.append((prefix + suffix, out_len, g))
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    return [p for p, _, _ in items], [n for _, n, _ in items], [g for _, _, g in items]


def timed_run(llm, prompts: list[list[int]], out_lens: list[int]) -> tuple[float, list[dict]]:
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in out_lens]
    llm.flush_cache()  # cold start: nothing cached from the previous run
    t = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    assert [len(o["output_ids"]) for o in outs] == out_lens
    return dt, outs


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--suffix-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default="auto", choices=["auto", "fcfs", "lpm", "batch"],
                    help="schedule_policy (default: the engine's, which runs a list submission as 'batch')")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool size of each engine (default: the whole batch's worst case, prompts plus outputs)")
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--workloads", default=None, help="path to workloads.json (default: ../shared/bench, then benchmarks/)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import torch

    from pipeline_infer import Engine

    spec, source = load_workload([args.workloads] if args.workloads else _WORKLOADS)
    spec.update(num_groups=args.groups, prompts_per_group=args.per_group, prefix_len=args.prefix_len,
                suffix_len=list(args.suffix_len), output_len=list(args.output_len))
    pool = args.max_total_tokens or args.groups * args.per_group * (
        args.prefix_len + args.suffix_len[1] + args.output_len[1] + args.page_size
    )
    common = dict(page_size=args.page_size, schedule_policy=args.policy, random_seed=0, max_total_tokens=pool)
    engines = {
        "radix_on": Engine(args.model, disable_radix_cache=False, **common),
        "radix_off": Engine(args.model, disable_radix_cache=True, **common),
    }
    prompts, out_lens, groups = make_workload(spec, engines["radix_on"].vocab_size)
    for llm in engines.values():  # warm-up: first-call allocations, thread start-up
        timed_run(llm, prompts[:2], [2, 2])

    times: dict[str, list[float]] = {k: [] for k in engines}
    outputs: dict[str, list[list[list[int]]]] = {k: [] for k in engines}  # per engine, per repeat
    cached: list[int] = []
    for rep in range(args.repeats):
        for name, llm in engines.items():
            dt, outs = timed_run(llm, prompts, out_lens)
            times[name].append(dt)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {dt:.2f} s", file=sys.stderr, flush=True)
            outputs[name].append([o["output_ids"] for o in outs])
            if name == "radix_on":
                cached = [o["meta_info"]["cached_tokens"] for o in outs]
    info = engines["radix_on"].get_server_info()
    for llm in engines.values():
        llm.shutdown()

    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(out_lens)
    uncached_per_group = [sum(1 for c, g in zip(cached, groups) if g == k and c == 0) for k in range(spec["num_groups"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "workload": {
            "source": f"{source} shared-prefix, scaled down",
            **spec,
            "num_prompts": len(prompts),
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
        },
        "model": info["model_dir"],
        "policy": args.policy,
        "page_size": args.page_size,
        "max_total_tokens": pool,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "runs_s": times,
        "median_s": med,
        "total_tok_s": {k: (prompt_tokens + output_tokens) / v for k, v in med.items()},
        "output_tok_s": {k: output_tokens / v for k, v in med.items()},
        "speedup_on_vs_off": med["radix_off"] / med["radix_on"],
        # Each repeat's off/on ratio (the two runs of a repeat are back to back, so they see
        # nearly the same machine load): robust where the load drifts across repeats.
        "paired_speedups": [off / on for on, off in zip(times["radix_on"], times["radix_off"])],
        "cached_tokens_total": sum(cached),
        "requests_with_cached_tokens": sum(1 for c in cached if c > 0),
        "requests_without_cached_tokens": sum(1 for c in cached if c == 0),
        # Done means: cached_tokens > 0 for all but the first request of each group to run.
        "one_uncached_request_per_group": all(n == 1 for n in uncached_per_group),
        "repeats": args.repeats,
        # Every repeat of both engines gave the same greedy tokens.
        "outputs_identical": all(run == outputs["radix_on"][0] for runs in outputs.values() for run in runs),
    }
    print(f"{len(prompts)} prompts ({spec['num_groups']} groups x {spec['prompts_per_group']}), "
          f"{prompt_tokens} prompt + {output_tokens} output tokens, policy {args.policy}, page_size {args.page_size}")
    print(f"{'radix cache':<12}{'median s':>10}{'total tok/s':>13}   runs")
    for k in engines:
        print(f"{k:<12}{med[k]:>10.2f}{result['total_tok_s'][k]:>13.1f}   {[round(x, 2) for x in times[k]]}")
    print(f"speedup (off / on): {result['speedup_on_vs_off']:.2f}x of the medians, "
          f"{statistics.median(result['paired_speedups']):.2f}x median of the repeats' ratios "
          f"{[round(x, 2) for x in result['paired_speedups']]}; cached tokens {sum(cached)}; "
          f"requests with a cache hit {result['requests_with_cached_tokens']}/{len(prompts)} "
          f"(one uncached per group: {result['one_uncached_request_per_group']}); "
          f"outputs identical: {result['outputs_identical']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
