"""The file job as several engine processes on one host (no Ray), on the CPU.

The shards' split is checked in-process on a tiny random model: disjoint parts whose union is the
single-process output. Then the real thing on the bundled model: `pipeline-infer generate
--num-gpus 2` (two CPU worker processes) is killed in the middle of the job, rerun with two
workers, and ends with exactly the single-process job's parts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_infer.operators import GenerateOp, register_engine, run_job
from pipeline_infer.operators.multi_process import MultiJobResult, num_workers

OPTS = {"random_seed": 0, "max_total_tokens": 2048}  # a small KV pool: each worker allocates its own


def parts(directory) -> dict[str, pa.Table]:
    """Each part's rows, without the footer (it records when the part was written) and without
    cached_tokens (prefix-cache hits depend on what the engine ran before)."""
    return {
        name: pq.read_table(os.path.join(directory, name)).replace_schema_metadata(None).drop_columns(["cached_tokens"])
        for name in sorted(os.listdir(directory)) if name.endswith(".parquet")
    }


def footer_keys(directory) -> dict[str, str]:
    return {name: json.loads(pq.read_metadata(os.path.join(directory, name)).metadata[b"pipeline_infer"])["key"]
            for name in parts(directory)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_model

    from pipeline_infer.operators import get_engine

    path, _ = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), "llama")
    get_engine(path, {"random_seed": 0})
    return path


def test_shards_split_the_parts_and_together_write_the_single_process_output(tiny, tmp_path):
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options={"random_seed": 0}, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 3})
    (tmp_path / "in").mkdir()
    for name, n in (("a", 7), ("b", 0), ("c", 5)):
        rows = {"row": list(range(n)), "ids": [[1 + (i * 7) % 300, 2 + i] for i in range(n)]}
        pq.write_table(pa.table(rows, schema=pa.schema([("row", pa.int64()), ("ids", pa.list_(pa.int64()))])),
                       tmp_path / "in" / f"{name}.parquet")
    kw = dict(batch_size=2, rows_per_part=2, progress=False)
    single = run_job(op, str(tmp_path / "in"), str(tmp_path / "single"), **kw)
    first = run_job(op, str(tmp_path / "in"), str(tmp_path / "sharded"), shard=(0, 3), **kw)
    second = run_job(op, str(tmp_path / "in"), str(tmp_path / "sharded"), shard=(1, 3), **kw)
    assert first.parts_written == single.parts_written[0::3] and second.parts_written == single.parts_written[1::3]
    third = run_job(op, str(tmp_path / "in"), str(tmp_path / "sharded"), shard=(2, 3), **kw)
    assert third.parts_written == single.parts_written[2::3]
    assert parts(tmp_path / "sharded") == parts(tmp_path / "single")  # same names, rows and samples
    assert footer_keys(tmp_path / "sharded") == footer_keys(tmp_path / "single")

    # A rerun with another number of shards resumes the same parts: nothing is left to write.
    again = [run_job(op, str(tmp_path / "in"), str(tmp_path / "sharded"), shard=(i, 2), **kw) for i in range(2)]
    assert [r.parts_written for r in again] == [[], []]
    assert sorted(again[0].parts_skipped + again[1].parts_skipped) == sorted(single.parts_written)
    assert again[0].rows_skipped + again[1].rows_skipped == single.rows_generated


def test_worker_counts_and_bad_values():
    assert num_workers(1) == (1, [])
    if not __import__("torch").cuda.is_available():
        assert num_workers(None) == (1, [])  # a machine without GPUs: one process unless asked
        assert num_workers(3) == (3, [])  # asked: three CPU processes
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_gpus must be an int >= 1 or None"):
            num_workers(bad)


def test_a_failing_worker_stops_the_job_with_its_error(tiny, tmp_path):
    pq.write_table(pa.table({"row": list(range(6))}), tmp_path / "no_ids.parquet")  # the op's column is missing
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options={"random_seed": 0, "max_total_tokens": 1024})
    with pytest.raises(ValueError, match="has no column 'ids'"):
        run_job(op, str(tmp_path / "no_ids.parquet"), str(tmp_path / "out"), rows_per_part=2, num_gpus=2, progress=False)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".parquet")]


_CLI = [sys.executable, "-m", "pipeline_infer.cli", "generate", "--prompt-column", "text", "--temperature", "0",
        "--max-new-tokens", "6", "--engine-option", "random_seed=0", "--engine-option", "max_total_tokens=2048",
        "--rows-per-part", "1", "--batch-size", "1", "--no-progress"]
TEXTS = ["The capital of France is", "2 + 2 =", "Hello, my name is", "List three primary colors:", "def fibonacci(n):",
         "", "Water boils at", "The sky is", "Once upon a time", "My favourite fruit is", "Rain is", "A cat"]


@pytest.mark.slow
def test_two_worker_processes_killed_and_rerun_write_the_single_process_output(bundled_engine, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "out"
    proc = subprocess.Popen(_CLI + ["-i", str(src), "-o", str(out), "--num-gpus", "2"], cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len([p for p in os.listdir(out) if p.endswith(".parquet")]) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and both workers, at once
        proc.wait()
    done_before = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p.endswith(".parquet")}
    assert 2 <= len(done_before) < len(TEXTS)

    op = GenerateOp("text", engine_options=OPTS, sampling_params={"temperature": 0, "max_new_tokens": 6})
    result = run_job(op, str(src), str(out), batch_size=1, rows_per_part=1, num_gpus=2, progress=False)
    assert isinstance(result, MultiJobResult) and len(result.workers) == 2
    assert all(w.parts_written for w in result.workers)  # both processes had work left
    assert set(result.parts_skipped) == set(done_before)
    assert all(os.path.getmtime(out / p) == t for p, t in done_before.items())
    assert result.rows_generated + result.rows_skipped == len(TEXTS)
    assert not [p for p in os.listdir(out) if p.startswith(".")]

    register_engine(bundled_engine, None, **OPTS)  # the one-process reference, on this process's engine
    run_job(op, str(src), str(tmp_path / "single"), batch_size=1, rows_per_part=1, progress=False)
    assert parts(out) == parts(tmp_path / "single")  # every row once, the same generations, the same parts
    rows = pa.concat_tables(parts(out).values())
    assert rows.column("id").to_pylist() == list(range(len(TEXTS)))
    assert rows.column("error").to_pylist()[5] == "the prompt is empty"
