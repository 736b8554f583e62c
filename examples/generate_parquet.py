"""Run the bundled model over a Parquet file of prompts; write Parquet parts next to it.

    python examples/generate_parquet.py                 # examples/data/prompts.parquet
    python examples/generate_parquet.py --input 's3://bucket/prompts/*.parquet' --output s3://bucket/out

The same job from the shell:

    pipeline-infer generate --input examples/data/prompts.parquet --output examples/data/generations \\
        --prompt-column prompt --system-prompt "Answer in one or two sentences." --max-new-tokens 48

Run it twice: the second run finds every part finished and skips it (resume is keyed on the
model, prompt settings and sampling parameters, so changing any of them regenerates).
"""

import argparse
import os

import pyarrow.parquet as pq

from pipeline_infer.operators import GenerateOp, run_job

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=os.path.join(HERE, "data", "prompts.parquet"))
    parser.add_argument("--output", default=os.path.join(HERE, "data", "generations"))
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    op = GenerateOp(
        "prompt",  # the column holding each prompt
        system_prompt="Answer in one or two sentences.",  # applies the model's chat template
        model=args.model,
        sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens},
    )
    result = run_job(op, args.input, args.output, rows_per_part=8, limit=args.limit)
    print(
        f"\n{result.rows_generated} rows generated ({result.generated_tokens} tokens, {result.row_errors} errors), "
        f"{result.rows_skipped} skipped as already done, in {result.seconds:.1f}s -> {args.output}\n"
    )
    if not args.output.startswith(("s3://", "gs://", "memory://")):
        first = sorted(p for p in os.listdir(args.output) if p.endswith(".parquet"))[0]
        rows = pq.read_table(os.path.join(args.output, first)).to_pylist()
        for row in rows[:4]:
            print(f"Q: {row['prompt']}\nA: {row['generated_text']!r}  [{row['finish_reason']}, {row['completion_tokens']} tokens]\n")


if __name__ == "__main__":
    main()
