"""The streaming runner: an op over an iterator of Arrow batches, with a look-ahead window.

A plain loop (`for b in batches: yield op(b)`) drains the engine at every batch boundary: the
last, longest rows of batch k decode alone while batch k+1 waits. Here up to `window` batches
are in flight at once, each prepared and submitted by its own worker thread, so batch k+1's
rows are already queued in the engine when batch k's stragglers finish, and continuous
batching keeps the device full. Outputs still come back in input order, and memory stays
bounded: at most `window` batches are held, plus the one being handed to the caller.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from pipeline_infer.operators.batch_io import BatchView
from pipeline_infer.operators.rows import Prepared

# Batches in flight. The engine must always have rows queued behind the ones it runs, or each
# step runs fewer rows than it could: with 2 batches of 256 (the old default) a GPU engine
# (256 running) was short of work between batches. Items can also be smaller than batch_size
# (a part or file boundary cuts them). 8 keeps ~2,000 rows queued; the scheduler's cost per
# step no longer grows with the queue (Scheduler._pull_in). Measured with a stub device, the
# "random" workload, 2,000 rows in 125-row items: 4,215 steps at window 2, 2,611 at 8 (all rows
# in one generate: 2,637). docs/benchmarks.md, "CPU: the file job against a stub device".
DEFAULT_WINDOW = 8

@dataclass
class WorkItem:
    """One batch for the runner, or (batch=None) a marker it passes through in order."""

    batch: pa.Table | None
    keys: list[Any] | None = None  # per-row seed keys
    row_errors: list[str | None] | None = None  # errors found before the op (unreadable rows)
    tag: Any = None  # the caller's bookkeeping, returned untouched


def run_window(op: Any, items: Iterable[WorkItem], window: int = DEFAULT_WINDOW) -> Iterator[tuple[WorkItem, pa.Table | None, Prepared | None]]:
    """(item, output table with the input columns plus the new ones, its Prepared), in order."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1 (batches in flight), got {window!r}")

    def process(item: WorkItem) -> tuple[pa.Table, Prepared]:
        view = BatchView(item.batch)
        prep = op.prepare(view, keys=item.keys, row_errors=item.row_errors)
        op.execute(prep)
        return view.output(op.assemble(prep), keep_input=True), prep

    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="pipeline-infer-window")
    pending: deque[tuple[WorkItem, Future | None]] = deque()
    in_flight = 0
    source = iter(items)
    exhausted = False
    try:
        while True:
            # Top the window up before waiting: the engine gets the next batches while the
            # oldest one is still decoding.
            while not exhausted and in_flight < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif item.batch is None:
                    pending.append((item, None))
                else:
                    pending.append((item, pool.submit(process, item)))
                    in_flight += 1
            if not pending:
                return
            item, fut = pending.popleft()
            if fut is None:
                yield item, None, None
                continue
            table, prep = fut.result()  # a configuration error in a worker surfaces here
            in_flight -= 1
            yield item, table, prep
    finally:
        # The caller stopped early or a batch failed: do not start queued batches. Ones already
        # in the engine finish on their own threads; nobody waits for them.
        pool.shutdown(wait=False, cancel_futures=True)


def rechunk(tables: Iterable[pa.Table | pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of exactly `size` rows (the last may be shorter) from batches of any size."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {size!r}")
    buf: list[pa.Table] = []
    count = 0
    for t in tables:
        if isinstance(t, pa.RecordBatch):
            t = pa.Table.from_batches([t])
        if not isinstance(t, pa.Table):
            raise TypeError(f"expected pyarrow.RecordBatch or Table batches, got {type(t).__name__}")
        buf.append(t)
        count += t.num_rows
        while count >= size:
            joined = concat(buf)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            buf, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield concat(buf)


def concat(tables: list[pa.Table]) -> pa.Table:
    # JSONL batches infer their own types: a column all-null in one batch is `null` there.
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


def stream_generate(
    op: Any,
    batches: Iterable[pa.RecordBatch | pa.Table],
    *,
    batch_size: int = 256,
    window: int = DEFAULT_WINDOW,
    on_batch: Callable[[Prepared], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Run `op` over a stream of Arrow batches; yield record batches (input + new columns).

    Rows are re-cut into batches of `batch_size` and up to `window` of them are in flight.
    Row seeds are keyed on each row's position in the stream, so the samples do not depend on
    how the input happened to be batched.
    """
    def items() -> Iterator[WorkItem]:
        start = 0
        for t in rechunk(batches, batch_size):
            yield WorkItem(t, keys=list(range(start, start + t.num_rows)))
            start += t.num_rows

    for _, table, prep in run_window(op, items(), window):
        if on_batch is not None:
            on_batch(prep)
        yield from table.combine_chunks().to_batches()  # one batch: rechunk never yields empty tables
