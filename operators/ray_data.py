"""GenerateOp as a Ray Data stage: one engine per actor, as many actors as the cluster has GPUs.

    import ray
    from pipeline_infer.operators import GenerateOp
    from pipeline_infer.operators.ray_data import generate_dataset, run_ray_job

    op = GenerateOp("prompt", sampling_params={"temperature": 0, "max_new_tokens": 128})
    run_ray_job(op, "s3://bucket/prompts/", "s3://bucket/generations/")    # Parquet in, Parquet out
    # or, inside a pipeline of your own:
    ds = generate_dataset(ray.data.read_parquet("s3://bucket/prompts/"), op)

The plain Ray Data spelling works as well, since GenerateOp is a callable class that builds its
engine once per process:

    ds.map_batches(GenerateOp, fn_constructor_kwargs={"prompt_column": "prompt", ...},
                   compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_format="pyarrow")

What the helper adds on top of that:

* the actor pool is sized to the cluster's GPUs (one engine per GPU; one actor on a CPU-only
  cluster unless `num_actors` says otherwise);
* the model loads in the actor's constructor, so Ray counts it as actor start-up and sends no
  batch to an actor that is still loading;
* batches are at least as large as the engine's running-request limit, and `batches_in_flight`
  of them run at once in each actor's one engine (a threaded actor), so continuous batching fills
  the tail of one batch with the next one's rows instead of draining the GPU at every boundary;
* faults: an actor whose process dies (an engine crash, a lost node, `ray.kill`) is restarted by
  Ray (`max_restarts`) and its unfinished batches are retried on it (`max_task_retries`). A batch's
  rows reach the output only when the whole batch returns, so every row comes out exactly once.
  An engine that fails in a way the op reports as an exception other than ValueError/TypeError
  (an aborted generation, a device error) takes its actor down on purpose, to be restarted with a
  fresh engine; a bad row never does that, it stays a row with its message in the error column.

Ray Data does not keep row order (set `DataContext.execution_options.preserve_order` for that)
and has no resume across runs: for a job that must survive its driver, use the file job
(`run_job`, `pipeline-infer generate --num-gpus N`), which writes resumable parts.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import Any

logger = logging.getLogger("pipeline_infer.operators")

DEFAULT_BATCH_SIZE = 256  # rows per Ray batch when the engine's running-request limit is unknown or smaller
# Batches each actor's engine runs at once. With 2 batches of 256 rows a GPU engine (256 running)
# runs short of rows at every batch's tail: 10% more steps than all rows at once, against none
# from 3 on (benchmarks/job_stub_device.py --files 2, the file job's window, same mechanism;
# docs/benchmarks.md, "CPU: the file job against a stub device").
DEFAULT_BATCHES_IN_FLIGHT = 4


class GenerateActor:
    """A GenerateOp inside a Ray Data actor: the engine loads with the actor, not on its first batch."""

    def __init__(self, op_config: dict[str, Any]):
        from pipeline_infer.operators.generate_op import GenerateOp

        self.op = GenerateOp(**op_config)
        self.op.engine  # noqa: B018 - build it now (engine_pool keeps it for this process)

    def __call__(self, batch: Any) -> Any:
        try:
            return self.op(batch)
        except (ValueError, TypeError):
            raise  # the op's configuration or the data's shape: every retry would fail the same way
        except Exception:
            # The engine failed (an aborted step, a device error): its state is not to be
            # trusted. Ending the process lets Ray restart the actor with a fresh engine and
            # retry this actor's batches (bounded by max_task_retries); nothing of them was emitted.
            logger.exception("the engine failed in this Ray actor (pid %d); exiting so that Ray restarts it", os.getpid())
            logging.shutdown()
            os._exit(1)


def generate_dataset(
    ds: Any,
    op: Any,
    *,
    num_actors: int | tuple[int, int] | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    batch_size: int | None = None,
    batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
    max_restarts: int | None = -1,
    max_task_retries: int | None = 3,
    split_blocks: bool = True,
    **map_batches_kwargs: Any,
) -> Any:
    """`ds` with the op's output columns added to every row (a lazy ray.data.Dataset).

    num_actors: engines to run (an int, or (min, max) for an autoscaling pool); default: the
        cluster's GPUs / num_gpus, or 1 on a cluster without GPUs.
    num_gpus: GPUs per actor; default 1 where the cluster has GPUs, else 0 (the engine on the CPU).
    num_cpus: CPUs per actor; default Ray's (1).
    batch_size: rows per batch; default max(256, the op's engine_options max_running_requests).
    batches_in_flight: batches running at once in each actor's engine.
    max_restarts / max_task_retries: Ray's actor fault-tolerance settings (-1: unlimited; None:
        Ray Data's own default). A killed actor's unfinished batches are retried on its
        replacement; a finite max_task_retries stops a batch that keeps crashing its engine from
        restarting actors forever.
    split_blocks: cut the input into blocks of batch_size rows first (a streaming repartition),
        so that a few large input files still spread over every actor.
    map_batches_kwargs: passed on to Dataset.map_batches (memory, resources, accelerator_type, ...).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline_infer.operators.generate_op import GenerateOp

    if not isinstance(op, GenerateOp):
        raise TypeError(f"op must be a GenerateOp, got {type(op).__name__}")
    _check_int("batches_in_flight", batches_in_flight)
    if batch_size is not None:
        _check_int("batch_size", batch_size)
    for name, value in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < -1):
            raise ValueError(f"{name} must be an int >= -1 (-1: unlimited) or None (Ray's default), got {value!r}")
    if not ray.is_initialized():
        ray.init()  # what Ray Data itself would do on first use: connect to RAY_ADDRESS or start a local cluster
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    if num_gpus is None:
        num_gpus = 1 if cluster_gpus >= 1 else 0
    if not isinstance(num_gpus, (int, float)) or isinstance(num_gpus, bool) or num_gpus < 0:
        raise ValueError(f"num_gpus must be a number >= 0 (GPUs per actor), got {num_gpus!r}")
    if num_actors is None:
        num_actors = max(1, int(cluster_gpus // num_gpus)) if num_gpus > 0 else 1
    pool = _pool_sizes(num_actors)
    if batch_size is None:
        batch_size = max(DEFAULT_BATCH_SIZE, op.config["engine_options"].get("max_running_requests") or 0)

    strategy_args = inspect.signature(ActorPoolStrategy.__init__).parameters
    compute_kwargs: dict[str, Any] = dict(pool)
    remote_args: dict[str, Any] = {}
    if batches_in_flight > 1:
        if "enable_true_multi_threading" in strategy_args:
            # Ray >= 2.5x: without this flag a callable class runs one batch at a time even in
            # a threaded actor. GenerateOp is safe to call from several threads (one engine).
            compute_kwargs.update(max_concurrent_calls_per_actor=batches_in_flight, enable_true_multi_threading=True)
        else:
            remote_args["max_concurrency"] = batches_in_flight
    if "max_tasks_in_flight_per_actor" in strategy_args:
        # One more batch queued per actor than it runs: its input is already fetched when a slot frees.
        compute_kwargs["max_tasks_in_flight_per_actor"] = batches_in_flight + 1
    if max_restarts is not None:
        remote_args["max_restarts"] = max_restarts
    if max_task_retries is not None and max_restarts != 0:
        remote_args["max_task_retries"] = max_task_retries

    if split_blocks and "target_num_rows_per_block" in inspect.signature(ds.repartition).parameters:
        # A reader's block holds a whole file (or row group) of prompts, and one block goes to
        # one actor as one task: cut blocks to a batch each so every actor gets a share.
        # Streaming, no shuffle: blocks are split as they pass, never all held at once.
        ds = ds.repartition(target_num_rows_per_block=batch_size)

    kwargs: dict[str, Any] = dict(
        fn_constructor_kwargs={"op_config": op.config},
        compute=ActorPoolStrategy(**compute_kwargs),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_gpus=num_gpus,
        udf_modifying_row_count=False,  # one output row per input row
    )
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    accepted = inspect.signature(ds.map_batches).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    kwargs.update(map_batches_kwargs)
    takes_remote_args = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    if remote_args and not takes_remote_args:
        # Newer Ray drops per-call actor options; its own defaults (unlimited restarts and
        # retries) then apply.
        logger.warning("this Ray version takes no actor options in map_batches; ignoring %s", remote_args)
        remote_args = {}
    with warnings.catch_warnings():
        # Ray 2.5x+ marks **ray_remote_args deprecated, yet it is the only way to set an actor's
        # max_restarts / max_task_retries for map_batches.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated.*")
        return ds.map_batches(GenerateActor, **kwargs, **remote_args)


def run_ray_job(
    op: Any,
    input: str | list[str],
    output: str,
    *,
    input_format: str | None = None,
    filesystem: Any = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    **generate_kwargs: Any,
) -> None:
    """Read Parquet (or JSONL) with Ray's readers, generate, write Parquet with Ray's writer.

    input / output: local paths, or URLs Ray's pyarrow filesystems understand (s3://, gs://, ...).
    filesystem: a pyarrow.fs.FileSystem for both sides (e.g. S3FileSystem(endpoint_override=...));
    storage_options: or fsspec options, to reach the paths through fsspec instead.
    overwrite: replace what is in `output`; otherwise a non-empty output folder is an error (Ray
        writes new file names on every run, so writing into it again would duplicate rows).
    generate_kwargs: see generate_dataset.
    """
    import ray

    if not isinstance(output, str) or not output:
        raise ValueError(f"output must be a folder path or URL, got {output!r}")
    paths = [input] if isinstance(input, str) else list(input)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"input must be a path or URL (or a list of them), got {input!r}")
    if filesystem is None and storage_options is not None:
        filesystem = _fsspec_filesystem(paths[0], storage_options)
    fmt = input_format or _format_of(paths)
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"input_format must be 'parquet' or 'jsonl', got {fmt!r}")
    _check_output(output, filesystem, overwrite)
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=filesystem)
    else:
        ds = ray.data.read_json(paths, lines=True, filesystem=filesystem)
    out = generate_dataset(ds, op, **generate_kwargs)
    write_kwargs: dict[str, Any] = {"filesystem": filesystem}
    if "mode" in inspect.signature(out.write_parquet).parameters:
        from ray.data import SaveMode

        write_kwargs["mode"] = SaveMode.OVERWRITE if overwrite else SaveMode.APPEND  # emptiness checked above
    out.write_parquet(output, **write_kwargs)


