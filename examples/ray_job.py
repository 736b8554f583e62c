"""Run a model over Parquet prompts as a Ray Data stage: one engine per actor, one actor per GPU.

    python examples/ray_job.py                     # a local Ray cluster: examples/data/prompts.parquet
                                                   #   -> examples/data/ray_generations/
    python examples/ray_job.py --address auto --model /models/Llama-3.1-8B-Instruct \\
        --input s3://bucket/prompts/ --output s3://bucket/generations/ --system-prompt "Answer briefly."

On a cluster with GPUs every actor takes one GPU and the pool has as many actors as the cluster
has GPUs; on a machine without GPUs it runs one actor on the CPU (--num-actors for more). Ray
reads and writes the files (local paths, s3://, gs://, ...). An actor that dies mid-job is
restarted and its batches retried, so each row is written once; rows that cannot be generated
(an empty prompt, a prompt over the context) keep their message in the `error` column.

For a job on one host that must resume after it is killed, use the file job instead:
`pipeline-infer generate --num-gpus N ...` (see the README, "Scaling out").
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

from pipeline_infer.operators import GenerateOp
from pipeline_infer.operators.ray_data import run_ray_job

HERE = os.path.dirname(os.path.abspath(__file__))


def _key_value(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=os.path.join(HERE, "data", "prompts.parquet"))
    parser.add_argument("--output", default=os.path.join(HERE, "data", "ray_generations"))
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--system-prompt", default=None, help="applies the model's chat template")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--engine-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=None, help="default: one per GPU (1 without GPUs)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: enough to fill the engine)")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto': the one this machine is in)")
    parser.add_argument("--show", type=int, default=4, help="rows to print")
    args = parser.parse_args(argv)

    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)
    op = GenerateOp(
        args.prompt_column,
        system_prompt=args.system_prompt,
        model=args.model,
        engine_options=dict(args.engine_option),
        sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens},
    )
    # overwrite=True: the demo can be rerun. Ray has no resume: a rerun generates every row again.
    run_ray_job(op, args.input, args.output, num_actors=args.num_actors, batch_size=args.batch_size, overwrite=True)

    written = ray.data.read_parquet(args.output)  # Ray reads it back from wherever it is
    print(f"\n{written.count()} rows in {args.output}; columns: {', '.join(written.schema().names)}\n")
    for row in written.take(args.show):
        answer = row["generated_text"] if row["error"] is None else f"<error: {row['error']}>"
        print(f"Q: {row[args.prompt_column]}\nA: {answer!r}\n")
    return written.count()


if __name__ == "__main__":
    main()
