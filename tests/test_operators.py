"""GenerateOp on the bundled SmolLM2-135M-Instruct (CPU): parity with Engine.generate, row
errors, batch types, datasets.map (incl. its cache), pickling and the streaming runner.

The reference for every text is Engine.generate on the same engine with the same greedy
params: the op must add nothing to and lose nothing from what the engine returns.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline_infer.operators import GenerateOp, register_engine, stream_generate
from pipeline_infer.operators.generate_op import GenerateOp as _GenerateOpClass

OPTS = {"random_seed": 0}
GREEDY = {"temperature": 0, "max_new_tokens": 6}

# Deliberately not sorted by length: the op sorts them before submitting.
PROMPTS = [
    "Write one sentence about the ocean and the creatures that live in its deepest trenches.",
    "2 + 2 =",
    "The capital of France is",
    "Translate to French: I would like a cup of coffee, please.",
    "Hello, my name is",
]


@pytest.fixture(scope="module")
def engine(bundled_engine):
    # Ops asking for the bundled model with OPTS get the session's engine instead of a second one.
    register_engine(bundled_engine, None, **OPTS)
    return bundled_engine


def op_(**kw) -> GenerateOp:
    kw.setdefault("sampling_params", GREEDY)
    return GenerateOp(engine_options=OPTS, **kw)


def ref_texts(engine, prompts, params=GREEDY):
    return [o["text"] for o in engine.generate(list(prompts), params)]


@pytest.fixture
def count_calls(monkeypatch):
    """How many batches reached the engine (GenerateOp.execute with at least one row)."""
    calls = []
    original = _GenerateOpClass.execute

    def counting(self, prep):
        if prep.order:
            calls.append(len(prep.order))
        return original(self, prep)

    monkeypatch.setattr(_GenerateOpClass, "execute", counting)
    return calls


# --- parity and order ----------------------------------------------------------------------------


def test_greedy_texts_equal_engine_generate_in_input_order(engine):
    out = op_(prompt_column="text")({"text": PROMPTS})
    refs = engine.generate(PROMPTS, GREEDY)
    assert out["generated_text"] == [r["text"] for r in refs]
    assert out["completion_tokens"] == [r["meta_info"]["completion_tokens"] for r in refs]
    assert out["prompt_tokens"] == [r["meta_info"]["prompt_tokens"] for r in refs]
    assert out["finish_reason"] == [r["meta_info"]["finish_reason"]["type"] for r in refs]
    assert out["error"] == [None] * len(PROMPTS)
    assert set(out) == {"generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "error"}


def test_rows_are_submitted_length_sorted_and_returned_in_input_order(engine, monkeypatch):
    submitted = []
    original = engine.generate

    def spy(*args, **kwargs):
        submitted.append([len(ids) for ids in kwargs["input_ids"]])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    out = op_(prompt_column="text")({"text": PROMPTS})
    monkeypatch.undo()
    assert submitted[0] == sorted(submitted[0]) and submitted[0] != [len(engine.tokenizer.encode([p])[0]) for p in PROMPTS]
    assert out["generated_text"] == ref_texts(engine, PROMPTS)


def test_template_and_output_names(engine):
    op = op_(template="Translate to French: {text}", output_column="fr", column_prefix="llm_", metadata=False)
    out = op({"text": ["good morning", "thank you"], "other": [1, 2]})
    assert set(out) == {"llm_fr", "llm_error"}
    assert out["llm_fr"] == ref_texts(engine, ["Translate to French: good morning", "Translate to French: thank you"])


def test_template_over_several_columns_with_numbers(engine):
    op = op_(template="In {year}, the {thing} was")
    out = op({"year": [1969, 1492], "thing": ["moon landing", "voyage"]})
    assert out["generated_text"] == ref_texts(engine, ["In 1969, the moon landing was", "In 1492, the voyage was"])


def test_messages_column_and_system_prompt_use_the_chat_template(engine):
    tok = engine.tokenizer
    convs = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Say hi."}]]
    out = op_(messages_column="messages", system_prompt="Answer in one word.")({"messages": convs})
    rendered = [tok.apply_chat_template([{"role": "system", "content": "Answer in one word."}, *c]) for c in convs]
    assert out["generated_text"] == ref_texts(engine, rendered)
    # A plain prompt column with a system prompt is wrapped as the user turn.
    out2 = op_(prompt_column="q", system_prompt="Answer in one word.")({"q": ["Name a color.", "Say hi."]})
    assert out2["generated_text"] == out["generated_text"]


# --- batch types -----------------------------------------------------------------------------------


def test_arrow_table_and_record_batch_in_give_the_same_type_out(engine):
    table = pa.table({"text": PROMPTS[:3], "id": [1, 2, 3]})
    for batch in (table, table.to_batches()[0]):
        out = op_(prompt_column="text")(batch)
        assert type(out) is type(batch)
        assert out.column_names[:2] == ["text", "id"] and "generated_text" in out.column_names
        assert out.column("generated_text").to_pylist() == ref_texts(engine, PROMPTS[:3])
        assert out.schema.field("prompt_tokens").type == pa.int64()


def test_dict_batch_with_numpy_columns_and_keep_input_columns(engine):
    import numpy as np
    out = op_(prompt_column="text", keep_input_columns=True)({"text": np.array(PROMPTS[:2], dtype=object), "x": [1, 2]})
    assert out["x"] == [1, 2] and out["generated_text"] == ref_texts(engine, PROMPTS[:2])


def test_empty_batch(engine):
    out = op_(prompt_column="text")({"text": []})
    assert out["generated_text"] == [] and out["error"] == []


# --- row errors ----------------------------------------------------------------------------------


def test_bad_rows_get_an_error_and_null_text_others_generate(engine):
    rows = [None, "", 7, b"\xff\xfe bad utf-8", "word " * 50, "The capital of France is", b"Hello, my name is"]
    out = op_(prompt_column="text", max_prompt_tokens=16)({"text": rows})
    err = out["error"]
    assert "null" in err[0]
    assert "empty" in err[1]
    assert "must be text, got int" in err[2]
    assert "not valid UTF-8" in err[3]
    assert "over the limit of 16" in err[4] and "too_long='truncate'" in err[4]
    assert err[5] is None and err[6] is None
    assert out["generated_text"][:5] == [None] * 5
    assert out["generated_text"][5:] == ref_texts(engine, ["The capital of France is", "Hello, my name is"])


def test_prompt_over_the_context_length_is_a_row_error(engine):
    long = "hello " * (engine.context_length + 10)
    out = op_(prompt_column="text")({"text": [long, "2 + 2 ="]})
    assert f"context_length {engine.context_length}" in out["error"][0] and out["generated_text"][0] is None
    assert out["generated_text"][1] == ref_texts(engine, ["2 + 2 ="])[0]


def test_truncate_keeps_the_last_tokens_and_records_it(engine):
    text = "one two three four five six seven eight nine ten eleven twelve. The capital of France is"
    out = op_(prompt_column="text", too_long="truncate", max_prompt_tokens=8)({"text": [text, "2 + 2 ="]})
    ids = engine.tokenizer.encode([text])[0]
    assert len(ids) > 8
    ref = engine.generate(input_ids=ids[-8:], sampling_params=GREEDY)
    assert out["prompt_truncated"] == [True, False]
    assert out["prompt_tokens"][0] == 8 and out["error"] == [None, None]
    assert out["generated_text"][0] == ref["text"]


def test_bad_messages_and_bad_per_row_params_are_row_errors(engine):
    convs = [[{"role": "user", "content": "Say hi."}], "not json", [], [{"role": "user"}]]
    out = op_(messages_column="m", sampling_params_column="sp")(
        {"m": convs, "sp": [None, None, None, None]}
    )
    assert out["error"][0] is None and out["generated_text"][0]
    assert all(e for e in out["error"][1:])
    out = op_(prompt_column="t", sampling_params_column="sp")(
        {"t": ["2 + 2 =", "2 + 2 =", "2 + 2 ="], "sp": [{"temperature": -1}, '{"max_new_tokens": 2}', {"n": 3}]}
    )
    assert "temperature" in out["error"][0]
    assert out["error"][1] is None and out["completion_tokens"][1] == 2
    assert "may not set 'n'" in out["error"][2]


def test_on_error_raise_names_the_row(engine):
    with pytest.raises(ValueError, match=r"row 1: column 'text' is null"):
        op_(prompt_column="text", on_error="raise")({"text": ["ok", None]})


def test_configuration_errors_are_clear(engine):
    with pytest.raises(ValueError, match="exactly one of"):
        GenerateOp()
    with pytest.raises(ValueError, match="exactly one of"):
        GenerateOp("text", template="{text}")
    for bad in ("{x.__class__}", "{x[0]}", "{}", "{0}", "{x:{y}}", "no fields"):
        with pytest.raises(ValueError, match="template"):
            GenerateOp(template=bad)
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        GenerateOp("text", sampling_params={"temprature": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        GenerateOp("text", sampling_params={"top_p": 2})
    with pytest.raises(TypeError, match="did you mean 'page_size'"):
        GenerateOp("text", engine_options={"page_sz": 4})
    with pytest.raises(ValueError, match="too_long must be one of"):
        GenerateOp("text", too_long="cut")
    with pytest.raises(ValueError, match="seed=..."):
        GenerateOp("text", sampling_params={"sampling_seed": 3})
    with pytest.raises(ValueError, match="system_prompt needs the chat template"):
        GenerateOp("text", system_prompt="x", chat_template=False)
    with pytest.raises(ValueError, match=r"no column 'txt'; its columns are \['text'\]"):
        op_(prompt_column="txt")({"text": ["a"]})
    with pytest.raises(TypeError, match="dict of columns"):
        op_(prompt_column="text")(["a", "b"])


# --- sampling: n > 1 and per-row seeds -------------------------------------------------------------------


def test_n_samples_give_list_columns_and_seeds_follow_the_row_key(engine):
    params = {"temperature": 1.0, "max_new_tokens": 5, "n": 2}
    op = op_(prompt_column="text", key_column="id", sampling_params=params)
    out = op({"text": ["Once upon a time", "The weather today"], "id": ["a", "b"]})
    assert all(isinstance(t, list) and len(t) == 2 for t in out["generated_text"])
    assert all(len(c) == 2 for c in out["completion_tokens"])
    # The same row alone, in another batch, with another neighbour: the same samples.
    alone = op({"text": ["The weather today"], "id": ["b"]})
    assert alone["generated_text"][0] == out["generated_text"][1]
    other_seed = GenerateOp("text", key_column="id", sampling_params=params, engine_options=OPTS, seed=1)
    assert other_seed({"text": ["The weather today"], "id": ["b"]})["generated_text"][0] != alone["generated_text"][0]
    # Duplicate prompts without a key still get different samples.
    dup = op_(prompt_column="text", sampling_params={"temperature": 1.0, "max_new_tokens": 8})({"text": ["Once upon a time"] * 2})
    assert dup["generated_text"][0] != dup["generated_text"][1]


# --- pickling and fingerprints --------------------------------------------------------------------------


def test_pickle_carries_configuration_not_the_engine(engine):
    op = op_(prompt_column="text")
    op({"text": ["2 + 2 ="]})  # the engine exists now; it must still not travel
    data = pickle.dumps(op)
    assert len(data) < 2000 and b"Engine" not in data and b"torch" not in data
    clone = pickle.loads(data)
    assert clone == op and clone.fingerprint() == op.fingerprint()
    assert clone({"text": ["2 + 2 ="]})["generated_text"] == ref_texts(engine, ["2 + 2 ="])


def test_fingerprint_is_stable_across_processes_and_tracks_configuration():
    from datasets.fingerprint import Hasher

    op = GenerateOp(template="Q: {q}", sampling_params={"temperature": 0.5}, engine_options=OPTS)
    code = (
        "from pipeline_infer.operators import GenerateOp; from datasets.fingerprint import Hasher; "
        "op = GenerateOp(template='Q: {q}', sampling_params={'temperature': 0.5}, engine_options={'random_seed': 0}); "
        "print(op.fingerprint(), Hasher.hash(op))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert other.stdout.split() == [op.fingerprint(), Hasher.hash(op)]
    changed = [
        GenerateOp(template="Q: {q}", sampling_params={"temperature": 0.6}, engine_options=OPTS),
        GenerateOp(template="Q: {q}?", sampling_params={"temperature": 0.5}, engine_options=OPTS),
        GenerateOp(template="Q: {q}", sampling_params={"temperature": 0.5}, engine_options=OPTS, model="other/model"),
    ]
    assert len({Hasher.hash(o) for o in changed} | {Hasher.hash(op)}) == 4


# --- datasets ---------------------------------------------------------------------------------------------


def test_datasets_map_adds_columns_and_is_cached(engine, tmp_path, count_calls):
    import datasets  # the dev extra: a missing package fails, it does not skip
    datasets.Dataset.from_dict({"text": PROMPTS, "id": list(range(len(PROMPTS)))}).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))  # file-backed: map results are cached
    op = op_(prompt_column="text")
    out = ds.map(op, batched=True, batch_size=2)
    assert out.column_names == ["text", "id", "generated_text", "finish_reason", "prompt_tokens",
                                "completion_tokens", "cached_tokens", "error"]
    assert out["generated_text"] == ref_texts(engine, PROMPTS)
    calls = len(count_calls)
    assert calls == 3
    cache = [f["filename"] for f in out.cache_files]
    assert len(cache) == 1 and cache[0].startswith(str(tmp_path / "ds"))  # map wrote a cache file
    again = ds.map(op_(prompt_column="text"), batched=True, batch_size=2)  # an equal op, a new object
    assert len(count_calls) == calls and again["generated_text"] == out["generated_text"]
    assert [f["filename"] for f in again.cache_files] == cache  # loaded from that file
    hotter = op_(prompt_column="text", sampling_params={"temperature": 0.7, "max_new_tokens": 6})
    hot = ds.map(hotter, batched=True, batch_size=2)
    assert len(count_calls) == calls + 3
    assert [f["filename"] for f in hot.cache_files] != cache


def test_datasets_map_with_arrow_format_and_indices(engine):
    import datasets  # the dev extra: a missing package fails, it does not skip
    ds = datasets.Dataset.from_dict({"text": PROMPTS}).with_format("arrow")
    out = ds.map(op_(prompt_column="text"), batched=True, batch_size=3)
    assert out.column_names[:2] == ["text", "generated_text"]
    assert out.with_format(None)["generated_text"] == ref_texts(engine, PROMPTS)
    sampled = op_(prompt_column="text", sampling_params={"temperature": 1.0, "max_new_tokens": 5})
    a = datasets.Dataset.from_dict({"text": PROMPTS}).map(sampled, batched=True, batch_size=2, with_indices=True)
    b = datasets.Dataset.from_dict({"text": PROMPTS}).map(sampled, batched=True, batch_size=5, with_indices=True)
    assert a["generated_text"] == b["generated_text"]  # seeds follow the row index, not the batch


# --- streaming runner ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_refs(engine):
    return ref_texts(engine, PROMPTS)


# (rows per engine call, batches in flight, rows per input batch): one row a call, more rows
# than the input holds, a window wider than the stream, input batches cut across op batches.
@pytest.mark.parametrize("batch_size,window,chunk", [(2, 1, 2), (3, 3, 2), (1, 2, 3), (8, 2, 1), (4, 8, 5)])
def test_stream_generate_keeps_input_order_whatever_the_window(engine, greedy_refs, batch_size, window, chunk, count_calls):
    table = pa.table({"text": PROMPTS, "i": list(range(len(PROMPTS)))})
    batches = table.to_batches(max_chunksize=chunk)
    out = pa.Table.from_batches(list(stream_generate(op_(prompt_column="text"), batches, batch_size=batch_size, window=window)))
    assert out.column("i").to_pylist() == list(range(len(PROMPTS)))
    assert out.column("generated_text").to_pylist() == greedy_refs
    full, rest = divmod(len(PROMPTS), batch_size)
    assert sorted(count_calls, reverse=True) == [batch_size] * full + ([rest] if rest else [])


def test_stream_generate_pulls_its_input_lazily(engine):
    # Bounded memory: the runner holds at most `window` batches, so it must not read ahead
    # of them; a stream longer than memory is fine.
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield pa.record_batch({"text": [PROMPTS[i % len(PROMPTS)]], "i": [i]})

    op = op_(prompt_column="text", sampling_params={"temperature": 0, "max_new_tokens": 1})
    stream = stream_generate(op, source(), batch_size=1, window=2)
    first = next(stream)
    assert first.column("i").to_pylist() == [0] and len(pulled) <= 3
    rest = list(stream)
    assert [b.column("i").to_pylist() for b in rest] == [[i] for i in range(1, 6)] and len(pulled) == 6


def test_stream_generate_overlaps_batches_in_the_engine(engine, monkeypatch):
    # With window=2 the second batch is submitted while the first is still being generated.
    import threading

    active, peak, lock = [0], [0], threading.Lock()
    original = engine.generate

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(engine, "generate", tracked)
    batches = [pa.record_batch({"text": PROMPTS[:2]}), pa.record_batch({"text": PROMPTS[2:4]})]
    op = op_(prompt_column="text", sampling_params={"temperature": 0, "max_new_tokens": 16, "ignore_eos": True})
    list(stream_generate(op, batches, batch_size=2, window=2))
    assert peak[0] == 2


# --- the engine behind the op --------------------------------------------------------------------------------


def test_engine_is_lazy_and_shared_by_ops_with_the_same_model(engine):
    from pipeline_infer.operators import engine_pool

    GenerateOp("text", engine_options={"random_seed": 424242})  # building an op loads nothing
    assert engine_pool.engine_key(None, {"random_seed": 424242}) not in engine_pool._engines
    a, b = op_(prompt_column="text"), op_(template="{x}", sampling_params={"max_new_tokens": 2})
    assert a.engine is b.engine is engine


def test_unbatched_map_gets_a_clear_error(engine):
    with pytest.raises(TypeError, match="batched=True"):
        op_(prompt_column="text")({"text": "a single row"})


def test_an_engine_abort_fails_the_batch_instead_of_writing_error_rows(engine, monkeypatch):
    # An abort is the engine failing (a broken step, a shutdown), not the row: error rows would
    # be taken for finished work by a resumed job.
    def aborting(*args, **kwargs):
        meta = {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 0,
                "finish_reason": {"type": "abort", "matched": None, "message": "engine error: boom"}}
        return [{"text": "", "output_ids": [], "meta_info": meta} for _ in kwargs["input_ids"]]

    monkeypatch.setattr(engine, "generate", aborting)
    with pytest.raises(RuntimeError, match="engine error: boom"):
        op_(prompt_column="text")({"text": ["a", "b"]})
