"""The file job as several engine processes on one host (no Ray), on the CPU.

Workers claim parts as they reach them (job.PartClaims): the claims are checked alone, from
racing threads and processes, then on two in-process jobs driven at unequal speeds over a
half-finished output (the faster takes more parts; every part is written, or counted as skipped,
by exactly one), then with two worker processes on a tiny random model. The static shards
(shard= without claims) are checked in-process: disjoint parts whose union is the single-process
output. Then the real thing on the bundled model: `pipeline-infer generate --num-gpus 2` (two CPU
worker processes) is killed in the middle of the job, rerun with two workers, and ends with
exactly the single-process job's parts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_infer.operators import GenerateOp, register_engine, run_job
from pipeline_infer.operators import files as fio
from pipeline_infer.operators.job import JobResult, PartClaims, _Job, _Marker
from pipeline_infer.operators.multi_process import MultiJobResult, merge_results, num_workers
from pipeline_infer.operators.stream import run_window

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


def write_inputs(directory, n_a: int = 7) -> None:
    """a (n_a rows), b (empty) and c (5 rows): with one row per part, n_a + 6 parts."""
    directory.mkdir()
    for name, n in (("a", n_a), ("b", 0), ("c", 5)):
        rows = {"row": list(range(n)), "ids": [[1 + (i * 7) % 300, 2 + i] for i in range(n)]}
        pq.write_table(pa.table(rows, schema=pa.schema([("row", pa.int64()), ("ids", pa.list_(pa.int64()))])),
                       directory / f"{name}.parquet")


def half_finished(single, directory) -> tuple[list[str], str]:
    """An output an earlier run left: a's first two parts, all of c, and a stale part past c's
    last one. Returns (the finished parts, the stale one)."""
    directory.mkdir()
    names = sorted(parts(single))
    done = [n for n in names if n.startswith("a-")][:2] + [n for n in names if n.startswith("c-")]
    for name in done:
        shutil.copy(single / name, directory / name)
    stale = done[-1][: -len("00004.parquet")] + "00007.parquet"
    shutil.copy(single / done[-1], directory / stale)
    return done, stale


SUMMED = ("parts_written", "parts_skipped", "parts_replaced", "parts_removed", "rows_generated", "rows_skipped",
          "row_errors", "generated_tokens")


def summary(result: JobResult) -> dict:
    return {k: sorted(v) if isinstance(v, list) else v for k, v in ((k, getattr(result, k)) for k in SUMMED)}


def test_part_claims_grant_each_ordinal_once(tmp_path):
    first, second = PartClaims(str(tmp_path)), PartClaims(str(tmp_path))
    assert first.claim(0) and not second.claim(0) and not first.claim(0)
    assert second.claim(1) and not first.claim(1)
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]

    # Racing threads, all in the same order so that they collide on every ordinal.
    (tmp_path / "threads").mkdir()
    start = threading.Barrier(8)
    won: list[list[int]] = [[] for _ in range(8)]

    def claimer(i: int) -> None:
        claims = PartClaims(str(tmp_path / "threads"))
        start.wait()
        won[i] = [k for k in range(200) if claims.claim(k)]

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for w in won for k in w) == list(range(200))  # all of them, none twice

    # Racing processes, as the workers are: each waits for "go" once it is ready.
    (tmp_path / "procs").mkdir()
    script = ("import sys, json; from pipeline_infer.operators.job import PartClaims; c = PartClaims(sys.argv[1]); "
              "print('ready', flush=True); sys.stdin.readline(); print(json.dumps([k for k in range(200) if c.claim(k)]))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "procs")], cwd=str(tmp_path),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    won = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sorted(k for w in won for k in w) == list(range(200))


class _NoBar:
    def skip(self, rows):
        pass

    def done(self, rows, tokens, errors):
        pass

    def close(self):
        pass


def test_claimed_parts_follow_each_workers_speed(tiny, tmp_path):
    """Two claim-using jobs, one stepped three times as often: it writes more parts, and each
    part is written, or counted as finished before, by exactly one of them."""
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options={"random_seed": 0}, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 3})
    write_inputs(tmp_path / "in", n_a=19)  # 25 parts, 7 of them finished below: 18 to write
    kw = dict(batch_size=1, rows_per_part=1, progress=False)
    run_job(op, str(tmp_path / "in"), str(tmp_path / "single"), **kw)
    done, stale = half_finished(tmp_path / "single", tmp_path / "out")
    half_finished(tmp_path / "single", tmp_path / "ref")
    ref = run_job(op, str(tmp_path / "in"), str(tmp_path / "ref"), **kw)  # what one process does from there

    (tmp_path / "claims").mkdir()
    claims = PartClaims(str(tmp_path / "claims"))
    inputs = fio.discover(str(tmp_path / "in"))
    out = fsspec.filesystem("file"), str(tmp_path / "out")
    jobs = [_Job(op, inputs, *out, 1, 1, True, None, shard=(i, 2), claims=claims) for i in range(2)]
    results = [JobResult(output=str(tmp_path / "out")) for _ in jobs]

    def steps(job: _Job, result: JobResult):
        """run_job's loop, one runner output per next(), so the test picks who goes next."""
        bar = _NoBar()
        for item, table, prep in run_window(op, job.items(), 1):  # pulls items lazily: claims as it goes
            if isinstance(item.tag, _Marker):
                job.finish_part(item.tag, result, bar)
            else:
                item.tag.tables.append(table)
                result.rows_generated += table.num_rows
                result.row_errors += sum(e is not None for e in prep.errors)
                result.generated_tokens += sum(o["meta_info"]["completion_tokens"]
                                               for outs in prep.results.values() for o in outs)
            yield

    fast, slow = steps(jobs[0], results[0]), steps(jobs[1], results[1])
    live, end = {"fast": fast, "slow": slow}, object()
    while live:
        for who in ("slow", "fast", "fast", "fast"):  # the slow one even starts first
            if who in live and next(live[who], end) is end:
                del live[who]

    written = [r.parts_written for r in results]
    assert len(written[0]) >= 2 * len(written[1]) > 0, written  # shares follow speed
    assert sorted(written[0] + written[1]) == sorted(ref.parts_written)  # each part once
    assert sorted(results[0].parts_skipped + results[1].parts_skipped) == sorted(done)  # counted once
    assert results[0].parts_removed + results[1].parts_removed == [stale]  # one worker removes it
    assert summary(merge_results(str(tmp_path / "out"), results)) == summary(ref)
    assert sorted(os.listdir(tmp_path / "claims"), key=int) == [str(k) for k in range(25)]  # done parts too
    assert parts(tmp_path / "out") == parts(tmp_path / "single")
    assert footer_keys(tmp_path / "out") == footer_keys(tmp_path / "single")


