"""Where one engine step's time goes on the GPU: launch (host) time vs device time per step shape.

For a few step shapes built directly on the engine's model runner (random weights):

- eager forward: a prefill of T tokens (one or several sequences), a mixed step (decodes plus
  a prefill), and an all-decode step run without CUDA graphs;
- the CUDA-graph replay of the same decode step,

it prints the host time to launch the step (perf_counter around the calls, no sync) and the
device time (CUDA events around the same calls), medians of --repeats. A step whose host time
is close to its device time is launch-bound: the GPU waits on Python. With --trace DIR a
torch.profiler table of the top kernels and of the top host-side operators of one eager
mixed step is written there too.

    python benchmarks/profile_steps.py --model benchmarks/configs/qwen2.5-0.5b [--backend triton] [--trace out/]
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

import torch


def make_batch(runner, extend_lens: list[int], prefix_lens: list[int]):
    """A ForwardBatch over fresh pages: sequence b has prefix_lens[b] cached + extend_lens[b] new tokens."""
    from pipeline_infer.forward_batch import ForwardBatch

    ps, dev = runner.page_size, runner.device
    vocab = runner.hf_config.vocab_size
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pages_per = [-(-s // ps) for s in seq_lens]
    width = max(pages_per)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    nxt = 1
    for b, n in enumerate(pages_per):
        table[b, :n] = torch.arange(nxt, nxt + n, dtype=torch.int32)
        nxt += n
    assert nxt <= runner.kv_pool.allocator.capacity, "KV pool too small for the probe"
    ids, pos, slots, rows = [], [], [], []
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        for i in range(p, p + e):
            pos.append(i)
            slots.append(int(table[b, i // ps]) * ps + i % ps)
        ids += torch.randint(1000, vocab - 1000, (e,)).tolist()
        rows.append(len(pos) - 1)
    return ForwardBatch(
        input_ids=torch.tensor(ids, device=dev),
        positions=torch.tensor(pos, device=dev),
        extend_lens=list(extend_lens),
        prefix_lens=list(prefix_lens),
        page_table=table.to(dev),
        page_table_host=table.numpy(),
        out_cache_loc=torch.tensor(slots, device=dev),
        logits_indices=torch.tensor(rows, device=dev),
        attn_backend=runner.attn_backend,
    )


def time_step(fn, repeats: int) -> tuple[float, float]:
    """(host launch ms, device ms), medians; fn launches one step's work."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    host, dev = [], []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        b.record()
        b.synchronize()
        dev.append(a.elapsed_time(b))
    return statistics.median(host), statistics.median(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trace", default=None, help="folder for the profiler tables of one mixed step")
    ap.add_argument("--graph-batches", default="256", help="decode batch sizes to time as CUDA-graph replays")
    ap.add_argument("--context", type=int, default=700, help="cached tokens per sequence in the graph decode steps")
    ap.add_argument("--trace-rows", type=int, default=256, help="decode rows of the --trace decode step (at --context)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--no-decode-rope-fusion", action="store_true",
        help="Triton backend: rotary + K/V store in their own kernel, not inside decode attention",
    )
    args = ap.parse_args()
    from pipeline_infer import Engine

    if args.no_decode_rope_fusion:
        from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend

        TritonAttentionBackend.decode_rope_in_attention = False

    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(args.model, "config.json"), tmp)
    llm = Engine(tmp, load_format="dummy", attention_backend=args.backend)
    runner = llm._runner
    model = runner.model

    def eager(fb):
        def go():
            with torch.inference_mode():
                runner.attn_backend.plan(fb)
                hidden = model(fb)
                model.compute_logits(hidden[fb.logits_indices])
        return go

    shapes = {
        "prefill 1x1024": ([1024], [0]),
        "prefill 2x512": ([512] * 2, [0] * 2),
        "prefill 8x1024": ([1024] * 8, [0] * 8),
        "decode 256 @ctx 700 (eager)": ([1] * 256, [700] * 256),
        "mixed 256 decodes + 1x1024": ([1] * 256 + [1024], [700] * 256 + [0]),
        "mixed 256 decodes + 8x1024": ([1] * 256 + [1024] * 8, [700] * 256 + [0] * 8),
    }
    results = {}
    print(f"{torch.cuda.get_device_name()}, backend {llm.attention_backend}, {runner.num_layers} layers")
    print(f"{'step':<32} {'tokens':>7} {'host ms':>8} {'device ms':>10}")
    for name, (ext, pre) in shapes.items():
        fb = make_batch(runner, ext, pre)
        h, d = time_step(eager(fb), args.repeats)
        results[name] = {"tokens": sum(ext), "host_ms": h, "device_ms": d}
        print(f"{name:<32} {sum(ext):>7} {h:>8.2f} {d:>10.2f}", flush=True)
    for bs in [int(b) for b in args.graph_batches.split(",")] if runner.graph_runner is not None else []:
        fb = make_batch(runner, [1] * bs, [args.context] * bs)

        def replay():
            with torch.inference_mode():
                runner.graph_runner.replay(fb)
        h, d = time_step(replay, args.repeats)
        name = f"decode {bs} @ctx {args.context} (graph)"
        results[name] = {"tokens": bs, "host_ms": h, "device_ms": d}
        print(f"{name:<32} {bs:>7} {h:>8.2f} {d:>10.2f}", flush=True)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        from torch.profiler import ProfilerActivity, profile

        fb = make_batch(runner, [1] * 256 + [1024], [700] * 256 + [0])
        go = eager(fb)
        go()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                go()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        with open(os.path.join(args.trace, "mixed_step_profile.txt"), "w") as f:
            f.write("3 eager mixed steps (256 decodes @700 + one 1024-token prefill)\n\n")
            f.write(ka.table(sort_by="cuda_time_total", row_limit=30))
            f.write("\n\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
        # The decode step's kernels, each one's device time (run eagerly so the profiler sees
        # every launch; a kernel's own duration is the same inside the CUDA graph).
        rows, ctx = args.trace_rows, args.context
        fb = make_batch(runner, [1] * rows, [ctx] * rows)
        go = eager(fb)
        go()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                go()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(args.trace, "decode_step_kernels.txt"), "w") as f:
            f.write(f"3 eager decode steps ({rows} decodes @{ctx})\n\n" + table)
        print(table)
        json.dump(results, open(os.path.join(args.trace, "steps.json"), "w"), indent=1)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
    llm.shutdown()


if __name__ == "__main__":
    sys.exit(main())
