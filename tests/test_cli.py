"""The `pipeline-infer` command line: help, argument errors, and one job end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline_infer.cli import main
from pipeline_infer.operators import register_engine

OPTS = {"random_seed": 0}


def test_module_help_runs_without_loading_a_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline_infer.cli", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "generate" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipeline_infer.cli", "generate", "--help"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0
    for flag in ("--input", "--output", "--prompt-column", "--template", "--messages-column", "--limit",
                 "--resume", "--overwrite", "--max-new-tokens", "--temperature", "--batch-size"):
        assert flag in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--output", "o", "--prompt-column", "t"], "the following arguments are required: --input"),
        (["generate", "-i", "x.jsonl", "-o", "o"], "exactly one of --prompt-column, --template"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--template", "{t}"], "got --prompt-column and --template"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--batch-size", "0"], "expected a positive integer, got 0"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--temperature", "hot"], "invalid float value: 'hot'"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--template", "{row.secret}"], "template field {row.secret} is not allowed"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--engine-option", "page_sz=4"], "did you mean 'page_size'"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--engine-option", "nokey"], "expected KEY=VALUE"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--sampling-params", "[1]"], "expected a JSON object"),
        (["generate", "-i", "x.jsonl", "-o", "o", "--prompt-column", "t", "--resume", "--overwrite"], "not allowed with argument"),
        (["generate", "-i", "missing.jsonl", "-o", "o", "--prompt-column", "t"], "input 'missing.jsonl' does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_job_end_to_end_and_resume(bundled_engine, tmp_path, capsys):
    register_engine(bundled_engine, None, **OPTS)
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"topic": t}) for t in ["the sea", "the moon", "bread"]) + "\n")
    args = ["generate", "-i", str(src), "-o", str(tmp_path / "out"), "--template", "Write a title about {topic}:",
            "--max-new-tokens", "4", "--temperature", "0", "--engine-option", "random_seed=0",
            "--column-prefix", "llm_", "--no-progress", "--rows-per-part", "2"]
    assert main(args) == 0
    assert "wrote 2 part(s), 3 row(s)" in capsys.readouterr().err
    parts = sorted((tmp_path / "out").glob("*.parquet"))
    table = pq.read_table(parts[0]).to_pydict()
    assert set(table) == {"topic", "llm_generated_text", "llm_finish_reason", "llm_prompt_tokens",
                          "llm_completion_tokens", "llm_cached_tokens", "llm_error"}
    expected = bundled_engine.generate(["Write a title about the sea:", "Write a title about the moon:"],
                                       {"temperature": 0, "max_new_tokens": 4})
    assert table["llm_generated_text"] == [o["text"] for o in expected]
    assert main(args) == 0
    assert "skipped 2 finished part(s) (3 rows)" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert "wrote 2 part(s)" in capsys.readouterr().err
    limited = [a if a != str(tmp_path / "out") else str(tmp_path / "limited") for a in args]
    assert main(limited + ["--limit", "1"]) == 0
    assert "wrote 1 part(s), 1 row(s)" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "limited").column("topic").to_pylist() == ["the sea"]


def test_installed_console_script(tmp_path):
    # `pip install` puts a `pipeline-infer` script next to the interpreter (pyproject's [project.scripts]).
    script = os.path.join(os.path.dirname(sys.executable), "pipeline-infer")
    if not os.path.exists(script):
        pytest.skip(f"no console script at {script}: the package is not installed in this interpreter's environment")
    out = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "--prompt-column" in out.stdout
    out = subprocess.run([script, "generate", "-i", "x.jsonl", "-o", "o"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "exactly one of --prompt-column" in out.stderr
