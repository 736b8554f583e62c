"""One engine per GPU: the file job with --num-gpus 1 against 2 (or more), and the Ray stage.

Issue 9's measurement. The "random" workload of workloads.json (token-id prompts, each with
its own output_len, greedy, EOS ignored), repeated --copies times with the ids shifted so no
two prompts share a prefix, is written as Parquet; then for each entry of --gpus the file job
(`operators.run_job`, one engine process per GPU, as `pipeline-infer generate --num-gpus N`)
runs over it into a fresh folder and is timed from start to its last part written, engine
start-up included, as a user would see it. The engine start-up alone (a fresh process building
the engine) is timed too, so the generation-only rate can be read off as well.

Every run must write every row exactly once. Same ids: random weights are seeded, so every
process holds the same model, but greedy decoding on random weights meets near-ties all the
time, and bf16 results depend on the batch a row shares (other rows, other kernels' tiling),
so at full batch rows may part ways after some tokens: the throughput runs report how far rows
agree (identical rows, first tokens, median common prefix). The exact check runs the first
--exact-rows rows with max_running_requests=1, where a row's arithmetic no longer depends on
its neighbours: the file job with each process count (and the Ray stage with --ray) must then
write identical ids for every row.

    python benchmarks/multi_gpu_scaling.py --model benchmarks/configs/qwen2.5-0.5b \
        --gpus 1,2 --copies 8 [--ray] [--json out.json]

Every engine gets attention_backend="triton" unless --engine-option says otherwise: the
default choice is measured per process and could differ between processes.

On a machine without GPUs, N "GPUs" are N CPU processes (a smoke run: use a tiny config and
--num-prompts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import make_workload  # noqa: E402


def write_workload(
    directory: str, model: str, copies: int, num_prompts: int | None, files: int, max_new: int | None = None,
    workload: str = "random",
) -> tuple[int, int]:
    """The workload as `files` Parquet files (row, input_ids, params); returns (rows, output tokens)."""
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    base = make_workload(workload, vocab, num_prompts)
    if max_new is not None:
        base = [(ids, min(o, max_new)) for ids, o in base]
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


def agreement(rows: dict[int, list[int]], reference: dict[int, list[int]]) -> dict:
    """How far each row's ids agree with the reference run's."""
    prefixes, first = [], 0
    for r, ids in rows.items():
        ref = reference[r]
        n = 0
        while n < min(len(ids), len(ref)) and ids[n] == ref[n]:
            n += 1
        prefixes.append(n)
        first += bool(ids) and bool(ref) and ids[0] == ref[0]
    prefixes.sort()
    return {"rows_identical": sum(rows[r] == reference[r] for r in rows), "first_token_equal": first,
            "median_common_prefix": prefixes[len(prefixes) // 2] if prefixes else 0}


def engine_startup_s(model: str, options: dict) -> float:
    """Seconds a fresh process takes to build the engine (imports included), on the first GPU."""
    code = (
        "import json, sys, time; t = time.perf_counter(); from pipeline_infer import Engine; "
        "e = Engine(sys.argv[1], **json.loads(sys.argv[2])); print(time.perf_counter() - t); e.shutdown()"
    )
    env = dict(os.environ)
    if "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    out = subprocess.run([sys.executable, "-c", code, os.path.abspath(model), json.dumps(options)], env=env,
                         cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_file_jobs(op, inp: str, work: str, label: str, counts: list[int], num_rows: int, rows_per_part: int):
    """The file job once per process count; (results, rows of each run)."""
    from pipeline_infer.operators import run_job

    results, outputs = [], []
    for n in counts:
        out = os.path.join(work, f"out-{label}-{n}")
        t = time.perf_counter()
        res = run_job(op, inp, out, num_gpus=n, rows_per_part=rows_per_part, progress=False, resume=False)
        wall = time.perf_counter() - t
        rows = read_rows(out)
        assert len(rows) == num_rows, f"{n} processes wrote {len(rows)} of {num_rows} rows"
        workers = getattr(res, "workers", None) or [res]
        results.append({"processes": n, "wall_s": wall, "rows": len(rows), "parts": len(res.parts_written),
                        "worker_s": [round(w.seconds, 2) for w in workers],
                        "worker_rows": [w.rows_generated for w in workers]})
        outputs.append(rows)
    return results, outputs


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
    ap.add_argument("--exact-rows", type=int, default=32,
                    help="rows of the exact check (max_running_requests=1; 0 skips it)")
    ap.add_argument("--exact-max-new", type=int, default=48, help="output tokens per row in the exact check")
    ap.add_argument("--ray", action="store_true", help="also run the Ray Data stage and compare its rows")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp folder)")
    args = ap.parse_args()

    import torch

    from pipeline_infer.operators import GenerateOp

    options = {"load_format": "dummy", "random_seed": 0}
    if torch.cuda.is_available():
        options["attention_backend"] = "triton"
    for kv in args.engine_option:
        key, _, value = kv.partition("=")
        options[key] = json.loads(value)
    counts = [int(x) for x in args.gpus.split(",")]

    def make_op(opts):
        return GenerateOp(input_ids_column="input_ids", sampling_params_column="params", model=args.model,
                          engine_options=opts, output_ids=True)

    op = make_op(options)
    work = args.workdir or tempfile.mkdtemp(prefix="scaling-")
    inp = os.path.join(work, "in")
    os.makedirs(inp, exist_ok=True)
    num_rows, out_tokens = write_workload(inp, args.model, args.copies, args.num_prompts, args.files)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"{num_rows} rows, {out_tokens} output tokens, {torch.cuda.device_count()} x {device}", flush=True)

    startup = engine_startup_s(args.model, options)
    print(f"engine start-up in a fresh process: {startup:.1f} s", flush=True)
    results, outputs = run_file_jobs(op, inp, work, "bench", counts, num_rows, args.rows_per_part)
    base = results[0]["wall_s"]
    for r, rows in zip(results, outputs):
        r["output_tok_s"] = out_tokens / r["wall_s"]
        r["speedup_vs_first"] = base / r["wall_s"]
        # Generation only: the run less one engine start-up (workers start theirs in parallel).
        r["generation_tok_s"] = out_tokens / max(1e-9, r["wall_s"] - startup)
        r["agreement_with_first"] = agreement(rows, outputs[0])
        print(f"--num-gpus {r['processes']}: {r['wall_s']:.1f} s, {r['output_tok_s']:,.0f} output tok/s "
              f"({r['speedup_vs_first']:.2f}x; generation only {r['generation_tok_s']:,.0f} tok/s), workers "
              f"{r['worker_s']} s / {r['worker_rows']} rows; vs the first run: {r['agreement_with_first']}", flush=True)

    exact = None
    if args.exact_rows:
        ex_in = os.path.join(work, "exact-in")
        os.makedirs(ex_in, exist_ok=True)
        n_ex, _ = write_workload(ex_in, args.model, 1, args.exact_rows, max(2, max(counts)), max_new=args.exact_max_new)
        ex_op = make_op({**options, "max_running_requests": 1})
        ex_results, ex_outputs = run_file_jobs(ex_op, ex_in, work, "exact", counts, n_ex, max(1, n_ex // (2 * max(counts))))
        exact = {"rows": n_ex, "max_new_tokens": args.exact_max_new,
                 "file_job": [{"processes": r["processes"], "rows_identical_to_first": agreement(o, ex_outputs[0])["rows_identical"]}
                              for r, o in zip(ex_results, ex_outputs)]}
        print(f"exact check ({n_ex} rows, one request at a time): {exact['file_job']}", flush=True)

    ray_result = None
    if args.ray:
        import ray

        from pipeline_infer.operators.ray_data import run_ray_job

        gpus = torch.cuda.device_count()
        actors = max(gpus, 1)
        ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        out = os.path.join(work, "out-ray")
        t = time.perf_counter()
        run_ray_job(op, inp, out, num_actors=actors)
        wall = time.perf_counter() - t
        rows = read_rows(out)
        assert len(rows) == num_rows, f"Ray wrote {len(rows)} of {num_rows} rows"
        ray_result = {"actors": actors, "wall_s": wall, "rows": len(rows),
                      "agreement_with_file_job": agreement(rows, outputs[0])}
        print(f"Ray, {actors} actors: {wall:.1f} s, {len(rows)} rows (each once); vs the file job: "
              f"{ray_result['agreement_with_file_job']}", flush=True)
        if exact is not None:
            out = os.path.join(work, "out-ray-exact")
            run_ray_job(ex_op, ex_in, out, num_actors=actors)
            rows = read_rows(out)
            assert len(rows) == exact["rows"], f"Ray wrote {len(rows)} of {exact['rows']} rows in the exact check"
            exact["ray_rows_identical_to_file_job"] = agreement(rows, ex_outputs[0])["rows_identical"]
            print(f"exact check, Ray: {exact['ray_rows_identical_to_file_job']}/{exact['rows']} rows identical "
                  "to the file job", flush=True)
        ray.shutdown()

    summary = {"date": datetime.date.today().isoformat(), "device": f"{torch.cuda.device_count()} x {device}",
               "model": args.model, "rows": num_rows, "output_tokens": out_tokens, "engine_options": options,
               "engine_startup_s": startup, "file_job": results, "exact": exact, "ray": ray_result}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if exact is not None:  # after the JSON is written, so a failed check still leaves its figures
        bad = [r for r in exact["file_job"] if r["rows_identical_to_first"] != exact["rows"]]
        assert not bad and exact.get("ray_rows_identical_to_file_job", exact["rows"]) == exact["rows"], exact


if __name__ == "__main__":
    main()
