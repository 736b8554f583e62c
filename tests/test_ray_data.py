"""GenerateOp on Ray Data, on a local Ray cluster on the CPU: two actors, each with its own engine
on the bundled model. The Ray job's rows equal the single-process file job's (greedy); an actor
killed in the middle of a batch is restarted, its batches retried, and every row comes out once;
bad rows stay rows with an error message.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from pipeline_infer.operators import GenerateOp, register_engine, run_job  # noqa: E402
from pipeline_infer.operators import ray_data  # noqa: E402

# A small KV pool: each actor allocates its own, and a CPU engine's default one takes seconds.
OPTS = {"random_seed": 0, "max_total_tokens": 2048}
GREEDY = {"temperature": 0, "max_new_tokens": 4}
TEXTS = ["The capital of France is", "2 + 2 =", "Hello, my name is", "List three primary colors:", "def fibonacci(n):",
         "", "Water boils at", "The sky is", "Once upon a time", "My favourite fruit is"]
COMPARED = ["id", "text", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """A folder with a Parquet input (row 5 has an empty prompt); the jobs write beside it."""
    root = tmp_path_factory.mktemp("ray-job")
    os.makedirs(root / "in")
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), root / "in" / "prompts.parquet")
    return root


@pytest.fixture(scope="module")
def reference(prompts, bundled_engine):
    register_engine(bundled_engine, None, **OPTS)  # greedy output does not depend on the KV pool's size
    run_job(op(), str(prompts / "in"), str(prompts / "single"), batch_size=4, progress=False)
    return read(prompts / "single")


def op() -> GenerateOp:
    return GenerateOp("text", engine_options=OPTS, sampling_params=GREEDY)


def load_example(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(directory) -> list[dict]:
    table = pq.read_table(str(directory))
    return sorted(table.select(COMPARED).to_pylist(), key=lambda r: r["id"])


@pytest.mark.slow
def test_ray_job_rows_equal_the_single_process_job(cluster, prompts, reference):
    assert reference[5]["error"] == "the prompt is empty" and reference[5]["generated_text"] is None
    assert all(r["generated_text"] for i, r in enumerate(reference) if i != 5)

    # examples/ray_job.py drives the helper: GenerateOp(text column, no chat template, greedy) as op() is.
    example = load_example("ray_job")
    argv = ["--input", str(prompts / "in"), "--output", str(prompts / "ray"), "--prompt-column", "text",
            "--max-new-tokens", str(GREEDY["max_new_tokens"]), "--num-actors", "2", "--batch-size", "2"]
    argv += [f"--engine-option={k}={v}" for k, v in OPTS.items()]
    assert example.main(argv) == len(TEXTS)
    assert read(prompts / "ray") == reference
    with pytest.raises(ValueError, match="is not empty"):  # a second run would add its rows beside the first's
        ray_data.run_ray_job(op(), str(prompts / "in"), str(prompts / "ray"), num_actors=2, batch_size=2)

    # The plain Ray Data spelling: GenerateOp itself as the callable class, one engine per actor.
    ds = ray.data.read_parquet(str(prompts / "in")).repartition(target_num_rows_per_block=3)
    out = ds.map_batches(GenerateOp, fn_constructor_kwargs=op().config, compute=ray.data.ActorPoolStrategy(size=2),
                         batch_size=3, batch_format="pyarrow")
    assert sorted(out.select_columns(COMPARED).take_all(), key=lambda r: r["id"]) == reference


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_every_row_comes_out_once(cluster, prompts, reference, tmp_path, monkeypatch):
    marks = str(tmp_path)

    class KillOnce(ray_data.GenerateActor):
        """Kills itself (ray.kill, restart allowed) in the middle of its second batch, once per job."""

        def __init__(self, op_config):
            open(os.path.join(marks, f"started-{os.getpid()}"), "w").close()
            super().__init__(op_config)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    fd = os.open(os.path.join(marks, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
                    time.sleep(120)  # never returns: the kill lands while this batch is unfinished
            return super().__call__(batch)

    monkeypatch.setattr(ray_data, "GenerateActor", KillOnce)
    ray_data.run_ray_job(op(), str(prompts / "in"), str(tmp_path / "out"), num_actors=2, batch_size=2)
    assert os.path.exists(os.path.join(marks, "killed"))
    # Two actors, then the killed one's restart: Ray retries an actor's unfinished tasks on that actor.
    assert len([f for f in os.listdir(marks) if f.startswith("started-")]) >= 3
    assert read(tmp_path / "out") == reference  # every row exactly once, the bad one still a row error


def test_helper_arguments_are_checked(cluster):
    ds = ray.data.from_items([{"text": "hi"}])
    with pytest.raises(TypeError, match="op must be a GenerateOp"):
        ray_data.generate_dataset(ds, lambda b: b)
    with pytest.raises(ValueError, match="num_actors must be an int >= 1"):
        ray_data.generate_dataset(ds, op(), num_actors=0)
    with pytest.raises(ValueError, match="batches_in_flight must be an int >= 1"):
        ray_data.generate_dataset(ds, op(), batches_in_flight=0)
    with pytest.raises(ValueError, match="max_task_retries must be an int >= -1"):
        ray_data.generate_dataset(ds, op(), max_task_retries=-2)


@pytest.mark.slow
def test_ray_job_reads_and_writes_s3(cluster, prompts, reference):
    """Ray's own Parquet reader and writer against an S3 server on 127.0.0.1 (moto), through
    fsspec storage options as in the file job."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        import fsspec

        fs = fsspec.filesystem("s3", **options)
        fs.mkdir("ray-jobs")
        fs.put(str(prompts / "in" / "prompts.parquet"), "ray-jobs/in/prompts.parquet")
        ray_data.run_ray_job(op(), "s3://ray-jobs/in", "s3://ray-jobs/out", storage_options=options,
                             num_actors=1, batch_size=5)
        names = [p for p in fs.ls("ray-jobs/out", refresh=True) if p.endswith(".parquet")]
        table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in names])
        assert sorted(table.select(COMPARED).to_pylist(), key=lambda r: r["id"]) == reference
    finally:
        server.stop()
