"""Run the bundled model over a Parquet file of prompts; write Parquet parts next to it.

    python examples/parquet_job.py                 # examples/data/prompts.parquet -> examples/data/generations/
    python examples/parquet_job.py --input 's3://bucket/prompts/*.parquet' --output s3://bucket/out

The same job from the shell:

    pipeline-infer generate --input examples/data/prompts.parquet --output examples/data/generations \\
        --prompt-column prompt --system-prompt "Answer in one or two sentences." \\
        --temperature 0 --max-new-tokens 32 --rows-per-part 4

Run it twice: the second run finds every part finished and skips it. Resume is keyed on the
input file and on the model, prompt settings and sampling parameters, so changing any of them
(say --max-new-tokens) regenerates instead of reusing stale parts.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from typing import Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_infer.operators import GenerateOp, run_job

HERE = os.path.dirname(os.path.abspath(__file__))


def read_output(url: str) -> pa.Table:
    """Every part of an output folder (local or fsspec URL), in part order."""
    fs, path = fsspec.core.url_to_fs(url)
    parts = sorted(p for p in fs.ls(path, detail=False) if posixpath.basename(p).endswith(".parquet")
                   and not posixpath.basename(p).startswith((".", "_")))
    tables = []
    for p in parts:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def main(argv: Sequence[str] | None = None) -> pa.Table:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=os.path.join(HERE, "data", "prompts.parquet"))
    parser.add_argument("--output", default=os.path.join(HERE, "data", "generations"))
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--show", type=int, default=4, help="rows to print")
    args = parser.parse_args(argv)

    op = GenerateOp(
        "prompt",  # the column holding each prompt
        system_prompt="Answer in one or two sentences.",  # applies the model's chat template
        model=args.model,
        sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens},
    )
    # Small parts so that even this demo shows resume at work: rerun it and every part is skipped.
    result = run_job(op, args.input, args.output, rows_per_part=4, batch_size=8, limit=args.limit)
    print(
        f"\n{result.rows_generated} rows generated ({result.generated_tokens} tokens, {result.row_errors} row errors), "
        f"{result.rows_skipped} rows skipped as already done, in {result.seconds:.1f}s -> {args.output}\n"
    )
    table = read_output(args.output)
    for row in table.slice(0, args.show).to_pylist():
        answer = row["generated_text"] if row["error"] is None else f"<error: {row['error']}>"
        print(f"Q: {row['prompt']}\nA: {answer!r}  [{row['finish_reason']}, {row['completion_tokens']} tokens]\n")
    print(f"{table.num_rows} rows in {args.output}; columns: {', '.join(table.column_names)}")
    return table


if __name__ == "__main__":
    main()
