"""The step's page table kept on the device, each step sending only what changed.

page_table.py rebuilds a [batch, max pages] table on the host every step and uploads it
whole: at page size 1 that is batch x longest sequence int32s (256 x 2,048: 2 MB) to zero,
gather, copy to pinned memory and send, each step (the builder alone: 1.3-2 ms on a 2-core
CPU; in a file job on an H200 the device was busy only 57% of the step time, and this
table took the job from 41.8k to 52.3k output tok/s: docs/benchmarks.md). Here each request in flight
owns a row of a table that lives on the device; a step sends the page ids added since
the request's last step (one per decode at page size 1, none at larger sizes most steps),
whole rows only for requests that are new or whose pages were replaced (`pages_version`),
and the rows' order; the device scatters the additions into its table and gathers the
step's [batch, width] table from it. Host work per step is a few plain-int list operations
per request (whole-list ones for a step of the same requests as the last), independent of
sequence length.

The host side (`prepare`) and the device side (`apply`) are split so the model runner can
send the update in the same host-to-device copy as the step's other int columns.

Backends that plan from a host copy of the table (torch, FlashInfer) keep page_table.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

# Rows and columns of the device table grow in these steps (a grown table is a new tensor
# with the old one copied in, on the device's stream like every other step's work).
_ROWS_STEP = 64
_COLS_STEP = 256


@dataclass
class PageTableUpdate:
    """What one step sends to the device: ints laid out as rows | write rows | write columns |
    write values, plus the table width the step needs."""

    ints: list[int]
    num_rows: int  # the step's batch size
    num_writes: int
    width: int


class DevicePageTable:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._table = torch.zeros((_ROWS_STEP, _COLS_STEP), dtype=torch.int32, device=device)
        self._row_of: dict[str, int] = {}  # rid -> row of the device table
        # Per row: the request written there (its object, so a reused rid is a new request),
        # the pages_version written, how many of its pages the row holds.
        self._req: list[object | None] = [None] * _ROWS_STEP
        self._version = [0] * _ROWS_STEP
        self._count = [0] * _ROWS_STEP
        self._free = list(range(_ROWS_STEP - 1, -1, -1))  # pop() hands out low rows first
        self.rows_rewritten = 0  # rows the last prepare() wrote whole (for tests)
        # The last step's batch, for the usual decode step (the same requests in the same order):
        # its request objects (kept, so their ids stay theirs), rows, pages_versions and counts.
        self._last_reqs: list = []
        self._last_ids: list[int] = []
        self._last_rows: list[int] = []
        self._last_versions: list[int] = []
        self._last_counts: list[int] = []
        self.fast_steps = 0  # prepare() calls that took the same-batch path (for tests)
        self.same_batch = False

    def prepare(self, reqs: list) -> PageTableUpdate:
        """Host half of a step: assign rows, list the writes. Row b of the step's table will be
        reqs[b].pages, zero-padded to the width (the longest list in the batch, at least 1)."""
        ids = list(map(id, reqs))
        versions = [r.pages_version for r in reqs]
        counts = [len(r.pages) for r in reqs]
        # The last step's requests, in its order, no page list replaced (read by the shared-prefix finder too).
        self.same_batch = ids == self._last_ids and versions == self._last_versions
        if self.same_batch:
            update = self._same_batch(reqs, counts)
            if update is not None:
                return update
        rids = [r.rid for r in reqs]
        if len(self._row_of) != len(rids) or self._row_of.keys() != set(rids):
            self._release_rows_not_in(rids)
        rows: list[int] = []
        w_rows: list[int] = []
        w_cols: list[int] = []
        w_vals: list[int] = []
        rewritten = 0
        row_of, req_at, version_at, count_at = self._row_of, self._req, self._version, self._count
        for req, rid, n in zip(reqs, rids, counts):
            pages = req.pages
            row = row_of.get(rid)
            if row is None or req_at[row] is not req:
                row = self._take_row(rid, req)
            held = count_at[row]
            if version_at[row] != req.pages_version or held > n or req_at[row] is None:
                # New here, or pages replaced: the whole row, and zeros over what it held beyond.
                rewritten += 1
                req_at[row] = req
                version_at[row] = req.pages_version
                end = max(held, n)
                w_rows.extend([row] * end)
                w_cols.extend(range(end))
                w_vals.extend(pages)
                if end > n:
                    w_vals.extend([0] * (end - n))
            elif n > held:  # pages appended since the last step (one per page crossed)
                w_rows.extend([row] * (n - held))
                w_cols.extend(range(held, n))
                w_vals.extend(pages[held:])
            count_at[row] = n
            rows.append(row)
        self.rows_rewritten = rewritten
        self._remember(reqs, ids, rows, versions, counts)
        return PageTableUpdate(rows + w_rows + w_cols + w_vals, len(rows), len(w_rows), _width(counts))

    def _same_batch(self, reqs: list, counts: list[int]) -> PageTableUpdate | None:
        """The usual decode step: the last step's requests, in its order, pages only appended,
        at most one each (at page size 1, one for every decode). Whole-list operations instead
        of the per-request loop; None sends the step down that loop."""
        held = self._last_counts
        delta = list(map(operator.sub, counts, held))
        if delta and (min(delta) < 0 or max(delta) > 1):
            return None
        grew = [i for i, d in enumerate(delta) if d]
        rows = self._last_rows
        w_rows = [rows[i] for i in grew]
        w_cols = [held[i] for i in grew]
        w_vals = [reqs[i].pages[-1] for i in grew]
        count_at = self._count
        for row, col in zip(w_rows, w_cols):
            count_at[row] = col + 1
        self._last_counts = counts
        self.rows_rewritten = 0
        self.fast_steps += 1
        return PageTableUpdate(rows + w_rows + w_cols + w_vals, len(rows), len(grew), _width(counts))

    def _remember(self, reqs: list, ids: list[int], rows: list[int], versions: list[int], counts: list[int]) -> None:
        self._last_reqs, self._last_ids, self._last_rows = list(reqs), ids, rows
        self._last_versions, self._last_counts = versions, counts

    def apply(self, update: PageTableUpdate, ints: torch.Tensor) -> torch.Tensor:
        """Device half: `ints` is update.ints on the device (int64). Writes the additions into the
        kept table and returns the step's [batch, width] int32 table (a new tensor)."""
        self._fit(len(self._req), update.width)
        b, w = update.num_rows, update.num_writes
        rows, w_rows, w_cols, w_vals = ints.split([b, w, w, w])
        if w:
            self._table.index_put_((w_rows, w_cols), w_vals.to(torch.int32))
        return self._table[rows, : update.width]

    def reset(self) -> None:
        """Every row goes back (the engine is idle). The device table keeps its size and content;
        each row's count stays, so the next request written there zeroes what it held."""
        self._release_rows_not_in([])
        self._remember([], [], [], [], [])

    # --- rows ------------------------------------------------------------------------------
    def _take_row(self, rid: str, req: object) -> int:
        old = self._row_of.get(rid)
        if old is not None:  # the rid now names another request: its row is rewritten whole
            self._req[old] = None
            return old
        if not self._free:
            n = len(self._req)
            self._req += [None] * _ROWS_STEP
            self._version += [0] * _ROWS_STEP
            self._count += [0] * _ROWS_STEP
            self._free = list(range(n + _ROWS_STEP - 1, n - 1, -1))
        row = self._free.pop()
        self._row_of[rid] = row
        self._req[row] = None  # marks it for a whole-row write
        return row

    def _release_rows_not_in(self, rids: list[str]) -> None:
        """Rows of requests that left the batch go back (a request that comes back later, say
        after a retraction, gets a row again and is written whole)."""
        keep = set(rids)
        for rid in [r for r in self._row_of if r not in keep]:
            row = self._row_of.pop(rid)
            self._req[row] = None
            self._free.append(row)

    def _fit(self, num_rows: int, width: int) -> None:
        """Grow the device table to at least num_rows x width (copying what it holds)."""
        rows, cols = self._table.shape
        if num_rows <= rows and width <= cols:
            return
        new_rows = max(rows, num_rows)
        new_cols = max(cols, -(-width // _COLS_STEP) * _COLS_STEP)
        table = torch.zeros((new_rows, new_cols), dtype=torch.int32, device=self.device)
        table[:rows, :cols] = self._table
        self._table = table


def _width(counts: list[int]) -> int:
    """The step table's width: the longest page list in the batch, at least 1."""
    return max(max(counts, default=0), 1)
