"""GenerateOp: an LLM as a batched map function.

    op = GenerateOp(template="Translate to French: {text}", sampling_params={"max_new_tokens": 64})
    ds = ds.map(op, batched=True, batch_size=256)        # adds generated_text, finish_reason, ..., error

    # Output constrained to a JSON schema and parsed into an Arrow struct column "json"
    op = GenerateOp(template="A person from {city} as JSON:", json_schema={"type": "object", ...})

The op holds only its configuration: it pickles small, its `datasets` fingerprint is a hash of
that configuration (so `map` results are cached and recomputed when it changes), and the engine
it drives is looked up in engine_pool on the first batch of each process.

A batch goes through three steps, kept separate so the streaming runner can overlap them
across batches: prepare (render, tokenize, check each row), execute (one engine call for all
valid rows, sorted), assemble (Arrow columns in input order).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pyarrow as pa

from pipeline_infer.operators import engine_pool, json_output, prompts
from pipeline_infer.operators.batch_io import BatchView
from pipeline_infer.operators.rows import (
    Prepared,
    build_columns,
    fallback_keys,
    output_types,
    row_seed,
    submission_order,
)

ON_ERROR = ("column", "raise")
TOO_LONG = ("error", "truncate")

# Hugging Face fast tokenizers are not safe to call from several threads at once, and the
# streaming runner prepares batches on worker threads.
_tokenizer_lock = threading.Lock()


class GenerateOp:
    """Generate text for every row of a batch; see the module docstring.

    Exactly one input: prompt_column (the prompt text), template (a format string over
    columns, e.g. "Summarize: {body}"), messages_column (chat messages, rendered with the
    model's chat template) or input_ids_column (token ids, for models without a tokenizer).
    """

    def __init__(
        self,
        prompt_column: str | None = None,
        *,
        template: str | None = None,
        messages_column: str | None = None,
        input_ids_column: str | None = None,
        system_prompt: str | None = None,
        chat_template: bool | None = None,
        model: str | None = None,
        engine_options: dict[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
        sampling_params_column: str | None = None,
        seed: int | None = 0,
        key_column: str | None = None,
        output_column: str = "generated_text",
        column_prefix: str = "",
        metadata: bool = True,
        output_ids: bool = False,
        error_column: str = "error",
        too_long: str = "error",
        max_prompt_tokens: int | None = None,
        on_error: str = "column",
        keep_input_columns: bool | None = None,
        json_schema: dict[str, Any] | str | None = None,
        json_column: str = "json",
    ):
        # Everything the op is, as plain JSON-able values: pickling, fingerprints and
        # provenance metadata all come from this one dict.
        self._config = dict(
            prompt_column=prompt_column,
            template=template,
            messages_column=messages_column,
            input_ids_column=input_ids_column,
            system_prompt=system_prompt,
            chat_template=chat_template,
            model=model,
            engine_options=dict(engine_options or {}),
            sampling_params=_canonical_params(sampling_params),
            sampling_params_column=sampling_params_column,
            seed=seed,
            key_column=key_column,
            output_column=output_column,
            column_prefix=column_prefix,
            metadata=metadata,
            output_ids=output_ids,
            error_column=error_column,
            too_long=too_long,
            max_prompt_tokens=max_prompt_tokens,
            on_error=on_error,
            keep_input_columns=keep_input_columns,
        )
        # Structured output (json_output.py), kept out of the config unless used so that the
        # fingerprints of ops without it stay what they were.
        if json_schema is not None:
            self._config["json_schema"] = json_output.canonical_schema(json_schema)
            self._config["json_column"] = json_column
        elif json_column != "json":
            raise ValueError("json_column names the parsed column of json_schema=...; pass json_schema too")
        self._validate()

    # --- configuration --------------------------------------------------------------------
    def _validate(self) -> None:
        c = self._config
        given = [m for m in prompts.MODES if c[m] is not None]
        if len(given) != 1:
            raise ValueError(
                f"pass exactly one of {', '.join(prompts.MODES)} to say where prompts come from; got "
                + (", ".join(f"{m}={c[m]!r}" for m in given) if given else "none")
            )
        self.mode = given[0]
        for name in ("prompt_column", "messages_column", "input_ids_column", "sampling_params_column",
                     "key_column", "system_prompt"):
            if c[name] is not None and not isinstance(c[name], str):
                raise TypeError(f"{name} must be a str, got {type(c[name]).__name__} {c[name]!r}")
        for name in ("output_column", "error_column"):
            if not isinstance(c[name], str) or not c[name]:
                raise ValueError(f"{name} must be a non-empty str, got {c[name]!r}")
        if not isinstance(c["column_prefix"], str):
            raise TypeError(f"column_prefix must be a str, got {type(c['column_prefix']).__name__}")
        self._fields = prompts.parse_template(c["template"]) if c["template"] is not None else None
        if c["chat_template"] is None:
            # Chat messages always need the template; a system prompt only makes sense with it.
            self.use_chat = self.mode == "messages_column" or c["system_prompt"] is not None
        elif isinstance(c["chat_template"], bool):
            self.use_chat = c["chat_template"]
        else:
            raise TypeError(f"chat_template must be True, False or None (auto), got {c['chat_template']!r}")
        if self.mode == "messages_column" and not self.use_chat:
            raise ValueError("messages_column needs the chat template: leave chat_template unset or True")
        if self.mode == "input_ids_column" and (self.use_chat or c["system_prompt"] is not None):
            raise ValueError("input_ids_column rows are already tokens: chat_template and system_prompt do not apply")
        if c["system_prompt"] is not None and not self.use_chat:
            raise ValueError("system_prompt needs the chat template: leave chat_template unset or True")
        if c["too_long"] not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {c['too_long']!r}")
        if c["on_error"] not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {c['on_error']!r}")
        mpt = c["max_prompt_tokens"]
        if mpt is not None and (not isinstance(mpt, int) or isinstance(mpt, bool) or mpt < 1):
            raise ValueError(f"max_prompt_tokens must be an int >= 1 or None, got {mpt!r}")
        if c["seed"] is not None and (not isinstance(c["seed"], int) or isinstance(c["seed"], bool)):
            raise TypeError(f"seed must be an int or None, got {c['seed']!r}")
        if not isinstance(c["engine_options"], dict):
            raise TypeError(f"engine_options must be a dict, got {type(c['engine_options']).__name__}")
        from pipeline_infer.config import EngineConfig  # light: validates names and values only

        EngineConfig.from_kwargs(c["model"], **c["engine_options"])
        self.n = c["sampling_params"].get("n", 1)
        if c.get("json_schema") is not None:
            clash = [k for k in ("json_schema", "regex", "ebnf") if k in c["sampling_params"]]
            if clash:
                raise ValueError(f"json_schema=... already constrains the output; drop sampling_params {clash}")
            if not isinstance(c.get("json_column"), str) or not c["json_column"]:
                raise ValueError(f"json_column must be a non-empty str, got {c.get('json_column')!r}")
        names = list(self.column_names().values())
        if len(set(names)) != len(names):
            raise ValueError(f"output column names collide: {names}")

    def column_names(self) -> dict[str, str]:
        """Logical output name -> the column it is written to."""
        c = self._config
        p = c["column_prefix"]
        types = output_types(self.n, c["too_long"] == "truncate", c["output_ids"])
        names = {k: p + k for k in types}
        names["text"] = p + c["output_column"]
        names["error"] = p + c["error_column"]
        if not c["metadata"]:
            names = {k: v for k, v in names.items() if k in ("text", "error", "prompt_truncated", "output_ids")}
        if c.get("json_schema") is not None:
            names["json"] = p + c["json_column"]
        return names

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._config))  # a deep copy the caller may change

    def fingerprint(self) -> str:
        """A hash of the configuration: same op, same hash, in any process, on any day."""
        return hashlib.sha256(json.dumps(self._config, sort_keys=True).encode()).hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        # Only the configuration: never an engine, a tokenizer or a lock. datasets hashes
        # this state for its cache fingerprint, so it must not hold anything run-specific.
        return {"config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["config"])

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._config.items() if v not in (None, {}, "")}
        return f"GenerateOp({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerateOp) and other._config == self._config

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    @property
    def engine(self) -> Any:
        return engine_pool.get_engine(self._config["model"], self._config["engine_options"])

    # --- the map function ----------------------------------------------------------------
    def __call__(self, batch: Any, indices: list[int] | None = None) -> Any:
        """datasets/Ray entry point. `indices` (datasets' with_indices=True) key the row seeds."""
        view = BatchView(batch)
        keys = list(indices) if indices is not None else None
        prep = self.prepare(view, keys=keys)
        self.execute(prep)
        keep = self._config["keep_input_columns"]
        return view.output(self.assemble(prep), keep_input=bool(keep))

    # --- step 1: rows -> token ids, params, errors ------------------------------------------
    def prepare(self, view: BatchView, keys: list[Any] | None = None, row_errors: list[str | None] | None = None) -> Prepared:
        c = self._config
        engine = self.engine
        n = view.num_rows
        if keys is not None and len(keys) != n:
            raise ValueError(f"got {len(keys)} row keys for a batch of {n} rows")
        prep = Prepared(n, [None] * n, [None] * n, list(row_errors or [None] * n), [False] * n)
        texts = self._render(view, prep, engine)
        self._tokenize(texts, prep, engine)
        self._check_lengths(prep, engine)
        self._row_params(view, prep, engine, keys, texts)
        if c["on_error"] == "raise":
            bad = next((i for i in range(n) if prep.errors[i] is not None), None)
            if bad is not None:
                raise ValueError(f"row {bad}: {prep.errors[bad]} (on_error='raise')")
        prep.order = submission_order(prep)
        return prep

    def _render(self, view: BatchView, prep: Prepared, engine: Any) -> list[Any]:
        """The prompt of each row: text, or token ids in input_ids mode; None on error."""
        c = self._config
        n = view.num_rows
        out: list[Any] = [None] * n
        if all(e is not None for e in prep.errors):
            return out  # every row was unreadable: its batch may not even have the columns
        if self.mode == "input_ids_column":
            col = view.column(c["input_ids_column"])
            for i in range(n):
                if prep.errors[i] is None:
                    out[i], prep.errors[i] = prompts.parse_input_ids(col[i], c["input_ids_column"])
            return out
        if engine.tokenizer is None:
            raise ValueError(
                f"the model {c['model'] or '(bundled)'} has no tokenizer: use input_ids_column with token ids"
            )
        if self.mode == "template":
            cols = {name: view.column(name) for name in prompts.template_columns(self._fields)}
            for i in range(n):
                if prep.errors[i] is None:
                    out[i], prep.errors[i] = prompts.render_template(self._fields, {k: v[i] for k, v in cols.items()})
        elif self.mode == "prompt_column":
            col = view.column(c["prompt_column"])
            for i in range(n):
                if prep.errors[i] is None:
                    out[i], prep.errors[i] = prompts.as_text(col[i], f"column {c['prompt_column']!r}")
        messages: list[Any] = [None] * n
        if self.mode == "messages_column":
            col = view.column(c["messages_column"])
            for i in range(n):
                if prep.errors[i] is None:
                    messages[i], prep.errors[i] = prompts.parse_messages(col[i], c["messages_column"])
        elif self.use_chat:
            messages = [[{"role": "user", "content": t}] if t is not None else None for t in out]
        for i in range(n):
            if out[i] == "" and prep.errors[i] is None:
                prep.errors[i] = "the prompt is empty"
            if self.use_chat and messages[i] is not None and prep.errors[i] is None:
                try:
                    out[i] = engine.tokenizer.apply_chat_template(prompts.with_system(messages[i], c["system_prompt"]))
                except Exception as e:  # a template that rejects this conversation (roles, order)
                    out[i], prep.errors[i] = None, f"the chat template failed on this row: {type(e).__name__}: {e}"
        return out

    def _tokenize(self, texts: list[Any], prep: Prepared, engine: Any) -> None:
        if self.mode == "input_ids_column":
            for i, ids in enumerate(texts):
                if prep.errors[i] is None:
                    prep.ids[i] = ids
        else:
            rows = [i for i in range(prep.num_rows) if prep.errors[i] is None]
            # engine.tokenizer.encode is what Engine.generate(prompt=...) itself calls, so
            # passing the ids on gives exactly the generation a text prompt would.
            with _tokenizer_lock:
                encoded = engine.tokenizer.encode([texts[i] for i in rows])
            for i, ids in zip(rows, encoded):
                prep.ids[i] = ids
        for i in range(prep.num_rows):
            if prep.ids[i] is not None and not prep.ids[i]:
                prep.fail(i, "the prompt is empty (no tokens)")
            elif prep.ids[i] is not None:
                bad = next((t for t in prep.ids[i] if not 0 <= t < engine.vocab_size), None)
                if bad is not None:
                    prep.fail(i, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})")

    def _check_lengths(self, prep: Prepared, engine: Any) -> None:
        c = self._config
        # The engine takes at most context_length - 1 prompt tokens (one must be generated).
        limit = engine.context_length - 1
        if c["max_prompt_tokens"] is not None:
            limit = min(limit, c["max_prompt_tokens"])
        for i, ids in enumerate(prep.ids):
            if ids is None or len(ids) <= limit:
                continue
            if c["too_long"] == "truncate":
                # Keep the end (vLLM's truncate_prompt_tokens does the same): it holds the
                # question and, with a chat template, the assistant turn to complete.
                prep.ids[i] = ids[-limit:]
                prep.truncated[i] = True
            else:
                prep.fail(
                    i,
                    f"the prompt has {len(ids)} tokens, over the limit of {limit} "
                    f"(context_length {engine.context_length}"
                    + (f", max_prompt_tokens {c['max_prompt_tokens']}" if c["max_prompt_tokens"] else "")
                    + "); use too_long='truncate' to cut it instead",
                )

    def _row_params(self, view: BatchView, prep: Prepared, engine: Any, keys: list[Any] | None, texts: list[Any]) -> None:
        from pipeline_infer.sampling_params import SamplingParams

        c = self._config
        base = c["sampling_params"]
        per_row = view.column(c["sampling_params_column"]) if c["sampling_params_column"] else None
        if c["key_column"]:  # the user's own row identity beats positions and indices
            keys = view.column(c["key_column"])
        if keys is None:
            keys = fallback_keys(texts)
        for i in range(prep.num_rows):
            if prep.ids[i] is None:
                continue
            params = dict(base)
            if c.get("json_schema") is not None:
                params["json_schema"] = c["json_schema"]
            if per_row is not None and per_row[i] is not None:
                extra, err = _row_param_dict(per_row[i], c["sampling_params_column"])
                if err:
                    prep.fail(i, err)
                    continue
                params.update(extra)
            if c["seed"] is not None and params.get("sampling_seed") is None:
                params["sampling_seed"] = row_seed(c["seed"], keys[i])
            try:  # the engine's own checks, per row, so one bad row cannot fail the batch
                SamplingParams.from_dict(params).validate(vocab_size=engine.vocab_size)
            except (ValueError, TypeError) as e:
                prep.fail(i, f"sampling parameters: {e}")
                continue
            prep.params[i] = params

    # --- step 2: one engine call for every valid row -------------------------------------
    def execute(self, prep: Prepared) -> None:
        if prep.order:
            self._generate(prep, prep.order)

    def _generate(self, prep: Prepared, rows: list[int]) -> None:
        engine = self.engine
        try:
            outs = engine.generate(input_ids=[prep.ids[i] for i in rows], sampling_params=[prep.params[i] for i in rows])
        except (ValueError, TypeError) as e:
            # The engine refused the call over some row the checks above missed: split the
            # rows until the culprit is alone, so every other row still gets its generation.
            if len(rows) == 1:
                if self._config["on_error"] == "raise":
                    raise
                prep.fail(rows[0], f"the engine refused this row: {e}")
                return
            mid = len(rows) // 2
            self._generate(prep, rows[:mid])
            self._generate(prep, rows[mid:])
            return
        aborted = next((o for o in outs if _is_abort(o)), None)
        if aborted is not None:
            # Aborts come from the engine (a failed step, a shutdown), not from a row. Writing
            # them as row errors would bake a transient failure into "finished" output that a
            # resumed job then skips: fail the batch instead, so nothing of it is written.
            msg = aborted["meta_info"]["finish_reason"].get("message") or "aborted"
            raise RuntimeError(f"the engine aborted generation ({msg}); nothing of this batch was written, rerun to resume")
        per_row = len(outs) // len(rows)
        for k, i in enumerate(rows):
            prep.results[i] = outs[k * per_row : (k + 1) * per_row]

    # --- step 3: Arrow columns in input order ------------------------------------------------
    def empty_columns(self) -> dict[str, pa.Array]:
        """The new columns for zero rows (an empty input file still gets a typed part)."""
        c = self._config
        types = output_types(self.n, c["too_long"] == "truncate", c["output_ids"])
        if c.get("json_schema") is not None:
            types["json"] = json_output.column_type(c["json_schema"], self.n)
        return {name: pa.array([], type=types[k]) for k, name in self.column_names().items()}

    def assemble(self, prep: Prepared) -> dict[str, pa.Array]:
        c = self._config
        logical = build_columns(prep, self.n, c["too_long"] == "truncate", c["metadata"], c["output_ids"])
        if c.get("json_schema") is not None:
            # A row whose output does not parse keeps its text and gets an error message.
            texts = [[o["text"] for o in prep.results[i]] if prep.errors[i] is None and i in prep.results else None
                     for i in range(prep.num_rows)]
            logical["json"], parse_errors = json_output.parse_column(texts, c["json_schema"], self.n)
            bad = next((i for i, e in enumerate(parse_errors) if e is not None), None)
            if bad is not None and c["on_error"] == "raise":
                raise ValueError(f"row {bad}: {parse_errors[bad]} (on_error='raise')")
            errors = [prep.errors[i] or parse_errors[i] for i in range(prep.num_rows)]
            logical["error"] = pa.array(errors, type=pa.string())
        names = self.column_names()
        return {names[k]: arr for k, arr in logical.items()}


def _canonical_params(params: Any) -> dict[str, Any]:
    """Validated sampling params, as only the values that differ from the defaults.

    Leaving defaults out keeps the fingerprint the same when a later version adds a field.
    """
    from pipeline_infer.sampling_params import SamplingParams

    if params is None:
        return {}
    if not isinstance(params, (dict, SamplingParams)):
        raise TypeError(f"sampling_params must be a dict or SamplingParams, got {type(params).__name__}")
    sp = SamplingParams.from_dict(params)
    sp.validate()
    if sp.sampling_seed is not None:
        raise ValueError(
            "set the run seed with GenerateOp(seed=...), not sampling_params['sampling_seed']: "
            "the op derives a seed per row from it, so every row samples differently and reproducibly"
        )
    default = SamplingParams().to_dict()
    out = {k: v for k, v in sp.to_dict().items() if v != default[k]}
    return json.loads(json.dumps(out))


def _row_param_dict(value: Any, column: str) -> tuple[dict[str, Any] | None, str | None]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return None, f"column {column!r} is a string but not JSON: {e}"
    if not isinstance(value, dict):
        return None, f"column {column!r} must hold dicts of sampling parameters, got {type(value).__name__}"
    # Arrow structs bring every field of the struct type, unset ones as None.
    value = {k: v for k, v in value.items() if v is not None}
    if "n" in value:
        return None, f"column {column!r} may not set 'n': the output columns' shape comes from the op's n"
    return value, None


def _is_abort(out: dict[str, Any]) -> bool:
    fr = out["meta_info"].get("finish_reason")
    return isinstance(fr, dict) and fr.get("type") == "abort"
