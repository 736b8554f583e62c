"""Per-row bookkeeping shared by the op and the streaming runner: seeds, order, output columns."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# Rows whose first this-many tokens are shared by another row of the batch (a system prompt, a
# template's head) are submitted next to each other, so the prefix cache serves them back to back.
_PREFIX_TOKENS = 32


@dataclass
class Prepared:
    """One batch after rendering and tokenizing, before the engine sees it."""

    num_rows: int
    ids: list[list[int] | None]  # None where the row failed
    params: list[dict[str, Any] | None]
    errors: list[str | None]
    truncated: list[bool]
    order: list[int] = field(default_factory=list)  # valid rows, in submission order
    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # row -> n engine outputs

    def fail(self, row: int, message: str) -> None:
        self.errors[row] = message
        self.ids[row] = None
        self.params[row] = None


def row_seed(run_seed: int, key: Any) -> int:
    """A per-row sampling seed from the run seed and the row's key.

    Keyed on the row, not on its position in a batch, so a resumed or re-sharded run (other
    batch sizes, other part sizes) samples every row exactly as the first run did.
    """
    data = json.dumps([run_seed, key], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & ((1 << 62) - 1)


def fallback_keys(prompts: list[Any]) -> list[Any]:
    """Keys for rows that have none: the prompt itself plus its repeat count in the batch.

    Two identical prompts in a batch still get different samples; without a key column
    (or datasets' with_indices=True) that is as stable as a batch can make it.
    """
    seen: Counter = Counter()
    keys = []
    for p in prompts:
        k = p if isinstance(p, str) else repr(p)
        keys.append([k, seen[k]])
        seen[k] += 1
    return keys


def submission_order(prep: Prepared) -> list[int]:
    """Valid rows sorted by (shared prefix group, length); results go back by row index."""
    valid = [i for i in range(prep.num_rows) if prep.ids[i] is not None]
    heads = Counter(tuple(prep.ids[i][:_PREFIX_TOKENS]) for i in valid)

    def key(i: int) -> tuple:
        head = tuple(prep.ids[i][:_PREFIX_TOKENS])
        return (head if heads[head] > 1 else (), len(prep.ids[i]), i)

    return sorted(valid, key=key)


def output_types(n: int, truncate: bool, with_ids: bool = False) -> dict[str, pa.DataType]:
    per_sample = (lambda t: pa.list_(t)) if n > 1 else (lambda t: t)
    types = {
        "text": per_sample(pa.string()),
        "finish_reason": per_sample(pa.string()),
        "prompt_tokens": pa.int64(),
        "completion_tokens": per_sample(pa.int64()),
        "cached_tokens": per_sample(pa.int64()),
        "error": pa.string(),
    }
    if truncate:
        types["prompt_truncated"] = pa.bool_()
    if with_ids:
        types["output_ids"] = per_sample(pa.list_(pa.int64()))
    return types


def build_columns(prep: Prepared, n: int, truncate: bool, metadata: bool, with_ids: bool) -> dict[str, pa.Array]:
    """Arrow arrays for the new columns, keyed by logical name ("text", "error", ...)."""
    types = output_types(n, truncate, with_ids)
    cols: dict[str, list[Any]] = {name: [] for name in types}

    def pick(values: list[Any]) -> Any:
        return values if n > 1 else values[0]

    for i in range(prep.num_rows):
        outs = prep.results.get(i) if prep.errors[i] is None else None
        if outs is None:
            for name in ("text", "finish_reason", "completion_tokens", "cached_tokens", "output_ids"):
                if name in cols:
                    cols[name].append(None)
            cols["prompt_tokens"].append(len(prep.ids[i]) if prep.ids[i] is not None else None)
        else:
            cols["text"].append(pick([o["text"] for o in outs]))
            cols["finish_reason"].append(pick([_reason(o) for o in outs]))
            cols["completion_tokens"].append(pick([o["meta_info"]["completion_tokens"] for o in outs]))
            cols["cached_tokens"].append(pick([o["meta_info"]["cached_tokens"] for o in outs]))
            cols["prompt_tokens"].append(outs[0]["meta_info"]["prompt_tokens"])
            if with_ids:
                cols["output_ids"].append(pick([list(o["output_ids"]) for o in outs]))
        cols["error"].append(prep.errors[i])
        if truncate:
            cols["prompt_truncated"].append(prep.truncated[i])
    if not metadata:
        cols = {k: v for k, v in cols.items() if k in ("text", "error", "prompt_truncated", "output_ids")}
    return {name: pa.array(values, type=types[name]) for name, values in cols.items()}


def _reason(out: dict[str, Any]) -> str | None:
    fr = out["meta_info"].get("finish_reason")
    return fr.get("type") if isinstance(fr, dict) else fr
