"""The step's page table, patched from the previous step's instead of rebuilt.

Every step hands the attention backend a [batch, max pages] table of each sequence's KV
pages. Rebuilding it from the requests' page lists costs a pass over every page id of
every running request (256 requests of 1,200 tokens at page size 1: about 3 ms of host time
per step on a slow CPU), while from one step to the next a request's list only grows at
its end (one page per decode step at most). So the builder keeps the last table and, per
request, which row it was in, its `pages_version` and how many pages that row holds: the
new table gathers the surviving rows in one operation, appends the new tail pages, and
fills rows from scratch only for requests that are new or whose pages changed otherwise
(the scheduler bumps `pages_version` then).
"""

from __future__ import annotations

import numpy as np

# Column capacity grows in these steps so the kept table rarely needs re-allocating.
_WIDTH_STEP = 64


class PageTableBuilder:
    def __init__(self) -> None:
        self._table: np.ndarray | None = None  # [rows, capacity] int32, the last step's
        self._rows: dict[str, tuple[int, int, int]] = {}  # rid -> (row, pages_version, pages held)
        self.rows_kept = 0  # rows the last build carried over from the step before (for tests)

    def build(self, reqs: list) -> np.ndarray:
        """[len(reqs), max pages] int32: row b is reqs[b].pages, zero-padded (a fresh array)."""
        counts = [len(r.pages) for r in reqs]
        width = max(max(counts, default=0), 1)
        capacity = -(-width // _WIDTH_STEP) * _WIDTH_STEP
        prev, prev_rows = self._table, self._rows
        table = np.zeros((len(reqs), capacity), dtype=np.int32)
        src = np.full(len(reqs), -1, dtype=np.int64)
        fresh: list[int] = []  # rows filled from scratch
        grown_rows: list[int] = []  # rows that gained exactly one page: patched in one operation
        grown_cols: list[int] = []
        grown_vals: list[int] = []
        longer: list[tuple[int, int]] = []  # (row, pages held before) that gained several
        rows: dict[str, tuple[int, int, int]] = {}
        for b, req in enumerate(reqs):
            n = counts[b]
            rows[req.rid] = (b, req.pages_version, n)
            hit = prev_rows.get(req.rid)
            if hit is None or hit[1] != req.pages_version or hit[2] > n:
                fresh.append(b)
                continue
            src[b] = hit[0]
            if n == hit[2] + 1:
                grown_rows.append(b)
                grown_cols.append(hit[2])
                grown_vals.append(req.pages[-1])
            elif n > hit[2]:
                longer.append((b, hit[2]))
        kept = src >= 0
        self.rows_kept = int(kept.sum())
        if prev is not None and kept.any():
            w = min(prev.shape[1], capacity)
            table[kept, :w] = prev[src[kept], :w]
        if grown_rows:
            table[grown_rows, grown_cols] = grown_vals
        for b, start in longer:
            table[b, start : counts[b]] = reqs[b].pages[start:]
        for b in fresh:
            if counts[b]:
                table[b, : counts[b]] = reqs[b].pages
        self._table, self._rows = table, rows
        return np.ascontiguousarray(table[:, :width])

    def reset(self) -> None:
        self._table, self._rows = None, {}
