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
        # The last step's rows: request ids, pages_version and pages held, row by row.
        self._rids: list[str] = []
        self._versions: list[int] = []
        self._counts: list[int] = []
        self.rows_kept = 0  # rows the last build carried over from the step before (for tests)

    def build(self, reqs: list) -> np.ndarray:
        """[len(reqs), max pages] int32: row b is reqs[b].pages, zero-padded (a fresh array)."""
        rids = [r.rid for r in reqs]
        versions = [r.pages_version for r in reqs]
        counts = [len(r.pages) for r in reqs]
        width = max(max(counts, default=0), 1)
        capacity = -(-width // _WIDTH_STEP) * _WIDTH_STEP
        prev = self._table
        table = np.zeros((len(reqs), capacity), dtype=np.int32)
        if prev is not None and rids == self._rids and versions == self._versions:
            # The usual decode step: the same requests in the same rows, pages only appended
            # (if any row got shorter, _patch_rows rebuilds it). Whole-column comparisons
            # instead of a dict lookup per row.
            held = np.asarray(self._counts, dtype=np.int64)
            src = np.arange(len(reqs), dtype=np.int64)
            fresh = np.flatnonzero(np.asarray(counts, dtype=np.int64) < held).tolist()
            src[fresh] = -1
            self._patch_rows(table, prev, reqs, counts, src, held, fresh)
        else:
            src = np.full(len(reqs), -1, dtype=np.int64)
            held = np.zeros(len(reqs), dtype=np.int64)  # pages the kept row already holds
            fresh: list[int] = []  # rows filled from scratch
            last = {rid: b for b, rid in enumerate(self._rids)}
            prev_versions, prev_counts = self._versions, self._counts
            for b, req in enumerate(reqs):
                j = last.get(rids[b])
                if j is None or prev_versions[j] != versions[b] or prev_counts[j] > counts[b]:
                    fresh.append(b)
                    continue
                src[b], held[b] = j, prev_counts[j]
            self._patch_rows(table, prev, reqs, counts, src, held, fresh)
        self._table, self._rids, self._versions, self._counts = table, rids, versions, counts
        return np.ascontiguousarray(table[:, :width])

    def _patch_rows(self, table: np.ndarray, prev: np.ndarray | None, reqs: list, counts: list[int],
                    src: np.ndarray, held: np.ndarray, fresh: list[int]) -> None:
        """Fill `table`: row b copies the last table's row src[b] (>= 0: it holds held[b] of the
        request's pages) and appends the pages added since; rows in `fresh` from scratch."""
        kept = src >= 0
        self.rows_kept = int(kept.sum())
        if prev is not None and self.rows_kept:
            w = min(prev.shape[1], table.shape[1])
            table[kept, :w] = prev[src[kept], :w]
            added = np.asarray(counts, dtype=np.int64) - held
            # Rows that gained exactly one page (a decode crossing into a new page; at page
            # size 1 every decode): patched in one operation.
            grown = np.flatnonzero(kept & (added == 1))
            if grown.size:
                table[grown, held[grown]] = [reqs[b].pages[-1] for b in grown.tolist()]
            for b in np.flatnonzero(kept & (added > 1)).tolist():  # gained several (a prefill chunk)
                start = int(held[b])
                table[b, start : counts[b]] = reqs[b].pages[start:]
        for b in fresh:
            if counts[b]:
                table[b, : counts[b]] = reqs[b].pages

    def reset(self) -> None:
        self._table, self._rids, self._versions, self._counts = None, [], [], []
