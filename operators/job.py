"""File jobs: Parquet/JSONL in (any fsspec URL), resumable Parquet parts out.

Each input file is cut into parts of `rows_per_part` rows; part i of `data/a.jsonl` becomes
`<output>/data__a-<hash>-0000i.parquet` with the input columns plus the op's new ones. Parts are
written atomically, and each part's footer records a key: a hash of the op's configuration
(model, template, sampling parameters, ...), the input file's identity (fsspec's ukey: size and
mtime, or the ETag), the part's place in the file and the row limit. A rerun skips every part
whose footer has the key it would write and regenerates the rest, so a crash anywhere loses at
most the parts in flight, never duplicates a row, and a changed configuration or input never
reuses a stale part. Row seeds are keyed on (input file, row number), so resumed and re-cut
runs sample each row the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_infer.operators import files as fio
from pipeline_infer.operators.progress import JobProgress
from pipeline_infer.operators.stream import DEFAULT_WINDOW, WorkItem, concat, run_window

logger = logging.getLogger("pipeline_infer.operators")


@dataclass
class JobResult:
    output: str
    parts_written: list[str] = field(default_factory=list)
    parts_skipped: list[str] = field(default_factory=list)  # finished by an earlier run
    parts_replaced: list[str] = field(default_factory=list)  # existed with another key: regenerated
    parts_removed: list[str] = field(default_factory=list)  # leftovers past a file's last part
    rows_generated: int = 0
    rows_skipped: int = 0
    row_errors: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Part:
    file: fio.InputFile
    index: int
    start_row: int
    key: str
    name: str
    done: bool  # an earlier run wrote exactly this part
    rows: int = 0
    mine: bool = True  # False: another worker of a multi-process job writes it
    tables: list[pa.Table] = field(default_factory=list)


@dataclass
class _Marker:
    """End of a part, passed through the runner in order so the part is written after its rows."""

    part: _Part
    last: bool
    ended_by: str  # "rows" (full), "eof", "limit"


def run_job(
    op: Any,
    input: str | list[str],
    output: str,
    *,
    batch_size: int = 256,
    window: int = DEFAULT_WINDOW,
    rows_per_part: int = 10_000,
    resume: bool = True,
    limit: int | None = None,
    input_format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool | Any = True,
    num_gpus: int | None = 1,
    shard: tuple[int, int] | None = None,
    claims: str | None = None,
) -> JobResult:
    """Run `op` (a GenerateOp) over files; see the module docstring. Returns what it did.

    num_gpus: engine processes, one per GPU (None: every visible GPU; on a machine without
    GPUs, N > 1 runs N CPU processes); see multi_process.py. Those processes share the parts
    dynamically: claims is a local folder shared by the processes of one job, and each writes
    the parts it claims there first (see PartClaims), so a faster process writes more parts.
    shard=(i, n) without claims: write only every n-th part from i on, a static split for
    callers that run the shards themselves. progress: a bar, or an object with the bar's
    skip/done/close to report to.
    """
    for name, value in (("batch_size", batch_size), ("window", window), ("rows_per_part", rows_per_part)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    if not isinstance(output, str) or not output:
        raise ValueError(f"output must be a folder path or URL, got {output!r}")
    worker = shard is not None or claims is not None  # one process of a multi-process job
    workers, gpus = 1, []
    if (num_gpus != 1 or isinstance(num_gpus, bool)) and not worker:
        from pipeline_infer.operators.multi_process import num_workers

        workers, gpus = num_workers(num_gpus)
    started = time.perf_counter()
    inputs = fio.discover(input, storage_options, input_format)
    out_fs, out_dir = fsspec.core.url_to_fs(output, **(storage_options or {}))
    out_dir = out_dir.rstrip("/") or "/"
    # An output folder inside the input folder must not feed the job its own parts on a rerun.
    inputs = [f for f in inputs if not (f.fs.protocol == out_fs.protocol and f.path.startswith(out_dir + "/"))]
    if not inputs:
        raise ValueError(f"input {input!r} has no files outside the output folder {output!r}")
    out_fs.makedirs(out_dir, exist_ok=True)
    # A multi-process job's worker must not delete its siblings' temp files: its coordinator did this.
    if not worker and fio.remove_stale_temps(out_fs, out_dir):
        logger.info("removed temp files left by an interrupted run in %s", output)
    job = _Job(op, inputs, out_fs, out_dir, rows_per_part, batch_size, resume, limit, shard,
               PartClaims(claims) if claims is not None else None)
    if workers > 1:
        from pipeline_infer.operators.multi_process import run_workers

        job_kwargs = dict(batch_size=batch_size, window=window, rows_per_part=rows_per_part, resume=resume,
                          limit=limit, input_format=input_format, storage_options=storage_options)
        return run_workers(op, input, output, job_kwargs, workers, gpus, job.total_rows(), progress, started)
    result = JobResult(output=output)
    bar = JobProgress(job.total_rows(), enabled=progress) if isinstance(progress, bool) else progress
    try:
        for item, table, prep in run_window(op, job.items(), window):
            if isinstance(item.tag, _Marker):
                job.finish_part(item.tag, result, bar)
                continue
            part: _Part = item.tag
            part.tables.append(table)
            errors = sum(e is not None for e in prep.errors)
            tokens = sum(o["meta_info"]["completion_tokens"] for outs in prep.results.values() for o in outs)
            result.rows_generated += table.num_rows
            result.row_errors += errors
            result.generated_tokens += tokens
            bar.done(table.num_rows, tokens, errors)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    if result.parts_replaced:
        logger.warning(
            "%d part(s) in %s had been written with another configuration or input and were regenerated",
            len(result.parts_replaced), output,
        )
    return result


class PartClaims:
    """Which process of a multi-process job writes which part: the first one to claim it.

    A claim is an empty file named after the part's ordinal, created with O_CREAT | O_EXCL.
    That create is atomic on a local filesystem, and all the job's workers run on one host
    with the folder on its local disk, so exactly one claimer gets each part, with no lock,
    no server and no round trip to the coordinator (which makes the folder and removes it).
    """

    def __init__(self, folder: str):
        self.folder = folder

    def claim(self, ordinal: int) -> bool:
        """True for the one caller that gets part `ordinal`; False when another already has it."""
        try:
            fd = os.open(os.path.join(self.folder, str(ordinal)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True


class _Job:
    def __init__(self, op, inputs, out_fs, out_dir, rows_per_part, batch_size, resume, limit, shard=None, claims=None):
        self.op = op
        self.inputs = inputs
        self.fs = out_fs
        self.dir = out_dir
        self.rpp = rows_per_part
        self.batch_size = batch_size
        self.resume = resume
        self.limit = limit
        self.fingerprint = op.fingerprint()
        self.existing = fio.list_parts(out_fs, out_dir)
        self._meta_cache: dict[str, dict | None] = {}
        self.shard = shard
        self.claims: PartClaims | None = claims
        self._parts_seen = 0  # every part of every file, in order: numbers the parts for the shards

    def _take_next(self) -> bool:
        """Whether the next part in single-process order is this process's to write.

        With claims, the part is claimed now, as the item generator reaches it. That is lazy:
        run_window pulls items only while fewer than `window` batches are in flight (markers
        do not count), so a worker holds at most about window + 1 claimed, unwritten parts,
        and the parts left at the end go to whichever worker gets there first. Parts an
        earlier run finished are claimed too: a claim is cheap, and it makes exactly one
        worker count the part as skipped and, for a file's last part, remove leftovers.
        """
        ordinal = self._parts_seen
        self._parts_seen += 1
        if self.claims is not None:
            return self.claims.claim(ordinal)
        return self.shard is None or ordinal % self.shard[1] == self.shard[0]

    # --- what is already done ------------------------------------------------------------
    def part_key(self, f: fio.InputFile, index: int, cap: int | None) -> str:
        # `end` rather than the limit itself: a full part below the limit keeps its key when
        # the limit changes; only the part the limit cuts short depends on it.
        end = (index + 1) * self.rpp if cap is None else min((index + 1) * self.rpp, cap)
        data = [self.fingerprint, f.relpath, f.format, f.ukey, self.rpp, index, end]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()

    def _meta(self, name: str) -> dict | None:
        if name not in self.existing:
            return None
        if name not in self._meta_cache:
            self._meta_cache[name] = fio.read_part_meta(self.fs, self.existing[name])
        return self._meta_cache[name]

    def new_part(self, f: fio.InputFile, index: int, start_row: int, cap: int | None) -> _Part:
        name = fio.part_name(f, index)
        key = self.part_key(f, index, cap)
        if not self._take_next():  # another worker's: no need to read its footer
            return _Part(f, index, start_row, key, name, False, mine=False)
        meta = self._meta(name)
        done = self.resume and meta is not None and meta.get("key") == key
        return _Part(f, index, start_row, key, name, done)

    def finished_file(self, f: fio.InputFile, cap: int | None) -> list[dict] | None:
        """The footers of all of a file's parts when an earlier run finished it, else None."""
        if not self.resume:
            return None
        metas = []
        for index in range(1 << 30):
            meta = self._meta(fio.part_name(f, index))
            if meta is None or meta.get("key") != self.part_key(f, index, cap):
                return None
            metas.append(meta)
            if meta.get("last"):
                return metas
        return None

    def total_rows(self) -> int | None:
        if any(f.format != "parquet" for f in self.inputs):
            return self.limit  # JSONL row counts are unknown until read
        total = sum(f.num_rows() or 0 for f in self.inputs)
        return total if self.limit is None else min(total, self.limit)

    # --- the work, as runner items -----------------------------------------------------------
    def items(self) -> Iterator[WorkItem]:
        remaining = self.limit
        for f in self.inputs:
            if remaining == 0:
                return
            cap = remaining
            metas = self.finished_file(f, cap)
            if metas is not None:
                rows = sum(m["rows"] for m in metas)
                for i, m in enumerate(metas):
                    part = _Part(f, i, m["input"]["start_row"], m["key"], fio.part_name(f, i), True, rows=m["rows"],
                                 mine=self._take_next())
                    yield WorkItem(None, tag=_Marker(part, last=m["last"], ended_by=m["ended_by"]))
            else:
                rows = yield from self._file_items(f, cap)
            if remaining is not None:
                remaining -= rows

    def _file_items(self, f: fio.InputFile, cap: int | None) -> Iterator[WorkItem]:
        """Items for one file; returns the number of rows it covered."""
        row = 0
        part = self.new_part(f, 0, 0, cap)
        buf: list[tuple[pa.Table, list[str | None] | None]] = []
        buf_rows = 0

        def flush() -> Iterator[WorkItem]:
            nonlocal buf, buf_rows
            if buf and not part.done and part.mine:
                table = concat([t for t, _ in buf])
                errors = [e for t, errs in buf for e in (errs if errs is not None else [None] * t.num_rows)]
                start = part.start_row + part.rows - buf_rows
                keys = [[f.relpath, start + k] for k in range(table.num_rows)]
                yield WorkItem(table, keys=keys, row_errors=errors, tag=part)
            buf, buf_rows = [], 0

        hit_cap = cap is not None and cap <= 0
        for table, errs in fio.read_batches(f, self.batch_size):
            offset = 0
            while offset < table.num_rows and not hit_cap:
                if part.rows == self.rpp:  # full, and another row follows: the part ends here
                    yield from flush()
                    yield WorkItem(None, tag=_Marker(part, last=False, ended_by="rows"))
                    part = self.new_part(f, part.index + 1, row, cap)
                take = min(table.num_rows - offset, self.rpp - part.rows, self.batch_size - buf_rows)
                if cap is not None:
                    take = min(take, cap - row)
                buf.append((table.slice(offset, take), errs[offset : offset + take] if errs is not None else None))
                buf_rows += take
                part.rows += take
                row += take
                offset += take
                if buf_rows == self.batch_size:
                    yield from flush()
                hit_cap = cap is not None and row >= cap
            if hit_cap:
                break
        yield from flush()
        yield WorkItem(None, tag=_Marker(part, last=True, ended_by="limit" if hit_cap else "eof"))
        return row

    # --- writing ----------------------------------------------------------------------------------
    def finish_part(self, marker: _Marker, result: JobResult, bar: JobProgress) -> None:
        part = marker.part
        if not part.mine:
            return  # its worker counts, writes and cleans up after it
        if part.done:
            result.parts_skipped.append(part.name)
            result.rows_skipped += part.rows
            bar.skip(part.rows)
        else:
            table = concat(part.tables) if part.tables else self._empty_table(part.file)
            part.tables = []  # the part is on disk once written: do not hold its rows
            meta = self._meta_for(part, marker, table.num_rows)
            if part.name in self.existing:
                result.parts_replaced.append(part.name)
            path = fio.write_part(self.fs, self.dir, part.name, table, meta)
            self.existing[part.name] = path
            self._meta_cache[part.name] = meta
            result.parts_written.append(part.name)
        if marker.last:
            self._remove_leftovers(part, result)

    def _meta_for(self, part: _Part, marker: _Marker, rows: int) -> dict[str, Any]:
        from pipeline_infer import __version__

        c = self.op.config
        return {
            "key": part.key,
            "part": part.index,
            "last": marker.last,
            "ended_by": marker.ended_by,
            "rows": rows,
            "rows_per_part": self.rpp,
            "input": {
                "url": part.file.url,
                "relpath": part.file.relpath,
                "format": part.file.format,
                "ukey": part.file.ukey,
                "start_row": part.start_row,
            },
            # Provenance: enough to tell how every row of this part was produced.
            "model": c["model"] or "bundled (SmolLM2-135M-Instruct)",
            "engine_options": c["engine_options"],
            "sampling_params": c["sampling_params"],
            "template": c["template"],
            "system_prompt": c["system_prompt"],
            "op": c,
            "op_fingerprint": self.fingerprint,
            "pipeline_infer_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }

    def _empty_table(self, f: fio.InputFile) -> pa.Table:
        if f.format == "parquet":
            with f.fs.open(f.path, "rb") as fh:
                base = pq.read_schema(fh).empty_table()
        else:
            base = pa.table({})
        for name, arr in self.op.empty_columns().items():
            base = base.append_column(name, arr)
        return base

    def _remove_leftovers(self, last: _Part, result: JobResult) -> None:
        # Parts past this file's last one come from an earlier run with smaller parts or a
        # longer file; left in place they would add stale rows to the output.
        prefix = fio.part_prefix(last.file)
        for name in list(self.existing):
            if not name.startswith(prefix):
                continue
            index = name[len(prefix) : -len(".parquet")]
            if index.isdigit() and int(index) > last.index:
                self.fs.rm(self.existing.pop(name))
                self._meta_cache.pop(name, None)
                result.parts_removed.append(name)
