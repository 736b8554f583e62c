"""How a row becomes a prompt: one column, a template over columns, chat messages, or token ids.

Rendering is per row and never raises for a bad *row*: it returns (prompt, error) so the op can
put the message in the error column and carry on. Configuration mistakes (a template naming
attributes, a column the batch does not have) raise, because every row would fail the same way.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

MODES = ("prompt_column", "template", "messages_column", "input_ids_column")
_CONVERSIONS = (None, "s", "r", "a")


@dataclass(frozen=True)
class Field:
    literal: str
    name: str | None
    conversion: str | None
    spec: str


def parse_template(template: str) -> list[Field]:
    """Split a format template into literals and column fields, refusing anything but names.

    Only bare column names are allowed ("{text}", "{n:>4}"): no attribute or index access
    ("{x.__class__}", "{x[0]}"), no positional fields, no nested fields in a format spec.
    A template may come from a config file, and must not be able to reach into Python objects.
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from None
    fields = []
    for literal, name, spec, conversion in parsed:  # (literal, field, spec, conversion)
        if name is not None:
            if not name.isidentifier():
                raise ValueError(
                    f"template field {{{name}}} is not allowed: a field must be a plain column name "
                    "(letters, digits, underscores; no '.', '[]' or positional fields); "
                    "double a brace ({{ or }}) to write it literally"
                )
            if conversion not in _CONVERSIONS:
                raise ValueError(f"template field {{{name}!{conversion}}}: conversion must be !s, !r or !a")
            if "{" in (spec or "") or "}" in (spec or ""):
                raise ValueError(f"template field {{{name}:{spec}}}: nested fields in a format spec are not allowed")
        fields.append(Field(literal, name, conversion, spec or ""))
    if not any(f.name for f in fields):
        raise ValueError(f"template {template!r} names no column: use {{column}} placeholders")
    return fields


def template_columns(fields: list[Field]) -> list[str]:
    return list(dict.fromkeys(f.name for f in fields if f.name))


def render_template(fields: list[Field], row: dict[str, Any]) -> tuple[str | None, str | None]:
    parts = []
    for f in fields:
        parts.append(f.literal)
        if f.name is None:
            continue
        value, err = as_text(row[f.name], f"column {f.name!r}", numbers=True)
        if err:
            return None, err
        if f.conversion == "r":
            value = repr(value)
        elif f.conversion == "a":
            value = ascii(value)
        try:
            parts.append(format(value, f.spec))
        except (ValueError, TypeError) as e:
            return None, f"column {f.name!r}: format spec {f.spec!r} failed: {e}"
    return "".join(parts), None


def as_text(value: Any, what: str, numbers: bool = False) -> tuple[str | None, str | None]:
    """A row value as text, or an error message for null / non-UTF-8 / non-text values.

    numbers=True lets ints and floats through as their str() (a "{year}" in a template);
    a prompt column must hold text.
    """
    if value is None:
        return None, f"{what} is null"
    if isinstance(value, str):
        return value, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as e:
            return None, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})"
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"{what} must be text, got {type(value).__name__}"


def parse_messages(value: Any, column: str) -> tuple[list[dict[str, str]] | None, str | None]:
    """A chat-messages cell (a list of {role, content}, or that list as a JSON string)."""
    if value is None:
        return None, f"column {column!r} is null"
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            return None, f"column {column!r} is a string but not a JSON list of messages: {e}"
    if hasattr(value, "tolist"):  # numpy object arrays from pandas/Ray batches
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"column {column!r} must be a non-empty list of {{'role', 'content'}} messages"
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, f"column {column!r}: message {i} must be a dict with str 'role' and 'content', got {m!r:.80}"
        messages.append({"role": m["role"], "content": m["content"]})
    return messages, None


def parse_input_ids(value: Any, column: str) -> tuple[list[int] | None, str | None]:
    if value is None:
        return None, f"column {column!r} is null"
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"column {column!r} must hold lists of token ids, got {type(value).__name__}"
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None, f"column {column!r} must hold lists of int token ids"
    return list(value), None


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    # A row that brings its own system message keeps it: the op-wide prompt is a default.
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]