def _pool_sizes(num_actors: Any) -> dict[str, int]:
    if isinstance(num_actors, tuple) and len(num_actors) == 2:
        lo, hi = num_actors
        _check_int("num_actors (min)", lo)
        _check_int("num_actors (max)", hi)
        if lo > hi:
            raise ValueError(f"num_actors (min, max) must have min <= max, got {num_actors!r}")
        return {"min_size": lo, "max_size": hi}
    _check_int("num_actors", num_actors)
    return {"size": num_actors}


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _format_of(paths: list[str]) -> str:
    from pipeline_infer.operators.files import detect_format

    formats = {detect_format(p) for p in paths}
    if formats <= {"jsonl"} and formats:
        return "jsonl"
    return "parquet"  # folders and globs: Ray's Parquet reader picks the .parquet files


def _fsspec_filesystem(path: str, storage_options: dict[str, Any]) -> Any:
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(path, **storage_options)
    return PyFileSystem(FSSpecHandler(fs))


def _check_output(output: str, filesystem: Any, overwrite: bool) -> None:
    """Refuse to write a second run's files beside a first run's: they would duplicate rows."""
    if overwrite:
        return
    import pyarrow.fs as pafs

    if filesystem is None:
        filesystem, path = pafs.FileSystem.from_uri(output) if "://" in output else (pafs.LocalFileSystem(), os.path.abspath(output))
    else:
        path = output.split("://", 1)[-1]
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"output {output!r} exists and is not a folder")
    if filesystem.get_file_info(pafs.FileSelector(path, recursive=False)):
        raise ValueError(f"output {output!r} is not empty; pass overwrite=True to replace its contents")
