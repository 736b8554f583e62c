"""Radix cache: a prefix tree over token ids, at page granularity, whose nodes hold KV pages.

Shape of the tree
-----------------
Every edge carries a key of whole pages (a tuple of `k * page_size` token ids) and the `k`
page ids whose K/V hold exactly those tokens. A node's children are keyed by the first page
of their edge (a `page_size`-tuple), so each descent step is one dict lookup per page.
Two children of one node never share their first page, so the tree is a radix tree over
pages. Only whole pages are ever cached or matched: a partial trailing page belongs to the
request that wrote it and is never shared.

Ownership (who frees a page)
----------------------------
- A page stored in a node belongs to the tree. Only `evict` and `reset` give it back to the
  allocator.
- `match_prefix` hands out the tree's page ids without transferring ownership. A request that
  uses them must `lock` the returned node (which pins that node and all its ancestors) for as
  long as it reads those pages, and `unlock` it afterwards. It never frees them.
- `insert(token_ids, pages)` offers the caller's pages to the tree. Pages covering the new
  suffix of the key become the tree's. For the part already cached, the tree keeps its own
  page ids and returns the caller's in `InsertResult.duplicate_pages`: those still belong to
  the caller, who must free them. (A caller page that *is* the tree's page at that position,
  i.e. one obtained from a match, is not reported: it was never the caller's to free.)
- `evict` only takes pages from unlocked leaves, least recently used first, from the end of
  the leaf (a leaf with more pages than needed is shortened, not dropped); removing a whole
  leaf can turn its parent into an evictable leaf. `reset` drops everything and must only be
  called when no node is locked (no request is running).

Accounting is O(1): the tree counts the pages it holds and the pages in locked nodes, so
`evictable_pages` (what `evict` could free if asked for everything) is their difference.
LRU order uses a logical clock bumped once per match/insert, and a lazily pruned heap of
evictable leaves keyed by their last access.

Change stamps (for callers that memoize `match_len`)
----------------------------------------------------
`stamp()` names the tree's current content. `match_len(ids)` can only have changed since a
stamp when `changed_since(stamp, ids[:page_size])` says so: an insert that adds pages, and an
eviction that removes some, bump the stamp of the top-level edge (first page) they changed
under; only `reset` bumps a global stamp. So a scheduler re-probes only the waiting requests
whose first page gained or lost cached pages, instead of the whole queue every step;
`changed_under_since` lists those first pages, so it can even tell that no waiting request's
match changed. Evictions must stay per first page: once the KV pool is full, a long batch job
evicts on almost every step, and a global stamp made the scheduler re-probe its whole waiting
window (up to 1,024 requests) each time (docs/benchmarks.md, "One engine slowed down as it aged").

Finer still, `probe(ids)` returns with the match length where the match ended, and
`probe_holds(stamp, where)` tells whether it still stands. A first page's stamp changes with
every insert under it: under a shared prompt prefix, each sibling's own suffix landing, which
adds nothing to the other siblings' matches. And while a probe holds, `match_probed` admits
the request without comparing its tokens again.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional

from pipeline_infer.cache.kv_pool import PageAllocator


class RadixNode:
    __slots__ = ("key", "pages", "children", "parent", "ref", "last_access", "dead", "changed")

    def __init__(self, key: tuple[int, ...], pages: tuple[int, ...], parent: Optional["RadixNode"], last_access: int):
        self.key = key  # len(key) == len(pages) * page_size (empty for the root)
        # Tuples, not lists, for both: the cyclic GC stops tracking a tuple of ints after its
        # first look, while every full collection walks every item of a list. At page size 1
        # the tree holds a page id per cached token (millions on a GPU's pool); each full
        # collection stops the engine thread (docs/benchmarks.md, "The radix tree's page ids
        # out of the GC's walk").
        self.pages = pages
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.parent = parent
        self.ref = 0  # locks on this node or on any descendant
        self.last_access = last_access
        self.dead = False  # set once evicted / dropped by reset
        # Epoch at which this node's edge last lost pages to eviction: a `probe` that stopped
        # inside it or at its end may no longer hold (`probe_holds`).
        self.changed = 0

    def __repr__(self) -> str:
        return f"RadixNode(pages={self.pages}, ref={self.ref}, children={len(self.children)})"


@dataclass
class MatchResult:
    pages: list[int] = field(default_factory=list)  # tree-owned page ids of the matched prefix
    num_tokens: int = 0  # len(pages) * page_size
    node: Optional[RadixNode] = None  # deepest matched node (the root when nothing matched)


@dataclass
class InsertResult:
    duplicate_pages: list[int] = field(default_factory=list)  # caller's pages the tree did not take
    node: Optional[RadixNode] = None  # node whose path spells exactly the inserted key
    pages: list[int] = field(default_factory=list)  # the tree's page ids for the whole key, after the insert


class RadixCache:
    max_forgotten_first_pages = 65536  # see _changed

    def __init__(self, allocator: PageAllocator, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self._clock = 0
        self._seq = itertools.count()
        self._epoch = 0  # bumped by every content change; see "Change stamps"
        self._reset_epoch = 0  # every memo older than this is stale (reset, or forgotten first pages)
        self._changed_epoch: dict[tuple[int, ...], int] = {}  # first page -> epoch of its last change
        self._change_log: list[tuple[int, tuple[int, ...]]] = []  # (epoch, first page), oldest first
        self._log_start = 0  # changes at or before this epoch may be missing from the log
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = RadixNode((), (), None, 0)
        self._total_pages = 0
        self._locked_pages = 0
        self._num_nodes = 0  # excluding the root
        # (last_access, seq, node) for evictable leaves; stale entries are skipped on pop.
        self._heap: list[tuple[int, int, RadixNode]] = []

    # --- sizes ------------------------------------------------------------------------
    @property
    def total_pages(self) -> int:
        """Pages held by the tree."""
        return self._total_pages

    cached_pages = total_pages

    @property
    def locked_pages(self) -> int:
        return self._locked_pages

    @property
    def evictable_pages(self) -> int:
        """Pages in unlocked nodes: what evict() frees when asked for everything."""
        return self._total_pages - self._locked_pages

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    # --- lookup -------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], limit: int | None = None) -> MatchResult:
        """Longest cached prefix of token_ids[:limit] made of whole pages (limit: no slice of a
        request's token list needed to ask about its first tokens).

        A match that ends inside an edge splits that edge so that the returned node spells
        exactly the matched prefix (and can be locked on its own).
        """
        ps = self.page_size
        n = (len(token_ids) if limit is None else min(limit, len(token_ids))) // ps
        self._clock += 1
        node, i, pages = self.root, 0, []
        while i < n:
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            m = self._common_pages(child, token_ids, i, n)
            if m < len(child.pages):
                child = self._split(child, m)
            pages.extend(child.pages)
            self._touch(child)
            node, i = child, i + m
        return MatchResult(pages, len(pages) * ps, node)

    def match_probed(self, num_tokens: int, where: tuple) -> MatchResult:
        """match_prefix of the token ids a `probe` found num_tokens cached of, ending at `where`,
        while `probe_holds` says that still stands: the same result, split and LRU refresh, from
        the nodes above the match's end instead of comparing the tokens again."""
        self._clock += 1
        node, from_end = self._probe_end(where)
        nodes = []
        while node is not self.root:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        if from_end:  # the match ends inside the last node's edge: split there
            nodes[-1] = self._split(nodes[-1], len(nodes[-1].pages) - from_end)
        pages: list[int] = []
        for x in nodes:
            pages.extend(x.pages)
            self._touch(x)
        return MatchResult(pages, len(pages) * self.page_size, nodes[-1] if nodes else self.root)

    def match_len(self, token_ids: list[int]) -> int:
        """Tokens of the longest cached whole-page prefix of token_ids, without side effects.

        Unlike match_prefix it neither splits an edge nor refreshes LRU order, so schedulers can
        probe many waiting requests (to order them) without disturbing the tree.
        """
        return self.probe(token_ids)[0]

    def probe(self, token_ids: list[int], limit: int | None = None, split: bool = False) -> tuple[int, tuple]:
        """match_len of token_ids[:limit], and where the match ended, for `probe_holds` and
        `match_probed`: (the deepest node it entered (the root if none), that edge's pages past
        the match's end, the page after the match (None: the match reached the end of
        token_ids[:limit])).

        split: where token_ids part from an edge inside it, cut the edge there, as match_prefix
        would (the tree's content, locks and LRU order stay as they are). Requests sharing a
        prefix that ends inside one edge (a group's first prompt cached whole, its prefix shared
        by the others) then each compare that edge's upper part whole and stop at a child
        lookup, instead of each binary-searching where they part from the long edge
        (shared-prefix workload: ~1,000 such searches over the admission steps)."""
        ps = self.page_size
        n = (len(token_ids) if limit is None else min(limit, len(token_ids))) // ps
        node, i, from_end = self.root, 0, 0
        while i < n:
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                break
            m = self._common_pages(child, token_ids, i, n)
            i += m
            node, from_end = child, len(child.pages) - m
            if from_end:
                if split and i < n:  # parted inside the edge (not merely cut off by limit)
                    node, from_end = self._split(child, m), 0
                break
        return i * ps, (node, from_end, tuple(token_ids[i * ps : (i + 1) * ps]) if i < n else None)

    def probe_holds(self, stamp: int, where: tuple) -> bool:
        """Whether a `probe` made when `stamp()` returned stamp, which ended at `where`, still gives
        the same length (False: it may not). While the node lives, the path down to it is intact
        (evict takes leaves only; a split keeps the node's content and where its edge ends, only
        starting it lower), so the match can only change where it stopped: inside the edge only
        if that lost pages to eviction (`changed`); at the end of an edge (the node's, or the
        upper part's of a split made exactly there) if a child now starts with the next page."""
        node, from_end, nxt = where
        if self._reset_epoch > stamp or node.dead or node.changed > stamp:
            return False
        end = self._probe_end(where)
        if end is None:
            return False
        node, from_end = end
        return from_end > 0 or nxt is None or nxt not in node.children

    def _probe_end(self, where: tuple) -> tuple[RadixNode, int] | None:
        """(node, pages of its edge past the match's end) for a probe's `where` after the splits
        made since; None when a split cut the edge above the match's end (rare: not worth following)."""
        node, from_end, _ = where
        if node is self.root or from_end < len(node.pages):
            return node, from_end
        if from_end == len(node.pages):  # split exactly where the match ended: the upper part ends there
            return node.parent, 0
        return None

    def insert(
        self, token_ids: list[int], pages: list[int], node: Optional[RadixNode] = None, node_pages: int = 0,
        key_len: int | None = None,
    ) -> InsertResult:
        """Cache `pages` as the K/V of `token_ids` (whole pages only).

        Returns the caller's pages for the already-cached part of the key: the caller still
        owns them and must free them. `InsertResult.pages` lists the tree's pages for the whole
        key (the caller's own where they were taken, the tree's where they were duplicates), and
        `InsertResult.node` spells the whole key: a caller that keeps reading those pages locks it.

        node, node_pages: a node whose path spells token_ids[: node_pages * page_size] with
        pages[:node_pages] as its pages, and that cannot have been evicted since the caller got
        it (locked, or unlocked just now): the walk starts there instead of comparing those
        tokens again (a request's matched prompt prefix, 1,024 tokens in the shared-prefix
        workload, each time it hands pages to the tree). Same result and LRU order as from the root.

        key_len: the key is token_ids[:key_len] (default: all of token_ids), so a caller caching
        the start of a request's tokens passes them without a copy.
        """
        ps = self.page_size
        if key_len is None:
            key_len = len(token_ids)
        if key_len != len(pages) * ps or key_len > len(token_ids):
            raise ValueError(
                f"insert needs a key of len(pages) * page_size tokens, got {key_len} (of {len(token_ids)} "
                f"given), {len(pages)} pages, page_size {ps}"
            )
        n = len(pages)
        self._clock += 1
        i, path = 0, []
        if node is None or node is self.root:
            node = self.root
        else:
            i, path = node_pages, list(pages[:node_pages])
            up = node
            while up is not self.root:  # what the walk from the root would have refreshed
                self._touch(up)
                up = up.parent
        duplicates: list[int] = []
        while i < n:
            first = tuple(token_ids[i * ps : (i + 1) * ps])
            child = node.children.get(first)
            if child is None:
                leaf = RadixNode(tuple(token_ids[i * ps : n * ps]), tuple(pages[i:]), node, self._clock)
                node.children[first] = leaf
                self._total_pages += n - i
                self._num_nodes += 1
                self._push(leaf)
                self._changed(tuple(token_ids[:ps]))
                path.extend(leaf.pages)
                return InsertResult(duplicates, leaf, path)
            m = self._common_pages(child, token_ids, i, n)
            if m < len(child.pages):
                child = self._split(child, m)
            mine = pages[i : i + m]
            if tuple(mine) != child.pages:  # usually equal: the caller computed past a match of these pages
                duplicates.extend(p for p, q in zip(mine, child.pages) if p != q)
            path.extend(child.pages)
            self._touch(child)
            node, i = child, i + m
        return InsertResult(duplicates, node, path)

    # --- locking --------------------------------------------------------------------------
    def lock(self, node: Optional[RadixNode]) -> None:
        """Pin node and its ancestors against eviction. The root / None is a no-op."""
        if node is None or node is self.root:
            return
        if node.dead:
            raise RuntimeError("lock of a radix node that was already evicted")
        while node is not self.root:
            if node.ref == 0:
                self._locked_pages += len(node.pages)
            node.ref += 1
            node = node.parent

    def unlock(self, node: Optional[RadixNode]) -> None:
        if node is None or node is self.root:
            return
        if node.dead or node.ref <= 0:
            raise RuntimeError(f"unlock of a radix node that is not locked: {node!r}")
        while node is not self.root:
            node.ref -= 1
            if node.ref == 0:
                self._locked_pages -= len(node.pages)
                if not node.children:
                    self._push(node)
            node = node.parent

    # --- eviction -----------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free num_pages pages (fewer if not enough are evictable); returns pages freed.

        Takes pages from unlocked leaves, least recently used first, deepest pages first: when
        a leaf holds more pages than still needed, only its tail goes and the leaf keeps the
        shorter prefix (whose pages are just as valid), so evicting a little never throws a
        long cached sequence away.
        """
        freed = 0
        while freed < num_pages and self._heap:
            access, _, node = heapq.heappop(self._heap)
            if not self._evictable_leaf(node) or access != node.last_access:
                continue  # stale entry
            self._changed(self._first_page(node))
            node.changed = self._epoch
            keep = len(node.pages) - (num_pages - freed)
            if keep > 0:  # trim the tail; node stays an evictable leaf with the same access
                ps = self.page_size
                self.allocator.free(node.pages[keep:])
                freed += len(node.pages) - keep
                self._total_pages -= len(node.pages) - keep
                node.pages, node.key = node.pages[:keep], node.key[: keep * ps]
                heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
                break
            parent = node.parent
            del parent.children[node.key[: self.page_size]]
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self._total_pages -= len(node.pages)
            self._num_nodes -= 1
            node.dead = True
            node.parent = None
            if parent is not self.root and self._evictable_leaf(parent):
                self._push(parent)
        return freed

    def reset(self) -> None:
        """Drop the whole tree, freeing its pages. No node may be locked."""
        if self._locked_pages:
            raise RuntimeError(f"reset of the radix cache while {self._locked_pages} pages are locked")
        self._forget_changes()
        pages: list[int] = []
        for node in self._iter_nodes():
            pages.extend(node.pages)
            node.dead = True
            # A node and its parent refer to each other (parent, children): left linked, the
            # dropped tree is one reference cycle that only the cyclic GC frees, walking every
            # node's key (~370k token ids after the shared-prefix workload). Unlinked, it goes
            # by reference counting as the old root does.
            node.parent = None
        self.allocator.free(pages)
        self._init_tree()

    # --- change stamps ----------------------------------------------------------------------------
    def stamp(self) -> int:
        """A name for the tree's current content, for `changed_since`."""
        return self._epoch

    def changed_since(self, stamp: int, first_page: tuple[int, ...]) -> bool:
        """Whether match_len of a sequence starting with first_page (a page_size-tuple) may differ
        from its value when `stamp()` returned stamp. False means it is certainly the same."""
        return self._reset_epoch > stamp or self._changed_epoch.get(first_page, -1) > stamp

    def changed_under_since(self, stamp: int) -> list[tuple[int, ...]] | None:
        """First pages under which pages were added or removed since `stamp()` returned stamp
        (repeats possible), or None when that is unknown (a reset, or a log that has moved on):
        then any match_len may have changed."""
        if self._reset_epoch > stamp or self._log_start > stamp:
            return None
        log, out = self._change_log, []
        i = len(log) - 1
        while i >= 0 and log[i][0] > stamp:
            out.append(log[i][1])
            i -= 1
        return out

    def _changed(self, first_page: tuple[int, ...]) -> None:
        """Pages were added or removed under the top-level edge whose first page this is."""
        self._epoch += 1
        self._changed_epoch[first_page] = self._epoch
        self._change_log.append((self._epoch, first_page))
        if len(self._change_log) > 4096:  # bounded: callers that fall behind re-probe
            self._log_start = self._change_log[2047][0]
            del self._change_log[:2048]
        # One entry per first page ever changed, including ones long gone from the tree: bounded
        # by forgetting them all now and then, which makes every older memo stale (rare).
        if len(self._changed_epoch) > 4 * len(self.root.children) + self.max_forgotten_first_pages:
            self._forget_changes()

    def _forget_changes(self) -> None:
        self._epoch += 1
        self._reset_epoch = self._epoch
        self._changed_epoch.clear()
        self._change_log.clear()
        self._log_start = self._epoch

    def _first_page(self, node: RadixNode) -> tuple[int, ...]:
        """The first page of the top-level edge above node (node's own when it is one)."""
        root = self.root
        while node.parent is not root:
            node = node.parent
        return node.key[: self.page_size]

    # --- helpers --------------------------------------------------------------------------------
    def _iter_nodes(self) -> Iterator[RadixNode]:
        """Every node but the root."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _common_pages(self, child: RadixNode, token_ids: list[int], i: int, n: int) -> int:
        """Whole pages shared by child's edge and token_ids[i*ps : n*ps] (the first one is known to match)."""
        ps = self.page_size
        span = min(len(child.pages), n - i) * ps
        seg = token_ids[i * ps : i * ps + span]
        key = child.key
        if key[span - 1] == seg[-1] and key[:span] == tuple(seg):
            return span // ps  # common case: the whole (overlapping) edge matches
        # Binary search over whole pages with C-speed slice comparisons: a token-by-token loop
        # costs ~30 us on a 1,024-token edge (a shared prompt prefix whose edge runs on into one
        # request's suffix), paid by every probe of a waiting request of that group.
        lo, hi = 1, span // ps - 1  # key's first lo pages match seg's; its first hi + 1 do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key[lo * ps : mid * ps] == tuple(seg[lo * ps : mid * ps]):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _split(self, node: RadixNode, m: int) -> RadixNode:
        """Cut node's edge after m pages; returns the new upper node (node keeps the rest)."""
        ps = self.page_size
        upper = RadixNode(node.key[: m * ps], node.pages[:m], node.parent, node.last_access)
        upper.ref = node.ref  # every lock through node passes through upper too
        node.parent.children[upper.key[:ps]] = upper
        node.key, node.pages = node.key[m * ps :], node.pages[m:]
        node.parent = upper
        upper.children[node.key[:ps]] = node
        self._num_nodes += 1
        return upper

    def _touch(self, node: RadixNode) -> None:
        node.last_access = self._clock
        if self._evictable_leaf(node):
            self._push(node)

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return not node.dead and not node.children and node.ref == 0 and node is not self.root

    def _push(self, node: RadixNode) -> None:
        heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [(n.last_access, next(self._seq), n) for n in self._iter_nodes() if self._evictable_leaf(n)]
            heapq.heapify(self._heap)
