"""Structured output (json_schema / regex / ebnf through xgrammar) on the bundled model (CPU)."""

from __future__ import annotations

import json
import re

import pytest
import torch

try:
    import jsonschema
    import xgrammar as xgr
except ImportError:  # the GPU machine may lack them; the sampler-mask test below needs neither
    xgr = jsonschema = None

needs_xgrammar = pytest.mark.skipif(xgr is None, reason="needs xgrammar and jsonschema (the dev extra)")

# Compact on purpose (a 135M model on two CPU cores), yet with a nested object, enums, an array,
# an integer range and a bounded string.
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "size": {
            "type": "object",
            "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 99}, "unit": {"enum": ["cm", "in"]}},
            "required": ["w", "unit"],
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "name": {"type": "string", "maxLength": 3},
    },
    "required": ["kind", "size", "tags", "name"],
}


@needs_xgrammar
def test_every_json_schema_sample_parses_and_validates(bundled_engine):
    engine = bundled_engine
    params = {"n": 50, "temperature": 1.0, "max_new_tokens": 96, "json_schema": json.dumps(SCHEMA)}
    outs = engine.generate("Describe a pet as JSON:", params)
    assert len(outs) == 50
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len({out["text"] for out in outs}) > 10  # temperature 1 still samples


@needs_xgrammar
def test_grammars_compile_once_per_schema(bundled_engine):
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    params = {"temperature": 0, "max_new_tokens": 16, "json_schema": schema}
    first = bundled_engine.generate(["Answer as JSON:", "Reply as JSON:"], params)
    compiled = bundled_engine._grammars.num_compiled
    again = bundled_engine.generate("Answer as JSON:", {**params, "json_schema": json.loads(schema)})  # a dict too
    assert bundled_engine._grammars.num_compiled == compiled
    assert again["text"] == first[0]["text"] and json.loads(again["text"])["ok"] in (True, False)


@needs_xgrammar
def test_regex_outputs_full_match(bundled_engine):
    pattern = r"(yes|no), [0-9]{2}-[a-z]{2,4}"
    outs = bundled_engine.generate("Answer:", {"n": 8, "temperature": 1.0, "max_new_tokens": 24, "regex": pattern})
    for out in outs:
        assert re.fullmatch(pattern, out["text"]), out["text"]


@needs_xgrammar
def test_ebnf_grammar(bundled_engine):
    grammar = 'root ::= "The answer is " ("yes" | "no" | "maybe") "."'
    outs = bundled_engine.generate("Q: Is the sky blue?\nA:", {"n": 4, "temperature": 1.0, "max_new_tokens": 16, "ebnf": grammar})
    for out in outs:
        assert out["text"] in ("The answer is yes.", "The answer is no.", "The answer is maybe.")


@needs_xgrammar
def test_constraints_are_per_request_in_a_mixed_batch(bundled_engine):
    greedy = {"temperature": 0, "max_new_tokens": 12}
    alone = bundled_engine.generate("The capital of France is", greedy)
    mixed = bundled_engine.generate(
        ["The capital of France is", "The capital of France is"], [greedy, {**greedy, "regex": "[0-9]{4}"}]
    )
    assert mixed[0]["output_ids"] == alone["output_ids"]
    assert re.fullmatch("[0-9]{4}", mixed[1]["text"])


@needs_xgrammar
@pytest.mark.parametrize(
    "params, match",
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": json.dumps({"type": "nonsense"})}, "invalid json_schema"),
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"ebnf": "root ::= missing_rule"}, "invalid ebnf"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "only one of"),
        ({"structural_tag": "{}"}, "structural_tag is not supported"),
    ],
)
def test_invalid_grammar_fails_that_call_only(bundled_engine, params, match):
    with pytest.raises(ValueError, match=match):
        bundled_engine.generate(["Hi", "Hello"], [{"max_new_tokens": 4}, {"max_new_tokens": 4, **params}])
    out = bundled_engine.generate("Hi", {"max_new_tokens": 4, "temperature": 0, "regex": "[ab]{4}"})
    assert re.fullmatch("[ab]{4}", out["text"])
    assert bundled_engine.get_server_info()["num_running"] == 0


@needs_xgrammar
def test_bitmask_unpacking_matches_xgrammar():
    from pipeline_infer.structured import unpack_bitmask

    torch.manual_seed(0)
    V = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (V + 31) // 32), dtype=torch.int32)
    logits = torch.randn(3, V)
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, bitmask)
    ours = torch.where(unpack_bitmask(bitmask, V), logits, float("-inf"))
    assert torch.equal(ours, ref)


@needs_xgrammar
def test_generate_op_json_schema_column_is_an_arrow_struct(bundled_engine):
    import pyarrow as pa

    from pipeline_infer.operators import GenerateOp, register_engine
    from pipeline_infer.operators.json_output import arrow_type

    register_engine(bundled_engine, None, random_seed=0)  # the session's engine serves the op
    schema = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
            "facts": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}},
                      "maxItems": 2},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "facts", "ok"],
    }
    table = pa.table({"country": ["France", "Italy", "Norway"]})
    op = GenerateOp(template="The capital of {country}, as JSON:", json_schema=schema, engine_options={"random_seed": 0},
                    sampling_params={"temperature": 0, "max_new_tokens": 48})
    out = op(table)
    assert out.schema.field("json").type == arrow_type(schema)
    assert out.column("error").null_count == 3
    for row, text in zip(out.column("json").to_pylist(), out.column("generated_text").to_pylist()):
        assert row["city"] in ("Paris", "Rome", "Oslo") and row == {**json.loads(text), **{"facts": row["facts"]}}
    # Cut short by max_new_tokens: the text stays, the struct is null, the error says why.
    short = GenerateOp(template="The capital of {country}, as JSON:", json_schema=schema, engine_options={"random_seed": 0},
                       sampling_params={"temperature": 0, "max_new_tokens": 3})(table)
    assert short.column("json").null_count == 3 and all(short.column("generated_text").to_pylist())
    assert all("not valid JSON" in e for e in short.column("error").to_pylist())
    assert GenerateOp(prompt_column="x", json_schema=schema).fingerprint() != GenerateOp(prompt_column="x").fingerprint()
    with pytest.raises(ValueError, match="already constrains"):
        GenerateOp(prompt_column="x", json_schema=schema, sampling_params={"regex": "a"})


@pytest.mark.gpu
def test_gpu_sampler_applies_the_grammar_mask_on_the_device():
    from pipeline_infer.sampler import Sampler, SamplingBatchInfo
    from pipeline_infer.sampling_params import SamplingParams

    V, B = 1000, 4
    allowed = [{5, 7}, {999}, set(range(100, 200)), set(range(V))]
    bitmask = torch.zeros(B, (V + 31) // 32, dtype=torch.int32)
    for row, toks in enumerate(allowed):
        for t in toks:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    logits = torch.randn(B, V, device="cuda") * 5
    for params in ([SamplingParams(temperature=0)] * B, [SamplingParams(temperature=1.0, top_p=0.9)] * B):
        info = SamplingBatchInfo.build(params, [[1]] * B, [[]] * B, [None] * B, V, torch.device("cuda"),
                                       vocab_bitmask=bitmask)
        for _ in range(20):
            tokens = Sampler()(logits, info).tolist()
            assert all(t in ok for t, ok in zip(tokens, allowed))
