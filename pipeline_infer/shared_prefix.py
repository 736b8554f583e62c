"""Which rows of a decode step share prefix pages, for shared-prefix (cascade) decode attention.

The radix cache gives requests with a common prompt prefix the same KV pages. Rows whose page
lists start with the same pages form a group; the group's prefix is attended to once per work
entry (kernels/triton/shared_prefix_attention.py) instead of once per row. This module finds
the groups on the host, from the requests' page lists, and lays out the kernel's int32 inputs.

Cost: a step of the same requests as the last reuses the last answer (the caller says so: the
model runner's device page table already compares the batches). A step of the last step's
requests less some that finished (the usual step once requests start to finish: the batch
shrinks every step) keeps the last groups less those rows. Otherwise grouping is one pass over
the rows keyed by their first page, and each row's common length with its group's first row is
remembered on the row (until either's pages change), so a row is compared page by page once,
not every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline_infer.kernels.triton.shared_prefix_attention import ITEM_FIELDS


@dataclass
class SharedPrefixPlan:
    """The kernel's inputs as host ints (see SharedPrefix in the kernel's module)."""

    kv_starts: list[int]  # per row: keys of its shared prefix (0: none)
    rows: list[int]  # batch rows, each group's together
    items: list[int]  # ITEM_FIELDS ints per entry: first index into rows, rows, prefix length, table row
    longest_prefix: int
    saved_tokens: int  # keys a step no longer reads (per layer and kv head)

    @property
    def num_items(self) -> int:
        return len(self.items) // ITEM_FIELDS


def common_prefix_len(a: list[int], b: list[int], guess: int = 0) -> int:
    """Length of the longest common prefix of two lists (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if 0 < guess <= n and a[:guess] == b[:guess] and (guess == n or a[guess] != b[guess]):
        return guess  # the usual case: the same length as the group's other rows
    lo, hi = 0, n  # a[:lo] == b[:lo]; the answer is <= hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


_REBUILD = object()  # _narrowed's answer when the plan must be built afresh


class SharedPrefixFinder:
    def __init__(
        self, page_size: int, rows_per_item: int, max_groups: int, min_saving: float = 0.125, min_group_rows: int = 2
    ):
        """rows_per_item: rows one kernel entry serves; max_groups bounds the work list (graph
        buffers are sized by it); a plan is made only when it saves at least min_saving of the
        step's key reads; a group joins it only with at least min_group_rows rows (the model
        runner asks for 8: a smaller group's prefix pass, a whole tile of rows computed for a
        few, costs more than the reads it saves; see ModelRunner)."""
        if rows_per_item < 1 or max_groups < 1 or min_group_rows < 2:
            raise ValueError(
                f"rows_per_item ({rows_per_item}) and max_groups ({max_groups}) must be >= 1, "
                f"min_group_rows ({min_group_rows}) >= 2"
            )
        self.page_size = page_size
        self.rows_per_item = rows_per_item
        self.max_groups = max_groups
        self.min_saving = min_saving
        self.min_group_rows = min_group_rows
        self._last_plan: SharedPrefixPlan | None = None
        self._stale = True  # _last_plan is not for the batch the caller last compared against
        # What the last built plan grouped, for a later batch of the same requests less some:
        # pages_version per request (by id), and each group's requests and prefix length;
        # None when that plan cannot be narrowed so (max_groups cut groups, or no plan).
        self._built_reqs: list = []
        self._versions: dict[int, int] = {}
        self._groups: list[tuple[list, int]] | None = None
        self.shrunk_plans = 0  # plans derived from the last one by dropping rows (for tests)

    def reset(self) -> None:
        """Forget the last plan: a step the finder did not plan ran since (or the engine is idle)."""
        self._last_plan, self._stale = None, True
        self._forget_groups()

    def max_items(self, max_rows: int) -> int:
        """Work entries a plan over at most max_rows rows can have: a group of n rows has
        ceil(n / rows_per_item) <= n / rows_per_item + 1 entries, and there are at most
        max_rows // min_group_rows groups (and max_groups)."""
        return -(-max_rows // self.rows_per_item) + min(self.max_groups, max_rows // self.min_group_rows)

    def plan(
        self, reqs: list, seq_lens: list[int] | Callable[[], list[int]], same_batch: bool = False
    ) -> SharedPrefixPlan | None:
        """The step's plan, or None when no group saves enough. reqs[b] holds seq_lens[b] keys
        (the new token's included); its pages are `reqs[b].pages`. seq_lens may be a function
        giving them, called only when a plan is built. same_batch: reqs are the last step's
        requests, in its order, their pages only appended since (the model runner's device page
        table tells); when the last step was this finder's too (no reset() between), its plan
        still holds: every prefix is still shared and shorter than its rows."""
        if self._stale or not same_batch:
            lens = seq_lens() if callable(seq_lens) else seq_lens
            plan = self._narrowed(reqs, lens)
            self._last_plan = plan if plan is not _REBUILD else self._build(reqs, lens)
            self._stale = False
        return self._last_plan

    def _narrowed(self, reqs: list, seq_lens: list[int]):
        """The last plan less the rows that left, when reqs are some of the last built plan's
        requests (none new, no page list replaced); _REBUILD otherwise. Each group keeps its
        prefix length: a prefix shared by all its rows is shared by fewer, and their sequences
        only grew. Requests the last plan left ungrouped stay so (a group loses rows, never
        gains them)."""
        groups, versions = self._groups, self._versions
        if groups is None or len(reqs) >= len(versions):
            return _REBUILD
        index: dict[int, int] = {}
        for b, r in enumerate(reqs):
            if versions.get(id(r)) != r.pages_version:
                return _REBUILD  # new in the batch, or its pages were replaced
            index[id(r)] = b
        kept = []  # (saved keys, rows, prefix)
        for members, prefix in groups:
            rows = [index[i] for i in map(id, members) if i in index]
            reads = -(-len(rows) // self.rows_per_item)
            if len(rows) >= self.min_group_rows and len(rows) > reads:
                kept.append(((len(rows) - reads) * prefix, rows, prefix))
        self.shrunk_plans += 1
        return self._layout(len(reqs), kept, seq_lens)

    def _build(self, reqs: list, seq_lens: list[int]) -> SharedPrefixPlan | None:
        by_first: dict[int, list[int]] = {}
        for b, r in enumerate(reqs):
            if r.pages:
                by_first.setdefault(r.pages[0], []).append(b)
        if len(by_first) == len(reqs):
            self._forget_groups()
            return None  # no two rows share a first page (most batches without common prompts)
        ps = self.page_size
        groups = []  # (saved keys, rows, prefix length)
        for rows in by_first.values():
            if len(rows) < self.min_group_rows:
                continue
            first = reqs[rows[0]]
            shared = first.num_shared_pages
            for b in rows[1:]:
                shared = min(shared, self._common_pages(first, reqs[b], shared))
            prefix = min(shared * ps, min(seq_lens[b] for b in rows) - 1)
            reads = -(-len(rows) // self.rows_per_item)
            if prefix > 0 and len(rows) > reads:
                groups.append(((len(rows) - reads) * prefix, rows, prefix))
        groups.sort(key=lambda g: -g[0])
        cut = len(groups) > self.max_groups
        groups = groups[: self.max_groups]
        plan = self._layout(len(reqs), groups, seq_lens)
        if plan is not None and not cut:  # remembered for _narrowed
            # (_built_reqs keeps the requests alive, so no other object can take one's id.)
            self._built_reqs = list(reqs)
            self._versions = {id(r): r.pages_version for r in reqs}
            self._groups = [([reqs[b] for b in rows], prefix) for _, rows, prefix in groups]
        else:
            self._forget_groups()
        return plan

    def _forget_groups(self) -> None:
        """Nothing to narrow from (and no request kept alive for it)."""
        self._built_reqs, self._versions, self._groups = [], {}, None

    def _layout(self, batch_size: int, groups: list, seq_lens: list[int]) -> SharedPrefixPlan | None:
        """The plan of groups [(saved keys, rows, prefix)], or None when they save too little."""
        saved = sum(g[0] for g in groups)
        if not groups or saved < self.min_saving * sum(seq_lens):
            return None
        kv_starts = [0] * batch_size
        order: list[int] = []
        items: list[int] = []
        for _, rows, prefix in groups:
            for i in range(0, len(rows), self.rows_per_item):
                items += (len(order) + i, min(self.rows_per_item, len(rows) - i), prefix, rows[0])
            for b in rows:
                kv_starts[b] = prefix
            order += rows
        return SharedPrefixPlan(kv_starts, order, items, max(g[2] for g in groups), saved)

    @staticmethod
    def _common_pages(first, other, guess: int) -> int:
        """Pages `other` shares with `first` (its group's first row), remembered on `other`
        until either's pages change other than by appending."""
        key = (first, first.pages_version, other.pages_version)
        memo = other.shared_prefix_memo
        if memo is not None and memo[0] == key:
            return memo[1]
        # Only pages the prefix cache owns can be shared; the rest are each request's own.
        limit = min(first.num_shared_pages, other.num_shared_pages)
        n = common_prefix_len(first.pages[:limit], other.pages[:limit], guess)
        other.shared_prefix_memo = (key, n)
        return n
