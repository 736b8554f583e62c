"""GenerateOp(json_schema=...): generation constrained to a JSON schema, parsed into an Arrow struct.

The schema goes to the engine as the `json_schema` sampling parameter (xgrammar constrains every
token), and each row's output text is parsed into a column whose Arrow type follows the schema:

    object -> struct (its properties, in order)      array -> list of the item type
    string / enum of strings / const string -> string
    integer -> int64      number -> float64       boolean -> bool
    anything else (anyOf, oneOf, mixed enums, free-form objects) -> string holding the JSON text

Every field is nullable (a property the output leaves out is null). A row whose output does not
parse, or does not fit the type (e.g. max_new_tokens cut the JSON short), gets a null and a
message in the error column; its raw text stays in the text column.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa


def canonical_schema(schema: Any) -> str:
    """The schema as JSON text (what the engine takes); TypeError/ValueError when it is not one."""
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        text = schema
    elif isinstance(schema, dict):
        parsed, text = schema, json.dumps(schema)
    else:
        raise TypeError(f"json_schema must be a dict or a JSON string, got {type(schema).__name__}")
    if not isinstance(parsed, dict):
        raise ValueError(f"json_schema must be a JSON object, got {type(parsed).__name__}")
    arrow_type(parsed)  # fails early on a schema we cannot map
    return text


def arrow_type(schema: dict[str, Any]) -> pa.DataType:
    """The Arrow type that holds values of a JSON schema (see the module docstring)."""
    if not isinstance(schema, dict):
        return pa.string()
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return pa.string() if all(isinstance(v, str) for v in values) else _JSON_TEXT
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        return pa.struct([pa.field(name, arrow_type(sub)) for name, sub in schema["properties"].items()])
    if kind == "array" and isinstance(schema.get("items"), dict):
        return pa.list_(arrow_type(schema["items"]))
    return _SCALARS.get(kind, _JSON_TEXT) if isinstance(kind, str) else _JSON_TEXT


_JSON_TEXT = pa.string()
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def parse_column(
    texts: list[list[str] | None], schema_text: str, n: int
) -> tuple[pa.Array, list[str | None]]:
    """(parsed column, per-row parse error or None) for each row's n output texts (None: no output)."""
    schema = json.loads(schema_text)
    typ = arrow_type(schema)
    values: list[Any] = []
    errors: list[str | None] = []
    for row in texts:
        if row is None:
            values.append(None)
            errors.append(None)
            continue
        parsed, problems = [], []
        for k, text in enumerate(row):
            value, err = _parse(text, schema, typ)
            parsed.append(value)
            if err is not None:
                problems.append(err if n == 1 else f"sample {k}: {err}")
        values.append(parsed if n > 1 else parsed[0])
        errors.append("; ".join(problems) if problems else None)
    column_type = pa.list_(typ) if n > 1 else typ
    return pa.array(values, type=column_type), errors


def column_type(schema_text: str, n: int) -> pa.DataType:
    typ = arrow_type(json.loads(schema_text))
    return pa.list_(typ) if n > 1 else typ


def _parse(text: str, schema: dict[str, Any], typ: pa.DataType) -> tuple[Any, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"the output is not valid JSON for json_schema ({e}); output: {text[:200]!r}"
    try:
        converted = _convert(value, schema, typ)
        pa.array([converted], type=typ)  # the type check Arrow itself will make
    except (TypeError, ValueError, OverflowError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        return None, f"the output does not fit json_schema's type {typ}: {e}"
    return converted, None


def _convert(value: Any, schema: Any, typ: pa.DataType) -> Any:
    """value shaped for typ: nested properties picked by name, free-form parts as JSON text."""
    if value is None:
        return None
    if pa.types.is_struct(typ):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {type(value).__name__}")
        props = schema.get("properties", {})
        return {f.name: _convert(value.get(f.name), props.get(f.name), f.type) for f in typ}
    if pa.types.is_list(typ):
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {type(value).__name__}")
        items = schema.get("items") if isinstance(schema, dict) else None
        return [_convert(v, items, typ.value_type) for v in value]
    if typ == _JSON_TEXT and not isinstance(value, str):
        return json.dumps(value)  # free-form parts stay JSON text
    if pa.types.is_integer(typ) and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"expected an integer, got {value!r}")
    if pa.types.is_boolean(typ) and not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    if pa.types.is_floating(typ) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"expected a number, got {value!r}")
    return value
