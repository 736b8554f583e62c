"""File jobs: Parquet/JSONL in, Parquet parts out, on a local folder, memory:// and a real S3
server (moto on 127.0.0.1, through s3fs); resume after a clean finish, a configuration change
and a SIGKILL; bad rows; part cutting, limits and seeds.

Text tests use the bundled model (the session engine); the structural ones use a tiny random
checkpoint (token ids in and out), which starts and generates in a fraction of the time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_infer.operators import GenerateOp, register_engine, run_job
from pipeline_infer.operators.generate_op import GenerateOp as _GenerateOpClass

OPTS = {"random_seed": 0}
GREEDY = {"temperature": 0, "max_new_tokens": 4}
TEXTS = ["The capital of France is", "2 + 2 =", "Hello, my name is", "List three primary colors:", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def engine(bundled_engine):
    register_engine(bundled_engine, None, **OPTS)
    return bundled_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, its engine): a tiny random Llama with no tokenizer, shared by the module."""
    from tiny_models import make_tiny_model

    from pipeline_infer.operators import get_engine

    path, _ = make_tiny_model(str(tmp_path_factory.mktemp("tiny")), "llama")
    return path, get_engine(path, OPTS)


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    original = _GenerateOpClass.execute

    def counting(self, prep):
        if prep.order:
            calls.append(len(prep.order))
        return original(self, prep)

    monkeypatch.setattr(_GenerateOpClass, "execute", counting)
    return calls


def text_op(**kw) -> GenerateOp:
    kw.setdefault("sampling_params", GREEDY)
    return GenerateOp("text", engine_options=OPTS, **kw)


def ids_op(model: str, **kw) -> GenerateOp:
    kw.setdefault("sampling_params", {"temperature": 0, "max_new_tokens": 3})
    return GenerateOp(input_ids_column="ids", model=model, engine_options=OPTS, output_ids=True, **kw)


def id_rows(n: int) -> dict:
    return {"row": list(range(n)), "ids": [[1 + (i * 7 + k) % 300 for k in range(1 + i % 5)] for i in range(n)]}


def read_output(fs, directory: str) -> pa.Table:
    names = sorted(p for p in fs.ls(directory, detail=False) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in names], promote_options="permissive")


def write_jsonl(fs, path: str, rows: list) -> None:
    with fs.open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")


def greedy_texts(engine, texts, params=GREEDY):
    return [o["text"] for o in engine.generate(list(texts), params)]


# --- text jobs on the bundled model ---------------------------------------------------------------


def test_jsonl_and_parquet_into_parquet_parts_on_a_local_folder(engine, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    fs = fsspec.filesystem("file")
    write_jsonl(fs, str(src / "a.jsonl"), [{"id": i, "text": t} for i, t in enumerate(TEXTS[:3])])
    pq.write_table(pa.table({"id": [3, 4], "text": TEXTS[3:]}), src / "b.parquet")
    result = run_job(text_op(), str(src), str(tmp_path / "out"), batch_size=2, rows_per_part=2, progress=False)
    assert [n.split("-")[0] + "-" + n.split("-")[-1] for n in result.parts_written] == [
        "a-00000.parquet", "a-00001.parquet", "b-00000.parquet"
    ]
    out = read_output(fs, str(tmp_path / "out"))
    assert out.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert out.column("generated_text").to_pylist() == greedy_texts(engine, TEXTS)
    assert result.rows_generated == 5 and result.row_errors == 0
    meta = json.loads(pq.read_metadata(tmp_path / "out" / result.parts_written[0]).metadata[b"pipeline_infer"])
    assert meta["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.0}
    assert meta["model"].startswith("bundled") and meta["template"] is None and meta["op"]["prompt_column"] == "text"
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".")]  # no temp files left


