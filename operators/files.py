"""Input discovery, streaming readers and atomic Parquet part writes, over any fsspec filesystem.

Paths are fsspec URLs: a local path, `memory://...`, `s3://bucket/prefix` (through s3fs), ...
An input is a file, a folder (every Parquet/JSONL file under it) or a glob.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("parquet", "jsonl")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # JSON Lines under the common .json name
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
META_KEY = b"pipeline_infer"
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


@dataclass(frozen=True)
class InputFile:
    fs: Any
    path: str
    relpath: str  # relative to the input root: names the output parts, keys the row seeds
    format: str
    ukey: str  # fsspec's identity of this version of the file (size + mtime, or the ETag)

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def num_rows(self) -> int | None:
        """Known up front for Parquet (from the footer), not for JSONL."""
        if self.format != "parquet":
            return None
        with self.fs.open(self.path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows


def detect_format(path: str, forced: str | None = None) -> str | None:
    if forced is not None:
        return forced
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _EXTENSIONS.get(posixpath.splitext(name)[1])


def discover(inputs: str | list[str], storage_options: dict[str, Any] | None = None, input_format: str | None = None) -> list[InputFile]:
    """Every input file, in a stable order (sorted by path within each input)."""
    if input_format is not None and input_format not in FORMATS:
        raise ValueError(f"input_format must be one of {FORMATS} or None (from the extension), got {input_format!r}")
    specs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise ValueError(f"input must be a path, URL or glob (or a list of them), got {inputs!r}")
    found: list[InputFile] = []
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
        if any(ch in path for ch in "*?["):
            root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            paths = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
        elif fs.isdir(path):
            root = path.rstrip("/")
            paths = sorted(p for p in fs.find(path) if not _hidden(posixpath.relpath(p, root)))
            paths = [p for p in paths if detect_format(p, input_format)]
        elif fs.exists(path):
            root, paths = posixpath.dirname(path), [path]
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist")
        if not paths:
            raise FileNotFoundError(f"input {spec!r} matches no Parquet or JSONL files")
        for p in paths:
            fmt = detect_format(p, input_format)
            if fmt is None:
                raise ValueError(
                    f"cannot tell the format of {p!r} from its extension ({', '.join(_EXTENSIONS)}); "
                    "pass input_format='parquet' or 'jsonl'"
                )
            rel = posixpath.relpath(p, root) if root else p.lstrip("/")
            found.append(InputFile(fs, p, rel, fmt, str(fs.ukey(p))))
    return found


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


# --- reading ---------------------------------------------------------------------------------


def read_batches(f: InputFile, batch_size: int) -> Iterator[tuple[pa.Table, list[str | None] | None]]:
    """(rows, per-row read errors or None), streaming: never the whole file in memory."""
    if f.format == "parquet":
        with f.fs.open(f.path, "rb") as fh:
            for b in pq.ParquetFile(fh).iter_batches(batch_size=batch_size):
                yield pa.Table.from_batches([b]), None
    else:
        yield from _read_jsonl(f, batch_size)


def _read_jsonl(f: InputFile, batch_size: int) -> Iterator[tuple[pa.Table, list[str | None]]]:
    # Line by line, not pyarrow.json: one undecodable or malformed line must become one row
    # with an error, not a failed file.
    rows: list[dict[str, Any]] = []
    errors: list[str | None] = []
    with f.fs.open(f.path, "rb", compression="infer") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            row, err = _parse_line(raw, lineno)
            rows.append(row)
            errors.append(err)
            if len(rows) == batch_size:
                yield _rows_to_table(rows), errors
                rows, errors = [], []
    if rows:
        yield _rows_to_table(rows), errors


def _parse_line(raw: bytes, lineno: int) -> tuple[dict[str, Any], str | None]:
    err = None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Keep the row (its other columns are still written, bad bytes as U+FFFD) but do not
        # generate from text we had to alter.
        text = raw.decode("utf-8", errors="replace")
        err = f"line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start}); the row was not generated"
    try:
        row = json.loads(text)
    except ValueError as e:
        return {}, f"line {lineno} is not valid JSON: {e}"
    if not isinstance(row, dict):
        return {}, f"line {lineno} is a JSON {type(row).__name__}, not an object"
    return row, err


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(k for r in rows for k in r))  # every key of any row, in first-seen order
    arrays = []
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types across rows (a number here, a string there): keep them as JSON text.
            arrays.append(pa.array([v if isinstance(v, str) or v is None else json.dumps(v) for v in values], pa.string()))
    if not names:
        return pa.table({"__empty__": pa.nulls(len(rows))}).drop(["__empty__"])
    return pa.Table.from_arrays(arrays, names=names)


# --- writing -----------------------------------------------------------------------------------


def part_name(f: InputFile, index: int) -> str:
    """`<stem>-<hash of the relative path>-<index>.parquet`: unique per input file, sortable."""
    stem = f.relpath
    for ext in _COMPRESSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    stem = posixpath.splitext(stem)[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")).lstrip("._")[:80] or "part"
    digest = hashlib.sha256(f.relpath.encode()).hexdigest()[:8]
    return f"{stem}-{digest}-{index:05d}.parquet"


def part_prefix(f: InputFile) -> str:
    return part_name(f, 0)[: -len("00000.parquet")]


def write_part(fs: Any, directory: str, name: str, table: pa.Table, meta: dict[str, Any]) -> str:
    """Write a Parquet part atomically: a hidden temp file, then a rename onto the final name.

    A reader (or a resumed job) sees either no part or the whole part, never half of one.
    On object stores the rename is a server-side copy, which is atomic for the destination.
    """
    final = posixpath.join(directory, name)
    tmp = posixpath.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    try:
        with fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh)
        fs.mv(tmp, final)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise
    return final


def read_part_meta(fs: Any, path: str) -> dict[str, Any] | None:
    """The job metadata in a part's footer; None for a file that is not a readable part."""
    try:
        with fs.open(path, "rb") as fh:
            kv = pq.ParquetFile(fh).metadata.metadata or {}
        return json.loads(kv[META_KEY])
    except Exception:  # truncated, foreign or unreadable: treat as not done
        return None


def list_parts(fs: Any, directory: str) -> dict[str, str]:
    """name -> path of the visible .parquet files in the output folder."""
    fs.invalidate_cache(directory)  # object-store listings are cached; another run may have written
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for p in entries:
        name = posixpath.basename(p.rstrip("/"))
        if name.endswith(".parquet") and not name.startswith((".", "_")):
            out[name] = p
    return out


def remove_stale_temps(fs: Any, directory: str) -> int:
    """Delete temp files a killed run left behind (this job owns its output folder)."""
    n = 0
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return 0
    for p in entries:
        if _TMP_RE.match(posixpath.basename(p.rstrip("/"))):
            fs.rm(p)
            n += 1
    return n
