"""CPU throughput: pipeline-infer vs HF transformers `generate`, measured in the same run.

Workload (issue 2): the bundled SmolLM2-135M-Instruct, 32 prompts of 16 to 256 tokens,
64 new tokens each, greedy. HF gets the same prompts as one left-padded batch. Both
generate exactly 64 tokens per prompt (EOS ignored) so the work is identical.
Each side runs `--repeats` times after a warm-up, interleaved (ours, HF, ours, HF, ...) so
drift in machine load hits both; the medians are reported, with every run's time and how many
prompts got the same greedy tokens from both.

    python benchmarks/cpu_vs_hf.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch


def make_prompts(vocab_size: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // (n - 1) for i in range(n)]  # evenly spread 16..256
    rng.shuffle(lengths)
    return [[rng.randrange(100, vocab_size) for _ in range(L)] for L in lengths]


def cpu_name() -> str:
    """The CPU's model name as lscpu prints it (falls back to platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def run_ours(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    t = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    assert all(len(o["output_ids"]) == new_tokens for o in outs)
    return dt, [o["output_ids"] for o in outs]


def run_hf(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[float, list[list[int]]]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    dt = time.perf_counter() - t
    assert out.shape[1] == longest + new_tokens
    return dt, out[:, longest:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from pipeline_infer import Engine

    llm = Engine(disable_radix_cache=True)  # random prompts share nothing; keep the comparison plain
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    prompts = make_prompts(llm.vocab_size, args.num_prompts, args.min_len, args.max_len, seed=0)
    warm = prompts[:4]
    run_ours(llm, warm, 4)
    run_hf(hf, warm, 4, pad_id=0)

    ours, theirs = [], []
    ours_out = hf_out = None
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        dt, ours_out = run_ours(llm, prompts, args.new_tokens)
        ours.append(dt)
        dt, hf_out = run_hf(hf, prompts, args.new_tokens, pad_id=0)
        theirs.append(dt)
        print(f"repeat {len(ours)}/{args.repeats}: ours {ours[-1]:.2f} s, HF {dt:.2f} s", file=sys.stderr, flush=True)
    llm.shutdown()

    out_tokens = args.num_prompts * args.new_tokens
    result = {
        "workload": f"{args.num_prompts} prompts of {args.min_len}-{args.max_len} tokens, {args.new_tokens} new, greedy",
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "repeats": args.repeats,
        # Same greedy tokens as HF for the whole output (HF's min_new_tokens masks EOS where
        # ignore_eos does not, and fp32 near-ties can flip late tokens: informative, not a check).
        "prompts_with_identical_outputs": sum(a == b for a, b in zip(ours_out, hf_out)),
        "ours_s": ours,
        "hf_s": theirs,
        "ours_median_s": statistics.median(ours),
        "hf_median_s": statistics.median(theirs),
        "ours_tok_s": out_tokens / statistics.median(ours),
        "hf_tok_s": out_tokens / statistics.median(theirs),
    }
    result["speedup"] = result["hf_median_s"] / result["ours_median_s"]
    # Each repeat's HF/ours ratio (the two runs are back to back, so they see nearly the same
    # machine load): robust where the load drifts across repeats.
    result["paired_speedups"] = [h / o for o, h in zip(ours, theirs)]
    print(f"{'engine':<16}{'median s':>10}{'output tok/s':>14}   runs")
    print(f"{'pipeline-infer':<16}{result['ours_median_s']:>10.2f}{result['ours_tok_s']:>14.1f}   {[round(x, 2) for x in ours]}")
    print(f"{'HF generate':<16}{result['hf_median_s']:>10.2f}{result['hf_tok_s']:>14.1f}   {[round(x, 2) for x in theirs]}")
    print(f"speedup: {result['speedup']:.2f}x of the medians, "
          f"{statistics.median(result['paired_speedups']):.2f}x median of the repeats' ratios "
          f"{[round(x, 2) for x in result['paired_speedups']]}; identical greedy outputs for "
          f"{result['prompts_with_identical_outputs']}/{args.num_prompts} prompts; {result['device']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
