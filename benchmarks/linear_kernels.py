"""A decoder's projections at decode row counts: cuBLAS against our Triton linear's settings.

For each projection of the model (qkv with its bias if the model has one, o, gate/up with
SiLU-and-mul, down, the LM head) and each row count, times cuBLAS (torch's F.linear; for
gate/up, F.linear then our SiLU-and-mul kernel, the engine's eager path) and every setting of
`kernels/triton/linear.py` in the grid, each checked against a float32 reference first. Times
are device time per call inside a CUDA graph of --calls calls (the engine replays its decode
steps as graphs, so launch gaps count as they do there), median of --repeats replays.

    python benchmarks/linear_kernels.py --model benchmarks/configs/qwen2.5-0.5b [--rows 64,128,256] [--json out.json]

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pipeline_infer.kernels.triton.activation import silu_and_mul
from pipeline_infer.kernels.triton.linear import LinearConfig, triton_linear

# (block_m, block_n, block_k, num_warps): tile shapes worth trying at 16-512 rows.
TILES = [
    (16, 64, 128, 4), (16, 128, 128, 4), (32, 64, 128, 4), (32, 128, 64, 4),
    (64, 64, 64, 4), (64, 64, 128, 4), (64, 128, 64, 4), (64, 128, 128, 8),
    (128, 64, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8),
]
STAGES = (3, 4)
SPLITS = (1, 2, 4, 8)


def projections(config: dict) -> list[tuple[str, int, int, bool, bool]]:
    """(name, in features, out features, has bias, gated) of one decoder layer, then the LM head."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    bias = config.get("model_type") == "qwen2"
    return [
        ("qkv", hidden, (heads + 2 * kv) * d, bias, False),
        ("o", heads * d, hidden, False, False),
        ("gate_up", hidden, 2 * inter, False, True),
        ("down", inter, hidden, False, False),
        ("lm_head", hidden, config["vocab_size"], False, False),
    ]


def graph_time_us(fn, calls: int, repeats: int) -> float:
    """Device microseconds per fn() inside a CUDA graph of `calls` calls (median of replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder with a config.json")
    ap.add_argument("--rows", default="64,128,256")
    ap.add_argument("--only", default=None, help="comma list of projections (qkv,o,gate_up,down,lm_head)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config = json.load(open(os.path.join(args.model, "config.json")))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    only = set(args.only.split(",")) if args.only else None
    results = []
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}, {args.model}")
    for name, k, n, has_bias, gated in projections(config):
        if only and name not in only:
            continue
        w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
        bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16) if has_bias else None
        for m in rows:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            if gated:
                g, u = ref.bfloat16().float().chunk(2, dim=-1)
                ref = F.silu(g) * u
            scale = ref.abs().max().item()

            def cublas():
                y = F.linear(x, w, bias)
                return silu_and_mul(y) if gated else y

            base = graph_time_us(cublas, args.calls, args.repeats)
            rec = {"proj": name, "k": k, "n": n, "m": m, "cublas_us": base, "settings": []}
            for (bm, bn, bk, warps), stages, split in itertools.product(TILES, STAGES, SPLITS):
                if bm > 2 * max(16, m) or (split > 1 and k // split < bk):
                    continue
                cfg = LinearConfig(bm, bn, bk, split, warps, stages)
                try:
                    y = triton_linear(x, w, bias, cfg, gated=gated)
                    err = (y.float() - ref).abs().max().item() / scale
                    if err > 2e-2:
                        rec["settings"].append({"cfg": cfg.short(), "error": f"max err {err:.3g}"})
                        continue
                    us = graph_time_us(lambda: triton_linear(x, w, bias, cfg, gated=gated), args.calls, args.repeats)
                except Exception as e:  # out of shared memory and the like: skip the setting
                    rec["settings"].append({"cfg": cfg.short(), "error": f"{type(e).__name__}: {str(e)[:80]}"})
                    continue
                rec["settings"].append({"cfg": cfg.short(), "us": us})
            ok = sorted((s for s in rec["settings"] if "us" in s), key=lambda s: s["us"])
            best = ok[0] if ok else None
            rec["best"] = best
            results.append(rec)
            top = ", ".join(f"{s['cfg']} {s['us']:.1f}" for s in ok[:3])
            errs = sum(1 for s in rec["settings"] if "error" in s)
            print(f"{name:<8} m={m:<4} k={k:<5} n={n:<6} cuBLAS {base:7.2f} us | best {top} | {errs} skipped "
                  f"| {time.time() - t0:.0f}s", flush=True)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "model": args.model, "results": results},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