def test_memory_fs_job_resumes_and_never_reuses_stale_parts(engine, count_calls):
    fs = fsspec.filesystem("memory")
    root = f"/job-{uuid.uuid4().hex}"
    write_jsonl(fs, f"{root}/in/data.jsonl", [{"text": t} for t in TEXTS])
    src, dst = f"memory://{root}/in", f"memory://{root}/out"
    first = run_job(text_op(), src, dst, batch_size=2, rows_per_part=2, progress=False)
    assert len(first.parts_written) == 3 and len(count_calls) == 3
    created = {p: fs.info(p)["created"] for p in fs.ls(f"{root}/out", detail=False)}

    again = run_job(text_op(), src, dst, batch_size=2, rows_per_part=2, progress=False)
    assert again.parts_written == [] and len(again.parts_skipped) == 3 and again.rows_skipped == 5
    assert len(count_calls) == 3  # nothing reached the engine
    assert {p: fs.info(p)["created"] for p in fs.ls(f"{root}/out", detail=False)} == created

    longer = text_op(sampling_params={"temperature": 0, "max_new_tokens": 6})
    changed = run_job(longer, src, dst, batch_size=2, rows_per_part=2, progress=False)
    assert len(changed.parts_replaced) == 3 and changed.parts_skipped == []
    out = read_output(fs, f"{root}/out")
    assert out.column("generated_text").to_pylist() == greedy_texts(engine, TEXTS, {"temperature": 0, "max_new_tokens": 6})

    redo = run_job(longer, src, dst, batch_size=2, rows_per_part=2, resume=False, progress=False)
    assert len(redo.parts_written) == 3 and redo.parts_skipped == []


def test_bad_rows_are_written_with_errors_and_the_rest_generates(engine, tmp_path):
    fs = fsspec.filesystem("file")
    (tmp_path / "in").mkdir()
    path = str(tmp_path / "in" / "a_bad.jsonl")
    write_jsonl(fs, path, [
        {"k": 0, "text": TEXTS[0]},
        {"k": 1, "text": None},
        {"k": 2, "text": ""},
        b'{"k": 3, "text": "caf\xe9 latin-1"}',
        b"{not json",
        b"[1, 2]",
        {"k": 6, "text": "word " * 40},
        {"k": 7},
        {"k": 8, "text": TEXTS[1]},
    ])
    # Parquet with a binary prompt column: bytes are decoded as UTF-8 where they are UTF-8.
    binary = pa.array([TEXTS[2].encode(), b"\xff\xfe not utf-8", None, b"", ("word " * 40).encode()], pa.binary())
    pq.write_table(pa.table({"k": [9, 10, 11, 12, 13], "text": binary}), tmp_path / "in" / "b_bad.parquet")
    result = run_job(text_op(max_prompt_tokens=20), str(tmp_path / "in"), str(tmp_path / "out"), batch_size=4, progress=False)
    assert result.rows_generated == 14 and result.row_errors == 7 + 4
    parts = sorted(os.listdir(tmp_path / "out"))
    assert [p.split("-")[0] for p in parts] == ["a_bad", "b_bad"]
    parquet_rows = pq.read_table(tmp_path / "out" / parts[1]).to_pydict()
    assert parquet_rows["k"] == [9, 10, 11, 12, 13]
    assert parquet_rows["error"][0] is None and parquet_rows["generated_text"][0] == greedy_texts(engine, [TEXTS[2]])[0]
    assert "not valid UTF-8" in parquet_rows["error"][1] and "null" in parquet_rows["error"][2]
    assert "empty" in parquet_rows["error"][3] and "over the limit of 20" in parquet_rows["error"][4]
    assert parquet_rows["generated_text"][1:] == [None] * 4
    out = pq.read_table(tmp_path / "out" / parts[0]).to_pydict()
    assert out["k"][:3] + out["k"][6:] == [0, 1, 2, 6, 7, 8] and len(out["error"]) == 9
    errors = out["error"]
    assert errors[0] is None and errors[8] is None
    assert "null" in errors[1] and "empty" in errors[2] and "not valid UTF-8" in errors[3]
    assert "not valid JSON" in errors[4] and "not an object" in errors[5]
    assert "over the limit of 20" in errors[6] and "null" in errors[7]
    assert out["k"][3] == 3  # the undecodable row keeps its other columns
    assert [out["generated_text"][0], out["generated_text"][8]] == greedy_texts(engine, [TEXTS[0], TEXTS[1]])
    assert all(out["generated_text"][i] is None for i in range(1, 8))


