"""CPU throughput: pipeline-infer vs HF transformers `generate`, measured in the same run.

Workload (issue 2): the bundled SmolLM2-135M-Instruct, 32 prompts of 16 to 256 tokens,
64 new tokens each, greedy. HF gets the same prompts as one left-padded batch. Both
generate exactly 64 tokens per prompt (EOS ignored) so the work is identical.
Each side runs `--repeats` times after a warm-up; the medians are reported.

    python benchmarks/cpu_vs_hf.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch


def make_prompts(vocab_size: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // (n - 1) for i in range(n)]  # evenly spread 16..256
    rng.shuffle(lengths)
    return [[rng.randrange(100, vocab_size) for _ in range(L)] for L in lengths]


def run_ours(llm, prompts: list[list[int]], new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    t = time.perf_counter()
    outs = llm.generate(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    assert all(len(o["output_ids"]) == new_tokens for o in outs)
    return dt


def run_hf(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
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
    return dt


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
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
        ours.append(run_ours(llm, prompts, args.new_tokens))
        theirs.append(run_hf(hf, prompts, args.new_tokens, pad_id=0))
    llm.shutdown()

    out_tokens = args.num_prompts * args.new_tokens
    result = {
        "workload": f"{args.num_prompts} prompts of {args.min_len}-{args.max_len} tokens, {args.new_tokens} new, greedy",
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "ours_s": ours,
        "hf_s": theirs,
        "ours_median_s": statistics.median(ours),
        "hf_median_s": statistics.median(theirs),
        "ours_tok_s": out_tokens / statistics.median(ours),
        "hf_tok_s": out_tokens / statistics.median(theirs),
    }
    result["speedup"] = result["hf_median_s"] / result["ours_median_s"]
    print(f"{'engine':<16}{'median s':>10}{'output tok/s':>14}   runs")
    print(f"{'pipeline-infer':<16}{result['ours_median_s']:>10.2f}{result['ours_tok_s']:>14.1f}   {[round(x, 2) for x in ours]}")
    print(f"{'HF generate':<16}{result['hf_median_s']:>10.2f}{result['hf_tok_s']:>14.1f}   {[round(x, 2) for x in theirs]}")
    print(f"speedup: {result['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