def test_two_worker_processes_claim_the_parts_and_write_the_single_process_output(tiny, tmp_path, monkeypatch):
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options=OPTS, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 3})
    write_inputs(tmp_path / "in")
    kw = dict(batch_size=1, rows_per_part=1, progress=False)
    run_job(op, str(tmp_path / "in"), str(tmp_path / "single"), **kw)
    done, stale = half_finished(tmp_path / "single", tmp_path / "out")
    half_finished(tmp_path / "single", tmp_path / "ref")
    ref = run_job(op, str(tmp_path / "in"), str(tmp_path / "ref"), **kw)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the coordinator makes the claims
    claimed: list[list[str]] = []
    rmtree = shutil.rmtree

    def record(path, *args, **kwargs):
        if os.path.basename(path).startswith("pipeline-infer-claims-"):
            claimed.append(sorted(os.listdir(path), key=int))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", record)
    result = run_job(op, str(tmp_path / "in"), str(tmp_path / "out"), num_gpus=2, **kw)
    assert isinstance(result, MultiJobResult) and len(result.workers) == 2
    assert claimed == [[str(k) for k in range(13)]]  # every part claimed, done ones too
    assert os.listdir(tmp_path / "tmp") == []  # and the claims removed
    first, second = (set(w.parts_written) for w in result.workers)
    assert not first & second
    assert summary(result) == summary(ref)  # written once, skipped once, the stale part removed once
    assert result.parts_skipped == sorted(done) and result.parts_removed == [stale]
    assert parts(tmp_path / "out") == parts(tmp_path / "single")
    assert footer_keys(tmp_path / "out") == footer_keys(tmp_path / "single")


def test_shards_split_the_parts_and_together_write_the_single_process_output(tiny, tmp_path):
    """shard= without claims: the static round-robin, for callers that run the shards themselves."""
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options={"random_seed": 0}, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 3})
    write_inputs(tmp_path / "in")
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


def test_a_failing_worker_stops_the_job_with_its_error(tiny, tmp_path, monkeypatch):
    pq.write_table(pa.table({"row": list(range(6))}), tmp_path / "no_ids.parquet")  # the op's column is missing
    op = GenerateOp(input_ids_column="ids", model=tiny, engine_options={"random_seed": 0, "max_total_tokens": 1024})
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with pytest.raises(ValueError, match="has no column 'ids'"):
        run_job(op, str(tmp_path / "no_ids.parquet"), str(tmp_path / "out"), rows_per_part=2, num_gpus=2, progress=False)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".parquet")]
    assert os.listdir(tmp_path / "tmp") == []  # the claims folder goes with a failed job too


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
    (tmp_path / "tmp").mkdir()  # the claims folder a SIGKILLed coordinator cannot remove lands here
    proc = subprocess.Popen(_CLI + ["-i", str(src), "-o", str(out), "--num-gpus", "2"], cwd=str(tmp_path),
                            env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")),
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
    written = [set(w.parts_written) for w in result.workers]  # claimed: how many each took depends on speed
    assert not written[0] & written[1] and sorted(written[0] | written[1]) == result.parts_written
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
