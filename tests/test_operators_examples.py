"""examples/parquet_job.py (the `make demo` job) on the bundled model, in-process.

The example builds its op with default engine options; the session engine is registered for
them so that the test does not load a second model.
"""

from __future__ import annotations

import importlib.util
import os

import pyarrow.parquet as pq

from pipeline_infer.operators import register_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parquet_job_example_writes_and_prints_rows_then_resumes(bundled_engine, tmp_path, capsys):
    register_engine(bundled_engine, None)
    example = load_example("parquet_job")
    src = os.path.join(ROOT, "examples", "data", "prompts.parquet")
    prompts = pq.read_table(src).column("prompt").to_pylist()
    assert len(prompts) >= 8  # the shipped data: enough rows for several parts

    argv = ["--output", str(tmp_path / "gen"), "--limit", "5", "--max-new-tokens", "4", "--show", "2"]
    table = example.main(argv)
    printed = capsys.readouterr().out
    assert "5 rows generated" in printed and f"Q: {prompts[0]}" in printed and f"Q: {prompts[1]}" in printed
    assert table.column("prompt").to_pylist() == prompts[:5] and table.column("error").to_pylist() == [None] * 5
    tok = bundled_engine.tokenizer
    rendered = [
        tok.apply_chat_template([{"role": "system", "content": "Answer in one or two sentences."},
                                 {"role": "user", "content": p}])
        for p in prompts[:5]
    ]
    expected = [o["text"] for o in bundled_engine.generate(rendered, {"temperature": 0, "max_new_tokens": 4})]
    assert table.column("generated_text").to_pylist() == expected
    assert f"A: {expected[0]!r}" in printed
    parts = sorted(p for p in os.listdir(tmp_path / "gen") if p.endswith(".parquet"))
    assert [pq.read_metadata(tmp_path / "gen" / p).num_rows for p in parts] == [4, 1]

    again = example.main(argv)  # the demo's second run: everything skipped, same rows printed
    assert "0 rows generated" in capsys.readouterr().out and again.equals(table)
