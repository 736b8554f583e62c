"""`pipeline-infer` command line: run a model over Parquet/JSONL files.

    pipeline-infer generate --input 's3://bucket/prompts/*.parquet' --output s3://bucket/out \\
        --template 'Translate to French: {text}' --max-new-tokens 128 --temperature 0

Reruns resume (finished parts are skipped) unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value parsed as JSON when it is JSON (numbers, true/false) else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline-infer", description="Run LLMs over datasets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser(
        "generate",
        help="generate text for every row of Parquet/JSONL files into Parquet parts",
        description="Generate text for every row of Parquet/JSONL files (local paths or fsspec URLs such as "
        "s3://...) and write Parquet parts with the input columns plus the generated ones. "
        "A rerun resumes: parts finished with the same configuration are skipped.",
    )
    io = gen.add_argument_group("input and output")
    io.add_argument("--input", "-i", action="append", required=True, metavar="PATH",
                    help="a file, folder or glob (local or fsspec URL); repeat for several")
    io.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (local or fsspec URL)")
    io.add_argument("--input-format", choices=("parquet", "jsonl"), help="default: from each file's extension")
    io.add_argument("--limit", type=_nonnegative_int, metavar="N", help="process only the first N input rows")
    io.add_argument("--rows-per-part", type=_positive_int, default=10_000, metavar="N",
                    help="rows per output part: the unit of resume (default 10000)")
    io.add_argument("--storage-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                    help="fsspec storage option, e.g. endpoint_url=... ; repeatable")
    resume = io.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="skip parts an earlier run finished with this configuration (default)")
    resume.add_argument("--overwrite", "--no-resume", dest="resume", action="store_false",
                        help="regenerate every part, replacing existing ones")

    src = gen.add_argument_group("prompts (exactly one of the first four)")
    src.add_argument("--prompt-column", metavar="COL", help="column holding the prompt text")
    src.add_argument("--template", metavar="TEXT", help="format template over columns, e.g. 'Summarize: {body}'")
    src.add_argument("--messages-column", metavar="COL", help="column of chat messages [{role, content}, ...]")
    src.add_argument("--input-ids-column", metavar="COL", help="column of token-id lists")
    src.add_argument("--system-prompt", metavar="TEXT", help="system message (applies the chat template)")
    chat = src.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", dest="chat_template", action="store_true", default=None,
                      help="wrap each prompt as a user message in the model's chat template")
    chat.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    src.add_argument("--too-long", choices=("error", "truncate"), default="error",
                     help="a prompt over the limit: error row (default) or keep its last tokens")
    src.add_argument("--max-prompt-tokens", type=_positive_int, metavar="N", help="prompt token limit (default: context)")

    model = gen.add_argument_group("model and engine")
    model.add_argument("--model", "-m", metavar="PATH", help="model folder or Hub id (default: bundled SmolLM2-135M-Instruct)")
    model.add_argument("--engine-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="Engine option, e.g. max_running_requests=128 ; repeatable")

    samp = gen.add_argument_group("sampling")
    samp.add_argument("--max-new-tokens", type=_nonnegative_int, metavar="N")
    samp.add_argument("--temperature", type=float, metavar="T", help="0 is greedy")
    samp.add_argument("--top-p", type=float, metavar="P")
    samp.add_argument("--top-k", type=int, metavar="K")
    samp.add_argument("--min-p", type=float, metavar="P")
    samp.add_argument("--repetition-penalty", type=float, metavar="X")
    samp.add_argument("--frequency-penalty", type=float, metavar="X")
    samp.add_argument("--presence-penalty", type=float, metavar="X")
    samp.add_argument("--stop", action="append", metavar="TEXT", help="stop string; repeatable")
    samp.add_argument("--n", type=_positive_int, metavar="N", help="samples per row (list columns when > 1)")
    samp.add_argument("--ignore-eos", action="store_true", default=None)
    samp.add_argument("--sampling-params", type=_json_object, metavar="JSON",
                      help="more sampling parameters as a JSON object (flags above win)")
    samp.add_argument("--seed", type=int, default=0, help="run seed; each row's seed derives from it (default 0)")

    out = gen.add_argument_group("output columns and execution")
    out.add_argument("--output-column", default="generated_text", metavar="COL")
    out.add_argument("--column-prefix", default="", metavar="PREFIX", help="prefix for every new column")
    out.add_argument("--error-column", default="error", metavar="COL")
    out.add_argument("--no-metadata", dest="metadata", action="store_false",
                     help="leave out finish_reason and token-count columns")
    out.add_argument("--output-ids", action="store_true",
                     help="also write the generated token ids (an output_ids column)")
    out.add_argument("--on-error", choices=("column", "raise"), default="column",
                     help="bad rows: message in the error column (default) or stop the job")
    out.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="rows per engine call")
    out.add_argument("--window", type=_positive_int, default=None, metavar="N",
                     help="batches in flight (default 8: enough queued rows to keep a GPU engine's batch full)")
    out.add_argument("--num-gpus", type=_positive_int, default=None, metavar="N",
                     help="engine processes, one per GPU, over disjoint parts (default: every visible GPU; "
                          "1 process on a machine without GPUs, where N > 1 runs N CPU processes)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    gen.set_defaults(handler=_generate, subparser=gen)  # errors then name the subcommand
    return parser


_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "frequency_penalty", "presence_penalty", "stop", "n", "ignore_eos")


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(args.sampling_params or {})
    params.update({k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None})
    return params


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pipeline_infer.operators import GenerateOp, run_job

    sources = [f"--{n.replace('_', '-')}" for n in ("prompt_column", "template", "messages_column", "input_ids_column")
               if getattr(args, n) is not None]
    if len(sources) != 1:
        parser.error(
            "pass exactly one of --prompt-column, --template, --messages-column, --input-ids-column"
            + (f" (got {' and '.join(sources)})" if sources else "")
        )
    try:
        op = GenerateOp(
            args.prompt_column,
            template=args.template,
            messages_column=args.messages_column,
            input_ids_column=args.input_ids_column,
            system_prompt=args.system_prompt,
            chat_template=args.chat_template,
            model=args.model,
            engine_options=dict(args.engine_option),
            sampling_params=_sampling_params(args),
            seed=args.seed,
            output_column=args.output_column,
            column_prefix=args.column_prefix,
            metadata=args.metadata,
            output_ids=args.output_ids,
            error_column=args.error_column,
            too_long=args.too_long,
            max_prompt_tokens=args.max_prompt_tokens,
            on_error=args.on_error,
        )
        result = run_job(
            op,
            args.input,
            args.output,
            batch_size=args.batch_size,
            **({"window": args.window} if args.window is not None else {}),  # else run_job's default
            rows_per_part=args.rows_per_part,
            resume=args.resume,
            limit=args.limit,
            input_format=args.input_format,
            storage_options=dict(args.storage_option),
            progress=args.progress,
            num_gpus=args.num_gpus,
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(
        f"wrote {len(result.parts_written)} part(s), {result.rows_generated} row(s) "
        f"({result.row_errors} with errors, {result.generated_tokens} tokens) to {result.output}; "
        f"skipped {len(result.parts_skipped)} finished part(s) ({result.rows_skipped} rows) "
        f"in {result.seconds:.1f}s",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