# --- structure, on the tiny model -------------------------------------------------------------------------


def test_parts_limit_and_leftover_cleanup(tiny, tmp_path):
    path, engine = tiny
    pq.write_table(pa.table(id_rows(10)), tmp_path / "rows.parquet", row_group_size=4)
    out_dir = str(tmp_path / "out")
    fs = fsspec.filesystem("file")
    r = run_job(ids_op(path), str(tmp_path / "rows.parquet"), out_dir, batch_size=2, rows_per_part=3, progress=False)
    assert [pq.read_metadata(os.path.join(out_dir, n)).num_rows for n in r.parts_written] == [3, 3, 3, 1]
    out = read_output(fs, out_dir)
    assert out.column("row").to_pylist() == list(range(10))
    ref = engine.generate(input_ids=id_rows(10)["ids"], sampling_params={"temperature": 0, "max_new_tokens": 3})
    assert out.column("output_ids").to_pylist() == [o["output_ids"] for o in ref]

    # Bigger parts: the new cut replaces the old one and the old extra parts are removed.
    r2 = run_job(ids_op(path), str(tmp_path / "rows.parquet"), out_dir, batch_size=4, rows_per_part=5, progress=False)
    assert len(r2.parts_written) == 2 and sorted(r2.parts_removed) == sorted(r.parts_written[2:])
    assert read_output(fs, out_dir).column("row").to_pylist() == list(range(10))

    # A limit cuts the last part short; the full parts before it are kept.
    r3 = run_job(ids_op(path), str(tmp_path / "rows.parquet"), out_dir, batch_size=4, rows_per_part=5, limit=7, progress=False)
    assert r3.parts_skipped == r2.parts_written[:1] and r3.parts_written == r2.parts_written[1:]
    assert read_output(fs, out_dir).column("row").to_pylist() == list(range(7))


def test_row_seeds_do_not_depend_on_batch_or_part_sizes(tiny, tmp_path):
    path, _ = tiny
    pq.write_table(pa.table(id_rows(9)), tmp_path / "rows.parquet")
    op = ids_op(path, sampling_params={"temperature": 1.0, "max_new_tokens": 6}, seed=7)
    fs = fsspec.filesystem("file")
    run_job(op, str(tmp_path / "rows.parquet"), str(tmp_path / "a"), batch_size=2, rows_per_part=3, progress=False)
    run_job(op, str(tmp_path / "rows.parquet"), str(tmp_path / "b"), batch_size=9, rows_per_part=9, window=1, progress=False)
    a = read_output(fs, str(tmp_path / "a")).column("output_ids").to_pylist()
    b = read_output(fs, str(tmp_path / "b")).column("output_ids").to_pylist()
    assert a == b and len({tuple(x) for x in a}) > 1


def test_empty_input_file_gets_an_empty_typed_part(tiny, tmp_path):
    path, _ = tiny
    pq.write_table(pa.table({"row": pa.array([], pa.int64()), "ids": pa.array([], pa.list_(pa.int64()))}), tmp_path / "e.parquet")
    r = run_job(ids_op(path), str(tmp_path / "e.parquet"), str(tmp_path / "out"), progress=False)
    t = pq.read_table(tmp_path / "out" / r.parts_written[0])
    assert t.num_rows == 0 and {"row", "ids", "output_ids", "error"} <= set(t.column_names)
    assert run_job(ids_op(path), str(tmp_path / "e.parquet"), str(tmp_path / "out"), progress=False).parts_skipped == r.parts_written


