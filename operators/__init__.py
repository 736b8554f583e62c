"""Dataflow operators: run an LLM over datasets, Arrow streams and Parquet/JSONL files.

    from pipeline_infer.operators import GenerateOp, run_job, stream_generate

`GenerateOp` is a map function (datasets `Dataset.map(op, batched=True)`, Ray `map_batches`);
`stream_generate` runs it over an iterator of Arrow batches with a look-ahead window;
`run_job` runs it over files (local or any fsspec URL) into resumable Parquet parts.
"""

from pipeline_infer.operators.engine_pool import get_engine, register_engine, shutdown_engines
from pipeline_infer.operators.generate_op import GenerateOp
from pipeline_infer.operators.job import JobResult, run_job
from pipeline_infer.operators.stream import stream_generate

__all__ = [
    "GenerateOp",
    "JobResult",
    "get_engine",
    "register_engine",
    "run_job",
    "shutdown_engines",
    "stream_generate",
]
