"""Offline throughput on a workload of ../shared/bench/workloads.json, with HF generate as the peer.

    python benchmarks/gpu_throughput.py --model benchmarks/configs/qwen2.5-0.5b --workload random \
        --num-prompts 1000 --repeats 3 [--peer] [--json out.json]

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


def run_ours(model_dir, reqs, repeats, **opts):
    from pipeline_infer import Engine

    ids = [p for p, _ in reqs]
    sps = [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for _, o in reqs]
    walls = []
    with Engine(model_dir, load_format="dummy", **opts) as llm:
        llm.generate(input_ids=ids[:8], sampling_params=sps[:8])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(input_ids=ids, sampling_params=sps)
            walls.append(time.perf_counter() - t)
            assert all(len(o["output_ids"]) == o_len for o, (_, o_len) in zip(outs, reqs))
            llm.flush_cache()
    return walls


def run_hf(model_dir, reqs, repeats, batch=64):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))
    walls = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(order), batch):
            group = [reqs[i] for i in order[s : s + batch]]
            width = max(len(p) for p, _ in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, (p, _) in enumerate(group):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            n = max(o for _, o in group)
            with torch.no_grad():
                model.generate(
                    input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0,
                )
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return walls


def summary(walls, reqs):
    wall = statistics.median(walls)
    out_tok = sum(o for _, o in reqs)
    total = out_tok + sum(len(p) for p, _ in reqs)
    return {"wall_s": round(wall, 3), "walls": [round(w, 3) for w in walls],
            "output_tok_s": round(out_tok / wall, 1), "total_tok_s": round(total / wall, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="directory with config.json")
    ap.add_argument("--workload", default="random")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", action="store_true", help="also time HF generate")
    ap.add_argument("--peer-num-prompts", type=int, default=None, help="peer on the first N requests only")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(args.model, "config.json"), tmp)
    vocab = json.load(open(os.path.join(tmp, "config.json")))["vocab_size"]
    reqs = make_workload(args.workload, vocab, args.num_prompts)
    result = {"model": os.path.basename(os.path.normpath(args.model)), "workload": args.workload,
              "num_prompts": len(reqs)}
    opts = dict(page_size=args.page_size, disable_cuda_graph=args.disable_cuda_graph)
    if args.backend:
        opts["attention_backend"] = args.backend
    result["ours"] = summary(run_ours(tmp, reqs, args.repeats, **opts), reqs)
    print(json.dumps(result), flush=True)
    if args.peer:
        peer_reqs = reqs[: args.peer_num_prompts] if args.peer_num_prompts else reqs
        result["peer_hf"] = summary(run_hf(tmp, peer_reqs, args.repeats), peer_reqs)
        result["peer_hf"]["num_prompts"] = len(peer_reqs)
        result["speedup_output_tok_s"] = round(result["ours"]["output_tok_s"] / result["peer_hf"]["output_tok_s"], 2)
    print(json.dumps(result))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
