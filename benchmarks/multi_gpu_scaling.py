"""One engine per GPU: the file job with --num-gpus 1 against 2 (or more), and the Ray stage.

Issue 9's measurement. The "random" workload of workloads.json (token-id prompts, each with
its own output_len, greedy, EOS ignored), repeated --copies times with the ids shifted so no
two prompts share a prefix, is written as Parquet; then for each entry of --gpus the file job
(`operators.run_job`, one engine process per GPU, as `pipeline-infer generate --num-gpus N`)
runs over it into a fresh folder and is timed from start to its last part written, engine
start-up included, as a user would see it. Every run must write every row exactly once, with
the same generated ids as the first run (random weights are seeded, so every process has the
same model). With --ray, a local Ray cluster with one GPU actor per GPU runs the same op with
Ray's readers and writers, and its rows must equal the file job's.

    python benchmarks/multi_gpu_scaling.py --model benchmarks/configs/qwen2.5-0.5b \
        --gpus 1,2 --copies 4 [--ray] [--json out.json]

On a machine without GPUs, N "GPUs" are N CPU processes (a smoke run: use a tiny config and
--num-prompts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import make_workload  # noqa: E402


def write_workload(directory: str, model: str, copies: int, num_prompts: int | None, files: int) -> tuple[int, int]:
    """The workload as `files` Parquet files (row, input_ids, params); returns (rows, output tokens)."""
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    base = make_workload("random", vocab, num_prompts)
    lo, hi = 1000, vocab - 1000
    rows = []
    for k in range(copies):  # shifted ids: same lengths, no shared prefixes between copies
        for ids, out_len in base:
            shifted = [lo + (t - lo + k * 7919) % (hi - lo) for t in ids]
            rows.append((shifted, out_len))
    per_file = -(-len(rows) // files)
    for f in range(files):
        chunk = rows[f * per_file : (f + 1) * per_file]
        start = f * per_file
        table = pa.table(
            {
                "row": pa.array(range(start, start + len(chunk)), pa.int64()),
                "input_ids": pa.array([ids for ids, _ in chunk], pa.list_(pa.int64())),
                "params": pa.array(
                    [json.dumps({"max_new_tokens": o, "ignore_eos": True, "temperature": 0}) for _, o in chunk]
                ),
            }
        )
        pq.write_table(table, os.path.join(directory, f"part-{f:03d}.parquet"))
    return len(rows), sum(o for _, o in rows)


def read_rows(directory: str) -> dict[int, list[int]]:
    """row id -> generated ids, asserting each row appears once and without an error."""
    table = pq.read_table(directory)
    rows: dict[int, list[int]] = {}
    for row, ids, err in zip(table["row"].to_pylist(), table["output_ids"].to_pylist(), table["error"].to_pylist()):
        assert err is None, f"row {row}: {err}"
        assert row not in rows, f"row {row} written twice"
        rows[row] = ids
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory with config.json (random weights are used)")
    ap.add_argument("--gpus", default="1,2", help="comma-separated engine-process counts to time")
    ap.add_argument("--copies", type=int, default=4, help="repeat the workload this many times (shifted ids)")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N prompts of the workload only")
    ap.add_argument("--files", type=int, default=16, help="input files (parts are the unit of work per process)")
    ap.add_argument("--rows-per-part", type=int, default=250)
    ap.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Engine option (JSON value), e.g. max_running_requests=256")
    ap.add_argument("--ray", action="store_true", help="also run the Ray Data stage and compare its rows")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from pipeline_infer.operators import GenerateOp, run_job

    options = {"load_format": "dummy", "random_seed": 0}
    for kv in args.engine_option:
        key, _, value = kv.partition("=")
        options[key] = json.loads(value)
    op = GenerateOp(input_ids_column="input_ids", sampling_params_column="params", model=args.model,
                    engine_options=options, output_ids=True)
    work = args.workdir or tempfile.mkdtemp(prefix="scaling-")
    inp = os.path.join(work, "in")
    os.makedirs(inp, exist_ok=True)
    num_rows, out_tokens = write_workload(inp, args.model, args.copies, args.num_prompts, args.files)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"{num_rows} rows, {out_tokens} output tokens, {torch.cuda.device_count()} x {device}", flush=True)

    results, reference = [], None
    for n in [int(x) for x in args.gpus.split(",")]:
        out = os.path.join(work, f"out-{n}")
        t = time.perf_counter()
        res = run_job(op, inp, out, num_gpus=n, rows_per_part=args.rows_per_part, progress=False, resume=False)
        wall = time.perf_counter() - t
        rows = read_rows(out)
        assert len(rows) == num_rows, f"{n} processes wrote {len(rows)} of {num_rows} rows"
        if reference is None:
            reference = rows
        same = sum(rows[r] == reference[r] for r in rows)
        results.append({"processes": n, "wall_s": wall, "rows": len(rows), "output_tok_s": out_tokens / wall,
                        "rows_equal_to_first_run": same, "parts": len(res.parts_written)})
        print(f"--num-gpus {n}: {wall:.1f} s, {out_tokens / wall:,.0f} output tok/s, "
              f"{same}/{num_rows} rows equal to the first run", flush=True)
    base = results[0]["wall_s"]
    for r in results:
        r["speedup_vs_first"] = base / r["wall_s"]

    ray_result = None
    if args.ray:
        import ray

        from pipeline_infer.operators.ray_data import run_ray_job

        gpus = torch.cuda.device_count()
        ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        out = os.path.join(work, "out-ray")
        t = time.perf_counter()
        run_ray_job(op, inp, out, num_actors=max(gpus, 1))
        wall = time.perf_counter() - t
        rows = read_rows(out)
        same = sum(rows.get(r) == reference[r] for r in reference)
        ray_result = {"actors": max(gpus, 1), "wall_s": wall, "rows": len(rows), "rows_equal_to_file_job": same}
        print(f"Ray, {max(gpus, 1)} actors: {wall:.1f} s, {len(rows)} rows, {same}/{num_rows} equal to the file job")
        ray.shutdown()

    summary = {"date": datetime.date.today().isoformat(), "device": f"{torch.cuda.device_count()} x {device}",
               "model": args.model, "rows": num_rows, "output_tokens": out_tokens, "engine_options": options,
               "file_job": results, "ray": ray_result}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