def test_input_errors_are_clear(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_job(ids_op(path), str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        run_job(ids_op(path), str(tmp_path / "x.csv"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="rows_per_part must be an int >= 1"):
        run_job(ids_op(path), str(tmp_path / "x.csv"), str(tmp_path / "out"), rows_per_part=0)


# --- S3: a real server on 127.0.0.1 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    # moto[server] and s3fs are in the dev extra: a missing one fails here rather than skipping.
    import moto.server
    import s3fs  # noqa: F401  (the s3:// filesystem fsspec loads)

    # moto's server mode: a real HTTP S3 endpoint, on a port the OS picks, in this process.
    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("jobs")
    yield fs, options
    server.stop()


def test_job_over_s3(tiny, s3):
    path, engine = tiny
    fs, options = s3
    with fs.open("jobs/in/part-0.parquet", "wb") as f:
        pq.write_table(pa.table(id_rows(5)), f)
    rows = id_rows(8)
    write_jsonl(fs, "jobs/in/part-1.jsonl", [{"row": r + 100, "ids": i} for r, i in zip(rows["row"], rows["ids"])])
    r = run_job(ids_op(path), "s3://jobs/in", "s3://jobs/out", batch_size=3, rows_per_part=4,
                storage_options=options, progress=False)
    assert len(r.parts_written) == 4 and r.rows_generated == 13
    out = read_output(fs, "jobs/out")
    assert out.column("row").to_pylist() == list(range(5)) + [r + 100 for r in range(8)]
    ref = engine.generate(input_ids=id_rows(5)["ids"] + rows["ids"], sampling_params={"temperature": 0, "max_new_tokens": 3})
    assert out.column("output_ids").to_pylist() == [o["output_ids"] for o in ref]
    again = run_job(ids_op(path), "s3://jobs/in/*", "s3://jobs/out", batch_size=3, rows_per_part=4,
                    storage_options=options, progress=False)
    assert again.parts_written == [] and len(again.parts_skipped) == 4
    assert not [p for p in fs.ls("jobs/out", refresh=True) if os.path.basename(p).startswith(".")]
    # Another sampling configuration: every part is regenerated, none reused.
    shorter = ids_op(path, sampling_params={"temperature": 0, "max_new_tokens": 1})
    changed = run_job(shorter, "s3://jobs/in", "s3://jobs/out", batch_size=3, rows_per_part=4,
                      storage_options=options, progress=False)
    assert changed.parts_skipped == [] and sorted(changed.parts_replaced) == sorted(r.parts_written)
    assert read_output(fs, "jobs/out").column("output_ids").to_pylist() == [o["output_ids"][:1] for o in ref]


def test_cli_job_over_s3_with_storage_options(tiny, s3, capsys):
    from pipeline_infer.cli import main

    path, engine = tiny
    fs, options = s3
    rows = id_rows(3)
    write_jsonl(fs, "jobs/cli/in.jsonl", [{"ids": i} for i in rows["ids"]])
    args = ["generate", "-i", "s3://jobs/cli/in.jsonl", "-o", "s3://jobs/cli/out", "--input-ids-column", "ids",
            "--model", path, "--engine-option", "random_seed=0", "--temperature", "0", "--max-new-tokens", "2",
            "--limit", "2", "--output-ids", "--no-progress"] + [f"--storage-option={k}={v}" for k, v in options.items()]
    assert main(args) == 0
    assert "wrote 1 part(s), 2 row(s)" in capsys.readouterr().err
    out = read_output(fs, "jobs/cli/out")
    assert out.column("ids").to_pylist() == rows["ids"][:2]
    ref = engine.generate(input_ids=rows["ids"][:2], sampling_params={"temperature": 0, "max_new_tokens": 2})
    assert out.column("output_ids").to_pylist() == [o["output_ids"] for o in ref]
    meta = json.loads(pq.read_schema(fs.open(fs.ls("jobs/cli/out")[0], "rb")).metadata[b"pipeline_infer"])
    assert meta["sampling_params"] == {"max_new_tokens": 2, "temperature": 0.0} and meta["ended_by"] == "limit"


# --- crash safety ----------------------------------------------------------------------------------------------


_KILLED_JOB = textwrap.dedent(
    """
    import sys
    from pipeline_infer.operators import GenerateOp, run_job
    model, src, dst = sys.argv[1:4]
    op = GenerateOp(input_ids_column="ids", model=model, engine_options={"random_seed": 0}, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 48, "ignore_eos": True})
    run_job(op, src, dst, batch_size=2, rows_per_part=4, progress=False)
    """
)


def test_a_killed_job_reruns_to_exactly_the_input_rows(tiny, tmp_path):
    path, _ = tiny
    n = 200
    pq.write_table(pa.table(id_rows(n)), tmp_path / "rows.parquet")
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_JOB, path, str(tmp_path / "rows.parquet"), str(out_dir)],
        cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out_dir.exists() and len([p for p in os.listdir(out_dir) if p.endswith(".parquet")]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p: os.path.getmtime(out_dir / p) for p in os.listdir(out_dir) if p.endswith(".parquet")}
    assert 0 < len(done_before) < n // 4
    shutil.copytree(out_dir, tmp_path / "killed")  # the same crash, for the changed-configuration rerun below

    op = GenerateOp(input_ids_column="ids", model=path, engine_options=OPTS, output_ids=True,
                    sampling_params={"temperature": 1.0, "max_new_tokens": 48, "ignore_eos": True})
    result = run_job(op, str(tmp_path / "rows.parquet"), str(out_dir), batch_size=2, rows_per_part=4, progress=False)
    assert set(result.parts_skipped) == set(done_before)
    assert all(os.path.getmtime(out_dir / p) == t for p, t in done_before.items())
    out = read_output(fsspec.filesystem("file"), str(out_dir))
    assert out.column("row").to_pylist() == list(range(n))  # every row once, in order
    assert all(len(ids) == 48 for ids in out.column("output_ids").to_pylist())
    assert not [p for p in os.listdir(out_dir) if p.startswith(".")]

    # The parts written before the kill sampled exactly as an uninterrupted run would have.
    fresh = run_job(op, str(tmp_path / "rows.parquet"), str(tmp_path / "fresh"), batch_size=5, rows_per_part=8, progress=False)
    assert read_output(fsspec.filesystem("file"), str(tmp_path / "fresh")).column("output_ids").equals(out.column("output_ids"))
    assert fresh.rows_generated == n

    # After the same crash, a rerun with another configuration reuses none of the killed run's parts.
    changed = GenerateOp(input_ids_column="ids", model=path, engine_options=OPTS, output_ids=True,
                         sampling_params={"temperature": 1.0, "max_new_tokens": 3, "ignore_eos": True})
    redo = run_job(changed, str(tmp_path / "rows.parquet"), str(tmp_path / "killed"), batch_size=8, rows_per_part=4,
                   progress=False)
    assert redo.parts_skipped == [] and set(redo.parts_replaced) == set(done_before) and redo.rows_generated == n
    out = read_output(fsspec.filesystem("file"), str(tmp_path / "killed"))
    assert out.column("row").to_pylist() == list(range(n))
    assert all(len(ids) == 3 for ids in out.column("output_ids").to_pylist())


def test_an_output_folder_inside_the_input_folder_is_not_read_back(tiny, tmp_path):
    path, _ = tiny
    pq.write_table(pa.table(id_rows(3)), tmp_path / "rows.parquet")
    first = run_job(ids_op(path), str(tmp_path), str(tmp_path / "out"), progress=False)
    again = run_job(ids_op(path), str(tmp_path), str(tmp_path / "out"), progress=False)
    assert len(first.parts_written) == 1 and again.parts_skipped == first.parts_written and again.parts_written == []


# --- progress ---------------------------------------------------------------------------------------------------


def test_progress_bar_shows_rows_tokens_per_second_and_a_token_eta(capsys, monkeypatch):
    from pipeline_infer.operators import progress

    clock = [100.0]
    monkeypatch.setattr(progress, "_now", lambda: clock[0])
    bar = progress.JobProgress(10, enabled=True)
    bar.skip(2)  # finished by an earlier run
    clock[0] += 10
    bar.done(4, 100, 1)  # 4 rows, 100 tokens in 10 s: 10 tok/s, 25 tokens a row
    bar.close()
    err = capsys.readouterr().err
    # 4 rows left x 25 tokens / 10 tok/s = 10 s
    assert "6/10" in err and "row" in err and "tok/s=10" in err and "eta=00:10" in err
    assert "skipped=2" in err and "errors=1" in err
