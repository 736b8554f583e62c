"""The batch shapes an op accepts, behind one small interface.

* dict of lists / numpy arrays (datasets' default format, Ray's "numpy" batches)
* pyarrow.Table (datasets' `with_format("arrow")`) and pyarrow.RecordBatch (Arrow streams)

Only the columns the op reads are converted to Python objects; the rest of an Arrow batch
passes through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa


class BatchView:
    def __init__(self, batch: Any):
        if isinstance(batch, (pa.Table, pa.RecordBatch)):
            self.kind = "arrow"
        elif isinstance(batch, Mapping):  # dict, or datasets' LazyBatch
            self.kind = "dict"
        else:
            raise TypeError(
                "a batch must be a dict of columns, a pyarrow.Table or a pyarrow.RecordBatch "
                f"(use Dataset.map(op, batched=True)), got {type(batch).__name__}"
            )
        self.batch = batch
        self.names = list(batch.column_names if self.kind == "arrow" else batch.keys())
        self._num_rows: int | None = batch.num_rows if self.kind == "arrow" else None

    def column(self, name: str) -> list[Any]:
        if name not in self.names:
            raise ValueError(f"the batch has no column {name!r}; its columns are {self.names}")
        col = self.batch[name] if self.kind == "arrow" else self.batch[name]
        if hasattr(col, "to_pylist"):
            values = col.to_pylist()
        elif hasattr(col, "tolist"):
            values = col.tolist()
        elif isinstance(col, (list, tuple)):
            values = list(col)
        else:
            raise TypeError(
                f"column {name!r} must be a list or array of row values, got {type(col).__name__}: "
                "the op works on batches, use Dataset.map(op, batched=True)"
            )
        if self._num_rows is None:
            self._num_rows = len(values)
        elif len(values) != self._num_rows:
            raise ValueError(f"column {name!r} has {len(values)} rows, other columns have {self._num_rows}")
        return values

    @property
    def num_rows(self) -> int:
        if self._num_rows is None:  # a dict batch whose columns we have not read yet
            first = next(iter(self.batch.values()), [])
            self._num_rows = len(first)
        return self._num_rows

    def output(self, new: dict[str, pa.Array], keep_input: bool) -> Any:
        """The op's result in the caller's batch type.

        Arrow in, Arrow out, with the input columns kept: datasets and Ray both replace an
        Arrow batch with what the function returns. A dict in gets a dict of the new columns
        only (datasets merges them into the row), unless keep_input asks for all.
        """
        if self.kind == "arrow":
            # Rebuilt from arrays (not append_column): RecordBatch lacks it on older pyarrow.
            names = [n for n in self.batch.column_names if n not in new] + list(new)
            arrays = [self.batch.column(n) if n not in new else new[n] for n in names]
            schema_meta = self.batch.schema.metadata
            if isinstance(self.batch, pa.RecordBatch):
                out = pa.RecordBatch.from_arrays(arrays, names=names)
            else:
                out = pa.Table.from_arrays(arrays, names=names)
            return out.replace_schema_metadata(schema_meta) if schema_meta else out
        result = dict(self.batch) if keep_input else {}
        result.update({name: arr.to_pylist() for name, arr in new.items()})
        return result
