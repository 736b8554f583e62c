"""RadixCache tests: hand-computed cases, a stateful check against a reference model, and the
real Scheduler driving the cache through a fake runner that catches wrong or freed pages.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.cache.radix import RadixCache


def make(num_pages: int = 64, page_size: int = 1) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages + 1)
    return alloc, RadixCache(alloc, page_size)


def put(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Insert tokens with freshly allocated pages, freeing duplicates like the scheduler does."""
    pages = cache.allocator.alloc(len(tokens) // cache.page_size)
    assert pages is not None
    res = cache.insert(tokens, pages)
    cache.allocator.free(res.duplicate_pages)
    return pages


def tree_pages(cache: RadixCache) -> list[int]:
    return [p for n in cache._iter_nodes() for p in n.pages]


def tree_map(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """prefix (k whole pages of tokens) -> page id of its k-th page, read without touching LRU."""
    ps, out = cache.page_size, {}
    stack = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for i, page in enumerate(node.pages):
            out[prefix + node.key[: (i + 1) * ps]] = page
        prefix = prefix + node.key
        stack.extend((c, prefix) for c in node.children.values())
        for first, c in node.children.items():
            assert c.key[:ps] == first and c.parent is node and len(c.key) == len(c.pages) * ps > 0
    return out


def path_of(cache: RadixCache, node) -> tuple[tuple[int, ...], list[int]]:
    """(tokens, pages) spelled by the path from the root to node."""
    key: tuple[int, ...] = ()
    pages: list[int] = []
    while node is not cache.root:
        key, pages = node.key + key, list(node.pages) + pages
        node = node.parent
    return key, pages


def check_conservation(cache: RadixCache) -> None:
    alloc = cache.allocator
    held = tree_pages(cache)
    assert len(held) == len(set(held)), "a page is held by two tree nodes"
    assert not any(alloc.is_free(p) for p in held), "a tree page is also free"
    assert alloc.num_free + len(held) == alloc.capacity, "pages leaked"
    assert cache.total_pages == cache.cached_pages == len(held)
    unlocked = sum(len(n.pages) for n in cache._iter_nodes() if n.ref == 0)
    assert cache.evictable_pages == unlocked


# --- hand-computed cases ------------------------------------------------------------------


def test_empty_tree_and_empty_key():
    alloc, cache = make()
    r = cache.match_prefix([])
    assert r.pages == [] and r.num_tokens == 0
    r = cache.match_prefix([1, 2, 3])
    assert r.pages == [] and r.num_tokens == 0
    cache.lock(r.node)  # root / nothing matched: no-op
    cache.unlock(r.node)
    cache.lock(None)
    cache.unlock(None)
    res = cache.insert([], [])
    assert res.duplicate_pages == []
    assert cache.total_pages == 0 and cache.evictable_pages == 0
    assert cache.evict(10) == 0


def test_insert_length_mismatch_raises():
    _, cache = make(page_size=4)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], [5])
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [5])


def test_page_size_1_match_and_duplicates():
    alloc, cache = make()
    res = cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    assert res.duplicate_pages == []
    assert cache.total_pages == 4
    assert cache.match_prefix([1, 2, 3, 4]).pages == [10, 11, 12, 13]  # exact
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).pages == [10, 11, 12, 13]  # longer key
    r = cache.match_prefix([1, 2, 9])  # diverges mid-edge: splits
    assert r.pages == [10, 11] and r.num_tokens == 2
    assert cache.num_nodes == 2
    assert cache.match_prefix([7]).pages == []
    # Overlap [1, 2, 3] is already cached: the caller's pages for it come back; 5, 6 are new.
    res = cache.insert([1, 2, 3, 5, 6], [20, 21, 22, 23, 24])
    assert res.duplicate_pages == [20, 21, 22]
    assert cache.total_pages == 6
    assert cache.match_prefix([1, 2, 3, 5, 6, 7]).pages == [10, 11, 12, 23, 24]
    assert cache.match_prefix([1, 2, 3, 4]).pages == [10, 11, 12, 13]
    # Fully cached key: everything is a duplicate, nothing changes.
    res = cache.insert([1, 2], [30, 31])
    assert res.duplicate_pages == [30, 31] and cache.total_pages == 6


def test_insert_with_tree_pages_does_not_report_them():
    alloc, cache = make()
    put(cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3, 4])
    new = alloc.alloc(2)
    res = cache.insert([1, 2, 3, 4, 5], m.pages + new)
    assert res.duplicate_pages == []  # the matched pages are the tree's own, not the caller's
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == m.pages + new
    check_conservation(cache)


def test_page_size_16_whole_pages_only():
    ps = 16
    alloc, cache = make(page_size=ps)
    a = list(range(100, 148))  # 3 pages
    pages = put(cache, a)
    r = cache.match_prefix(a[:40])  # 2.5 pages match -> 2 whole pages
    assert r.pages == pages[:2] and r.num_tokens == 32
    assert cache.match_prefix(a[:15]).pages == []  # partial first page: nothing
    assert cache.match_prefix(a).num_tokens == 48
    assert cache.match_prefix(a + [1, 2, 3]).pages == pages
    # Diverge inside the second page: only the first page matches.
    b = a[:20] + [7] * 12
    assert cache.match_prefix(b).pages == pages[:1]
    new = alloc.alloc(2)
    res = cache.insert(b, new)
    assert res.duplicate_pages == new[:1]
    alloc.free(res.duplicate_pages)
    assert cache.match_prefix(b).pages == [pages[0], new[1]]
    assert cache.match_prefix(a).pages == pages
    assert cache.total_pages == 4
    check_conservation(cache)


def test_probe_and_match_with_a_limit_are_those_of_the_slice():
    """probe(ids, limit) and match_prefix(ids, limit) answer for ids[:limit] (the scheduler asks
    about a request's first tokens without slicing its token list)."""
    ps = 4
    _, cache = make(page_size=ps)
    a = list(range(100, 124))  # 6 pages
    pages = put(cache, a)
    longer = a + [1, 2, 3, 4, 5]
    for limit in (0, 3, 4, 9, 16, 24, 27, 29, 100):
        n, where = cache.probe(longer, limit)
        ref_n, ref_where = cache.probe(longer[:limit])
        assert (n, where[1], where[2]) == (ref_n, ref_where[1], ref_where[2]) and where[0] is ref_where[0]
        assert n == min(limit, 24) // ps * ps
        assert cache.match_prefix(longer, limit).pages == pages[: min(limit, 24) // ps]
    check_conservation(cache)


def test_a_splitting_probe_cuts_the_edge_where_the_tokens_part_from_it():
    """probe(split=True): where ids part from an edge inside it, the edge is cut there (as
    match_prefix would cut it); the probes of other ids sharing that prefix then end at the
    upper part, whole, without a search inside the long edge. Cut off by the limit, nothing is cut."""
    ps = 4
    _, cache = make(page_size=ps)
    lead = list(range(100, 124))  # a group's first prompt, cached whole: one 6-page edge
    pages = put(cache, lead)
    member = lead[:16] + [7] * 8  # shares 4 pages, then parts
    assert cache.probe(member)[0] == 16 and cache.num_nodes == 1  # no cut without split
    stamp = cache.stamp()
    n, where = cache.probe(member, split=True)
    check_conservation(cache)
    upper = cache.root.children[tuple(lead[:ps])]
    assert n == 16 and cache.num_nodes == 2
    assert upper.pages == tuple(pages[:4]) and where[:2] == (upper, 0) and len(upper.children) == 1
    # A sibling's probe ends at the upper part, whole: nothing more to cut.
    sibling_n, sibling_where = cache.probe(lead[:16] + [8] * 8, split=True)
    assert sibling_n == 16 and sibling_where[:2] == (upper, 0) and cache.num_nodes == 2
    assert cache.probe_holds(stamp, where) and cache.match_probed(n, where).pages == pages[:4]
    assert cache.match_prefix(lead).pages == pages  # nothing lost
    # A probe cut off by its limit inside an edge leaves the edge whole.
    _, cache = make(page_size=ps)
    put(cache, lead)
    assert cache.probe(lead + [1] * 4, limit=12, split=True)[0] == 12 and cache.num_nodes == 1


def test_a_reset_tree_is_freed_without_the_cyclic_gc():
    """reset() unlinks each dropped node from its parent: the old tree is no reference cycle,
    so reference counting frees it (with the cyclic GC off, its nodes are gone at once)."""
    import gc

    from pipeline_infer.cache.radix import RadixNode

    def live_nodes() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is RadixNode)

    gc.collect()
    gc.disable()
    try:
        before = live_nodes()
        _, cache = make(num_pages=64, page_size=2)
        for prompt in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8], [1, 2, 9, 9], [5, 5, 5, 5]):
            put(cache, prompt)
        assert live_nodes() - before >= 6  # the root, splits and leaves
        cache.reset()
        assert live_nodes() - before == 1  # only the new root
    finally:
        gc.enable()


def test_split_keeps_pages_and_locks():
    alloc, cache = make(page_size=2)
    pages = put(cache, [1, 1, 2, 2, 3, 3, 4, 4])
    full = cache.match_prefix([1, 1, 2, 2, 3, 3, 4, 4])
    cache.lock(full.node)
    assert cache.evictable_pages == 0
    # Splitting a locked edge: both halves stay locked.
    r = cache.match_prefix([1, 1, 2, 2, 9, 9])
    assert r.pages == pages[:2] and cache.num_nodes == 2
    assert cache.evictable_pages == 0 and cache.evict(100) == 0
    check_conservation(cache)
    cache.unlock(full.node)
    assert cache.evictable_pages == 4
    check_conservation(cache)


def test_lock_prevents_eviction():
    alloc, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4, 5])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    assert cache.locked_pages == 3 and cache.evictable_pages == 2
    assert cache.evict(100) == 2  # only the [4, 5] leaf can go
    assert cache.match_prefix([1, 2, 3]).pages == m.pages
    assert cache.match_prefix([1, 2, 4, 5]).num_tokens == 2
    check_conservation(cache)
    cache.unlock(m.node)
    assert cache.evictable_pages == 3
    assert cache.evict(1) == 1  # leaf [3] goes first, then [1, 2] becomes a leaf
    assert cache.evict(5) == 2
    assert cache.total_pages == 0 and alloc.num_free == alloc.capacity


def test_unlock_below_zero_raises():
    _, cache = make()
    put(cache, [1, 2])
    m = cache.match_prefix([1, 2])
    cache.lock(m.node)
    cache.unlock(m.node)
    with pytest.raises(RuntimeError):
        cache.unlock(m.node)


def test_lru_order():
    alloc, cache = make()
    put(cache, [1, 1])  # oldest
    put(cache, [2, 2])
    put(cache, [3, 3])
    cache.match_prefix([1, 1])  # [1, 1] is now the most recent; [2, 2] the oldest
    assert cache.evict(2) == 2
    assert cache.match_prefix([2, 2]).pages == []
    assert cache.match_prefix([1, 1]).num_tokens == 2
    assert cache.match_prefix([3, 3]).num_tokens == 2
    # [3, 3] was matched last: [1, 1] goes first now.
    assert cache.evict(2) == 2
    assert cache.match_prefix([1, 1]).pages == []
    assert cache.match_prefix([3, 3]).num_tokens == 2
    check_conservation(cache)


def test_evict_trims_leaf_tail_then_parent_and_frees_to_allocator():
    alloc, cache = make(num_pages=10)
    p = put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 5])
    cache.match_prefix([1, 2, 5])  # [3, 4] leaf is older
    assert alloc.num_free == 10 - 5
    assert cache.evict(1) == 1  # only the leaf's last page: [1, 2, 3] stays cached
    assert alloc.is_free(p[3]) and alloc.num_free == 10 - 4
    assert cache.match_prefix([1, 2, 3, 4]).pages == p[:3]
    check_conservation(cache)
    cache.match_prefix([1, 2, 5])  # [3] is the LRU leaf again
    assert cache.evict(2) == 2  # [3] whole, then one page of the next LRU leaf [5]
    assert cache.match_prefix([1, 2, 3]).num_tokens == 2
    assert cache.match_prefix([1, 2, 5]).num_tokens == 2
    # [1, 2] is an unlocked leaf now.
    assert cache.evict(3) == 2
    assert alloc.num_free == 10 and cache.total_pages == 0 and cache.num_nodes == 0
    check_conservation(cache)


def test_evict_trim_keeps_locked_prefix_and_page_size():
    alloc, cache = make(num_pages=16, page_size=4)
    key = list(range(100, 124))  # 6 pages
    pages = put(cache, key)
    m = cache.match_prefix(key[:8])  # splits: [2 pages] locked, [4 pages] leaf
    cache.lock(m.node)
    assert cache.evict(3) == 3
    assert cache.match_prefix(key).pages == pages[:3]
    assert cache.evict(10) == 1  # the locked two pages stay
    assert cache.match_prefix(key).pages == pages[:2]
    check_conservation(cache)
    cache.unlock(m.node)


def test_evictable_pages_tracks_lock_unlock():
    _, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])
    put(cache, [5])
    assert cache.evictable_pages == 5
    a = cache.match_prefix([1, 2, 3]).node
    b = cache.match_prefix([1, 2, 4]).node
    cache.lock(a)
    assert cache.evictable_pages == 2  # [4] and [5]
    cache.lock(b)
    assert cache.evictable_pages == 1
    cache.lock(a)
    cache.unlock(a)
    assert cache.evictable_pages == 1
    cache.unlock(a)
    assert cache.evictable_pages == 2
    cache.unlock(b)
    assert cache.evictable_pages == 5
    check_conservation(cache)


def test_reset_frees_everything():
    alloc, cache = make()
    put(cache, [1, 2, 3])
    put(cache, [1, 4])
    put(cache, [2])
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert alloc.num_free == alloc.capacity
    assert cache.total_pages == 0 and cache.evictable_pages == 0
    assert cache.match_prefix([1, 2, 3]).pages == []
    put(cache, [1, 2])  # usable after reset
    assert cache.match_prefix([1, 2]).num_tokens == 2


def test_many_touches_keep_heap_bounded():
    _, cache = make()
    put(cache, [1, 2])
    for _ in range(1000):
        cache.match_prefix([1, 2])
    assert len(cache._heap) < 100
    assert cache.evict(2) == 2


# --- stateful check against a reference model ---------------------------------------------------

ALPHABET = st.integers(0, 3)


class RadixModel(RuleBasedStateMachine):
    """Reference: every cached page is the page of one page-aligned prefix.

    `model[prefix] = (page, last_access)` with prefix a tuple of k*page_size tokens; the set of
    prefixes is prefix-closed. Locks are counted per prefix (a lock on prefix P counts on P and
    all its ancestors). Eviction removes the least recently accessed unlocked leaf prefix.
    """

    @initialize(page_size=st.sampled_from([1, 2, 3]), num_pages=st.integers(4, 24), seed=st.integers(0, 1000))
    def setup(self, page_size, num_pages, seed):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages + 1)
        self.cache = RadixCache(self.alloc, page_size)
        self.model: dict[tuple[int, ...], list[int]] = {}  # prefix -> [page, last_access]
        self.locks: dict[tuple[int, ...], int] = {}
        self.held: list[tuple[object, tuple[int, ...]]] = []  # (node, prefix) locked by "requests"
        self.clock = 0
        self.bases = [[random.Random(seed + i).randrange(4) for _ in range(6 * page_size)] for i in range(2)]
        self.probes: list[tuple[list[int], int, int]] = []  # (tokens, stamp, match_len) memos
        self.wheres: list[tuple[list[int], int, int, tuple]] = []  # (tokens, stamp, length, where) of probe()

    # -- model helpers --
    def _prefixes(self, tokens, k):
        return [tuple(tokens[: j * self.ps]) for j in range(1, k + 1)]

    def _model_match(self, tokens):
        k = 0
        while (k + 1) * self.ps <= len(tokens) and tuple(tokens[: (k + 1) * self.ps]) in self.model:
            k += 1
        return k

    def _is_leaf(self, prefix):
        n = len(prefix) + self.ps
        return not any(len(q) == n and q[: len(prefix)] == prefix for q in self.model)

    def _tokens(self, data, max_pages, extra=True):
        """Mostly a prefix of one of a few base sequences plus a random tail, so that keys share
        long prefixes and diverge inside edges (splits); sometimes fully random."""
        n = data.draw(st.integers(0, max_pages)) * self.ps
        if extra:
            n += data.draw(st.integers(0, self.ps - 1))
        base = data.draw(st.sampled_from(self.bases + [[]]))
        cut = data.draw(st.integers(0, min(n, len(base))))
        return base[:cut] + data.draw(st.lists(ALPHABET, min_size=n - cut, max_size=n - cut))

    # -- rules --
    @rule(data=st.data())
    def match(self, data):
        tokens = self._tokens(data, 6)
        r = self.cache.match_prefix(tokens)
        self.clock += 1
        k = self._model_match(tokens)
        prefixes = self._prefixes(tokens, k)
        assert r.num_tokens == k * self.ps == len(r.pages) * self.ps
        assert r.pages == [self.model[p][0] for p in prefixes]
        for p in prefixes:
            self.model[p][1] = self.clock
        if data.draw(st.integers(0, 2)):  # lock two times in three
            self.cache.lock(r.node)
            for p in prefixes:
                self.locks[p] = self.locks.get(p, 0) + 1
            self.held.append((r.node, tuple(tokens[: k * self.ps])))

    @rule(data=st.data())
    def insert(self, data):
        tokens = self._tokens(data, 6, extra=False)
        n = len(tokens) // self.ps
        pages = self.alloc.alloc(n)
        if pages is None:
            self._evict(n - self.alloc.num_free)
            pages = self.alloc.alloc(n)
            if pages is None:
                return
        self._check_insert(tokens, pages, self.cache.insert(tokens, pages))

    def _check_insert(self, tokens, pages, res):
        """An insert's result against the model (which it then updates): the caller's pages for
        prefixes the tree already had come back as duplicates (the tree's own pages given back,
        as an insert from a node passes them, are not), every prefix on the path is refreshed,
        and the result spells the whole key."""
        n = len(pages)
        self.clock += 1
        expected_dups = []
        for p, page in zip(self._prefixes(tokens, n), pages):
            if p in self.model:
                if page != self.model[p][0]:
                    expected_dups.append(page)
                self.model[p][1] = self.clock
            else:
                self.model[p] = [page, self.clock]
        assert res.duplicate_pages == expected_dups
        # The tree's pages for the whole key, and the node that spells exactly the key.
        assert res.pages == [self.model[p][0] for p in self._prefixes(tokens, n)]
        assert path_of(self.cache, res.node) == (tuple(tokens), res.pages)
        self.alloc.free(res.duplicate_pages)

    @rule(data=st.data())
    def match_len(self, data):
        """The side-effect-free probe agrees with the model and changes neither the tree nor LRU."""
        tokens = self._tokens(data, 6)
        before = (tree_map(self.cache), self.cache.num_nodes, self.cache._clock)
        assert self.cache.match_len(tokens) == self._model_match(tokens) * self.ps
        assert (tree_map(self.cache), self.cache.num_nodes, self.cache._clock) == before

    @rule(data=st.data())
    def memo_probe(self, data):
        """Remember a match_len with the tree's stamp, as the scheduler does for waiting requests."""
        tokens = self._tokens(data, 6)
        if len(tokens) >= self.ps:
            self.probes.append((tokens, self.cache.stamp(), self.cache.match_len(tokens)))
            del self.probes[:-8]

    @rule(data=st.data())
    def memo_where(self, data):
        """probe() agrees with match_len; remember it with where it ended, as the scheduler does.
        With split=True it may cut the edge where tokens part from it: one node more at most,
        the same content and LRU clock."""
        tokens = self._tokens(data, 6)
        if len(tokens) >= self.ps:
            split = data.draw(st.booleans())
            before = (tree_map(self.cache), self.cache.num_nodes, self.cache._clock)
            n, where = self.cache.probe(tokens, split=split)
            assert n == self.cache.match_len(tokens)
            after = (tree_map(self.cache), self.cache.num_nodes, self.cache._clock)
            assert after[0] == before[0] and after[2] == before[2]
            assert before[1] <= after[1] <= before[1] + split
            self.wheres.append((tokens, self.cache.stamp(), n, where))
            del self.wheres[:-8]

    @precondition(lambda self: self.wheres)
    @rule(data=st.data())
    def match_probed(self, data):
        """match_probed of a probe that still holds is match_prefix: pages, node, LRU refresh."""
        tokens, stamp, n, where = self.wheres[data.draw(st.integers(0, len(self.wheres) - 1))]
        if not self.cache.probe_holds(stamp, where):
            return
        r = self.cache.match_probed(n, where)
        self.clock += 1
        k = self._model_match(tokens)
        prefixes = self._prefixes(tokens, k)
        assert r.num_tokens == k * self.ps == n
        assert r.pages == [self.model[p][0] for p in prefixes]
        assert path_of(self.cache, r.node) == (tuple(tokens[: k * self.ps]), r.pages)
        for p in prefixes:
            self.model[p][1] = self.clock

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def extend_from_node(self, data):
        """A locked match (taken some steps ago) extended by an insert that starts at its node, as
        Scheduler._share_computed does: same result and LRU refresh as an insert from the root."""
        node, prefix = self.held[data.draw(st.integers(0, len(self.held) - 1))]
        k = len(prefix) // self.ps
        tokens = list(prefix) + self._tokens(data, 6 - k, extra=False)
        n = len(tokens) // self.ps
        new = self.alloc.alloc(n - k)
        if new is None:
            return
        mine = [self.model[p][0] for p in self._prefixes(tokens, k)] + new
        self._check_insert(tokens, mine, self.cache.insert(tokens, mine, node, k))

    @rule(data=st.data())
    def extend_matched(self, data):
        """Scheduler pattern: match, lock, then insert matched pages + new ones, then unlock."""
        tokens = self._tokens(data, 6, extra=False)
        r = self.cache.match_prefix(tokens)
        self.clock += 1
        k = len(r.pages)
        for p in self._prefixes(tokens, k):
            self.model[p][1] = self.clock
        self.cache.lock(r.node)
        n = len(tokens) // self.ps
        new = self.alloc.alloc(n - k)
        if new is not None:
            res = self.cache.insert(tokens, r.pages + new)
            self.clock += 1
            assert res.duplicate_pages == []
            for p, page in zip(self._prefixes(tokens, n), r.pages + new):
                if p in self.model:
                    assert self.model[p][0] == page
                    self.model[p][1] = self.clock
                else:
                    self.model[p] = [page, self.clock]
        self.cache.unlock(r.node)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unlock(self, data):
        i = data.draw(st.integers(0, len(self.held) - 1))
        node, prefix = self.held.pop(i)
        self.cache.unlock(node)
        for j in range(1, len(prefix) // self.ps + 1):
            self.locks[prefix[: j * self.ps]] -= 1

    @rule(n=st.integers(0, 8))
    def evict(self, n):
        self._evict(n)

    def _evict(self, n):
        evictable = self.cache.evictable_pages
        freed = self.cache.evict(n)
        assert min(n, evictable) <= freed <= evictable
        # The model evicts the same number of pages, LRU leaf prefix first: whole leaf nodes of
        # the tree go in the same order, so the contents must agree (checked by the invariant).
        for _ in range(freed):
            leaves = [p for p in self.model if self.locks.get(p, 0) == 0 and self._is_leaf(p)]
            victim = min(leaves, key=lambda p: self.model[p][1])
            page = self.model.pop(victim)[0]
            assert self.alloc.is_free(page)

    @rule()
    def reset(self):
        if self.held:
            return
        self.cache.reset()
        self.model.clear()
        self.locks.clear()
        assert self.alloc.num_free == self.alloc.capacity

    # -- invariants --
    @invariant()
    def memos_valid_unless_changed(self):
        """changed_since is never wrong when it says a memoized match_len still holds."""
        for tokens, stamp, n in self.probes:
            if not self.cache.changed_since(stamp, tuple(tokens[: self.ps])):
                assert self.cache.match_len(tokens) == n

    @invariant()
    def probes_valid_while_they_hold(self):
        """probe_holds is never wrong when it says a probe's length still holds."""
        for tokens, stamp, n, where in self.wheres:
            if self.cache.probe_holds(stamp, where):
                assert self.cache.match_len(tokens) == n

    @invariant()
    def conservation(self):
        check_conservation(self.cache)
        assert tree_map(self.cache) == {p: v[0] for p, v in self.model.items()}
        unlocked = sum(1 for p in self.model if self.locks.get(p, 0) == 0)
        assert self.cache.evictable_pages == unlocked
        assert self.cache.locked_pages == len(self.model) - unlocked

    def teardown(self):
        if hasattr(self, "cache"):
            for node, _ in self.held:
                self.cache.unlock(node)
            self.cache.reset()
            assert self.alloc.num_free == self.alloc.capacity


TestRadixModel = RadixModel.TestCase
TestRadixModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- the real scheduler driving the cache -------------------------------------------------------------


def _scheduler_setup(page_size: int, num_pages: int, **kw):
    # Imported here: request.py depends on modules that may land separately.
    from pipeline_infer.scheduler import Scheduler
    from test_scheduler import FakeRunner

    alloc = PageAllocator(num_pages + 1)
    cache = RadixCache(alloc, page_size)
    sched = Scheduler(alloc, page_size, prefix_cache=cache, **kw)
    return alloc, cache, sched, FakeRunner(page_size)


def _req(rid: str, prompt: list[int], max_new: int):
    from pipeline_infer.request import Request
    from pipeline_infer.sampling_params import SamplingParams

    return Request(rid=rid, prompt_ids=prompt, params=SamplingParams(max_new_tokens=max_new, temperature=0.0))


@pytest.mark.parametrize("page_size", [1, 16])
def test_scheduler_reuses_shared_prefix(page_size):
    from test_scheduler import expected_output, run_all

    alloc, cache, sched, runner = _scheduler_setup(
        page_size, 4096 // page_size, max_running_requests=4, chunked_prefill_size=48
    )
    rng = random.Random(11)
    shared = [rng.randrange(1, 1000) for _ in range(64)]
    a = _req("a", shared + [rng.randrange(1, 1000) for _ in range(5)], 12)
    b = _req("b", shared + [rng.randrange(1, 1000) for _ in range(7)], 12)
    sched.add(a)
    run_all(sched, runner)
    assert a.cached_tokens == 0
    assert cache.total_pages > 0 and cache.locked_pages == 0
    assert alloc.num_free + cache.total_pages == alloc.capacity
    sched.add(b)
    run_all(sched, runner)
    assert b.cached_tokens == 64  # the shared prefix is whole pages for both page sizes
    assert a.output_ids == expected_output(a.prompt_ids, 12)
    assert b.output_ids == expected_output(b.prompt_ids, 12)
    # Same prompt again: everything but the last prompt token comes from the cache.
    c = _req("c", list(a.prompt_ids), 12)
    sched.add(c)
    run_all(sched, runner)
    assert c.cached_tokens == (len(a.prompt_ids) - 1) // page_size * page_size
    assert c.output_ids == a.output_ids
    assert cache.locked_pages == 0
    check_conservation(cache)
    cache.reset()
    assert alloc.num_free == alloc.capacity


@pytest.mark.parametrize("page_size", [1, 4])
def test_scheduler_tight_pool_with_radix(page_size):
    """Shared prefixes, concurrent requests and a pool small enough to force eviction and
    retraction: outputs stay correct and every page ends up free or in the tree."""
    from test_scheduler import expected_output, run_all

    alloc, cache, sched, runner = _scheduler_setup(
        page_size, 160 // page_size, max_running_requests=6, chunked_prefill_size=32, conservativeness=0.05
    )
    rng = random.Random(page_size)
    bases = [[rng.randrange(1, 1000) for _ in range(40)] for _ in range(3)]
    reqs = []
    for i in range(24):
        base = bases[rng.randrange(3)]
        prompt = base[: rng.randint(0, 40)] + [rng.randrange(1, 1000) for _ in range(rng.randint(1, 10))]
        reqs.append(_req(f"r{i}", prompt, 16))
    for wave in (reqs[:12], reqs[12:]):
        for r in wave:
            sched.add(r)
        run_all(sched, runner)
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 16), r.rid
    assert sum(r.cached_tokens for r in reqs) > 0
    assert sched.num_retractions > 0, "the pool was meant to force a retraction"
    assert cache.locked_pages == 0
    check_conservation(cache)
    cache.reset()
    assert alloc.num_free == alloc.capacity


def test_scheduler_does_not_evict_its_own_match():
    """A match must be locked before the admission allocates: that allocation may evict, and
    the matched pages (just touched, but unlocked) must not be what it evicts and hands back."""
    from pipeline_infer.scheduler import Scheduler
    from test_scheduler import FakeRunner, expected_output, run_all

    alloc = PageAllocator(12 + 1)
    cache = RadixCache(alloc, 1)
    sched = Scheduler(
        alloc, 1, max_running_requests=4, chunked_prefill_size=64, prefix_cache=cache, conservativeness=0.01
    )
    runner = FakeRunner(1)
    x = [11, 12, 13, 14]
    a = _req("a", x, 1)
    sched.add(a)
    run_all(sched, runner)
    assert cache.total_pages == 4 and alloc.num_free == 8
    # r takes 5 pages and keeps running; b matches x (4 pages) and needs 5 more with only 3 free.
    r = _req("r", [31, 32, 33, 34, 35], 6)
    b = _req("b", x + [21, 22, 23, 24, 25], 3)
    sched.add(r)
    sched.add(b)
    run_all(sched, runner)
    assert r.output_ids == expected_output(r.prompt_ids, 6)
    assert b.output_ids == expected_output(b.prompt_ids, 3)
    assert cache.locked_pages == 0
    check_conservation(cache)


@pytest.mark.parametrize("page_size", [1, 2])
def test_insert_from_node_and_match_probed_are_the_walks_from_the_root(page_size):
    """Two trees given the same operations, one inserting from a locked match's node and
    admitting through match_probed (as the scheduler does), the other walking from the root:
    the same pages, results, last accesses and eviction order throughout."""
    rng = random.Random(page_size)
    bases = [[rng.randrange(3) for _ in range(8 * page_size)] for _ in range(3)]
    trees = [RadixCache(PageAllocator(200), page_size) for _ in range(2)]

    def state(cache):
        return sorted((path_of(cache, n), n.last_access, n.ref) for n in cache._iter_nodes())

    held = []  # per tree: (node, pages, tokens) locked matches
    for _ in range(300):
        tokens = rng.choice(bases)[: rng.randrange(1, 9) * page_size] + [rng.randrange(3) for _ in range(rng.randrange(3) * page_size)]
        op = rng.randrange(4)
        if op == 0:  # admit: probe, then match (through the probe on tree 0) and lock
            probes = [c.probe(tokens) for c in trees]
            stamps = [c.stamp() for c in trees]
            assert probes[0][0] == probes[1][0]
            if rng.randrange(2):  # something in between, as other admissions in the step
                other = rng.choice(bases)[: rng.randrange(1, 9) * page_size]
                for c in trees:
                    c.match_prefix(other)
            if not trees[0].probe_holds(stamps[0], probes[0][1]):
                continue
            results = [trees[0].match_probed(probes[0][0], probes[0][1]), trees[1].match_prefix(tokens)]
            assert results[0].pages == results[1].pages and results[0].num_tokens == results[1].num_tokens
            for c, r in zip(trees, results):
                c.lock(r.node)
            held.append(([r.node for r in results], results[0].pages, tokens[: results[0].num_tokens]))
        elif op == 1 and held:  # hand computed pages to the tree, from the node or from the root
            nodes, pages, prefix = held.pop(rng.randrange(len(held)))
            extra = [rng.randrange(3) for _ in range(rng.randrange(1, 3) * page_size)]
            new = trees[0].allocator.alloc(len(extra) // page_size)
            assert new == trees[1].allocator.alloc(len(extra) // page_size)
            if new is None:
                continue
            for c, node in zip(trees, nodes):
                c.unlock(node)
            a = trees[0].insert(prefix + extra, pages + new, nodes[0], len(pages))
            b = trees[1].insert(prefix + extra, pages + new)
            assert (a.pages, a.duplicate_pages) == (b.pages, b.duplicate_pages)
            for c, r in zip(trees, (a, b)):
                c.allocator.free(r.duplicate_pages)
        elif op == 2:
            n = rng.randrange(6)
            assert trees[0].evict(n) == trees[1].evict(n)
        else:
            for c in trees:
                put(c, tokens[: len(tokens) // page_size * page_size])
        assert state(trees[0]) == state(trees[1])
        assert tree_map(trees[0]) == tree_map(trees[1])


def test_changed_since_is_per_first_page():
    """Growth or eviction under one first page leaves other sequences' memos valid; reset invalidates all."""
    alloc, cache = make(num_pages=16, page_size=2)
    put(cache, [1, 1, 2, 2])
    s = cache.stamp()
    put(cache, [1, 1, 2, 2, 3, 3])  # grows under first page (1, 1)
    assert cache.changed_since(s, (1, 1)) and not cache.changed_since(s, (5, 5))
    assert cache.changed_under_since(s) == [(1, 1)]
    put(cache, [5, 5, 6, 6, 7, 7])
    put(cache, [5, 5, 6, 6, 8, 8])  # (5, 5) -> (6, 6) -> {(7, 7), (8, 8)}
    s = cache.stamp()
    put(cache, [1, 1, 2, 2])  # nothing new: no change
    assert not cache.changed_since(s, (1, 1)) and cache.changed_under_since(s) == []
    cache.evict(1)  # the least recently used leaf: (3, 3) under (1, 1)
    assert cache.changed_since(s, (1, 1)) and not cache.changed_since(s, (5, 5))
    assert cache.match_len([1, 1, 2, 2, 3, 3]) == 4
    s = cache.stamp()
    cache.evict(2)  # (7, 7) then (8, 8): a deep leaf, its first page found through its parents
    assert cache.changed_since(s, (5, 5)) and not cache.changed_since(s, (1, 1))
    assert set(cache.changed_under_since(s)) == {(5, 5)}
    s = cache.stamp()
    cache.reset()
    assert cache.changed_since(s, (1, 1)) and cache.changed_since(s, (9, 9))
    assert cache.changed_under_since(s) is None


@pytest.mark.parametrize("bound", [65536, 4])
def test_forgetting_old_changes_makes_every_older_memo_stale(monkeypatch, bound):
    """The per-first-page table is bounded: past the bound it is cleared, and then every older
    stamp must read as changed; below it, churn under other first pages leaves a memo valid."""
    monkeypatch.setattr(RadixCache, "max_forgotten_first_pages", bound)
    alloc, cache = make(num_pages=8, page_size=2)
    put(cache, [1, 1])
    kept = cache.match_prefix([1, 1]).node
    cache.lock(kept)  # (1, 1) stays while other first pages come and go
    s = cache.stamp()
    for k in range(10, 40):
        put(cache, [k, k])
        assert cache.evict(1) == 1
    assert cache.match_len([1, 1]) == 2
    assert cache.changed_since(s, (1, 1)) == (bound == 4)
    assert len(cache._changed_epoch) <= 4 * len(cache.root.children) + bound + 1
    cache.unlock(kept)


@pytest.mark.parametrize("policy", ["lpm", "batch", "auto"])
def test_scheduler_prefix_memo_matches_tree(policy):
    """The scheduler's memoized cached-prefix length of every waiting request equals a fresh
    probe of the tree at every step, through prefills, inserts, eviction and retraction."""
    from test_scheduler import expected_output

    page_size = 4
    alloc, cache, sched, runner = _scheduler_setup(
        page_size, 128 // page_size, max_running_requests=6, chunked_prefill_size=24,
        conservativeness=0.05, schedule_policy=policy,
    )
    rng = random.Random(7)
    bases = [[rng.randrange(1, 1000) for _ in range(48)] for _ in range(3)]
    reqs = []
    for i in range(30):
        tail = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 9))]
        prompt = bases[rng.randrange(3)][: rng.randint(0, 48)] + tail
        reqs.append(_req(f"r{i}", prompt, 16))
        reqs[-1].batch_job = i % 2 == 0
        sched.add(reqs[-1])
    checked = 0
    for _ in range(10_000):
        for r in sched.waiting:
            assert sched._probe(r) == cache.match_len(r.token_ids[: r.max_prefix_len]), r.rid
            checked += 1
        batch = sched.schedule()
        if batch is None:
            break
        sched.commit(batch, runner.run(batch))
    assert not sched.has_work and checked > 0
    assert sched.num_retractions > 0 and sum(r.cached_tokens for r in reqs) > 0
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 16), r.rid


@pytest.mark.parametrize("policy", ["lpm", "batch", "auto"])
@pytest.mark.parametrize("tight", [False, True])
@pytest.mark.parametrize("window", [None, 6])
def test_reused_admission_order_equals_fresh_order(policy, tight, window, monkeypatch):
    """The scheduler reuses its last lpm / batch / auto order across steps when nothing it depends
    on changed (`Scheduler._reuse_order`); at every step that order must equal a fresh one. With a
    policy window of 6 most of the queue waits beyond it and admissions pull requests in."""
    from test_scheduler import expected_output

    if window is not None:
        monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", window)

    page_size = 4
    alloc, cache, sched, runner = _scheduler_setup(
        page_size, (96 if tight else 4000) // page_size, max_running_requests=4, chunked_prefill_size=24,
        conservativeness=0.05, schedule_policy=policy,
    )
    rng = random.Random(3)
    bases = [[rng.randrange(1, 1000) for _ in range(40)] for _ in range(3)]
    reqs = []
    for i in range(40):
        if i % 3 == 0:  # a singleton group
            prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 30))]
        else:
            tail = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 9))]
            prompt = bases[rng.randrange(3)][: rng.randint(8, 40)] + tail
        reqs.append(_req(f"r{i}", prompt, 10))
        reqs[-1].batch_job = i % 4 != 0
    for r in reqs[:30]:
        sched.add(r)
    original = sched._ordered_waiting
    reused = 0

    def checked(cached):
        nonlocal reused
        reusable = sched._reuse_order() is not None  # a pure check: it only refreshes memos
        order = original(cached)
        reused += reusable
        assert _waiting_rids(order) == [r.rid for r in sched._fresh_order({})]
        return order

    sched._ordered_waiting = checked
    for step in range(10_000):
        if step == 15:
            for r in reqs[30:]:  # late arrivals
                sched.add(r)
        batch = sched.schedule()
        if batch is None:
            break
        sched.commit(batch, runner.run(batch))
    assert not sched.has_work
    assert reused > 0, "the order was never reused"
    if tight:
        assert sched.num_retractions > 0
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 10), r.rid


@pytest.mark.parametrize("policy", ["lpm", "batch", "auto"])
def test_order_is_reused_beyond_the_policy_window(policy, monkeypatch):
    """A deep queue of distinct prompts (a long batch job): admissions pull the next arrivals into
    the policy window, and they rank at its end, so the order is kept rather than rebuilt every
    step; every order still equals a fresh one, through eviction (a pool that fills)."""
    from test_scheduler import expected_output

    monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", 8)
    ps = 4
    alloc, cache, sched, runner = _scheduler_setup(
        ps, 160 // ps, max_running_requests=3, chunked_prefill_size=32, schedule_policy=policy
    )
    rng = random.Random(11)
    reqs = [_req(f"r{i}", [rng.randrange(1, 1000) for _ in range(rng.randint(5, 20))], 6) for i in range(40)]
    stats = _run_batch_checked(sched, runner, reqs)
    assert cache.total_pages > 0 and alloc.num_free < 10  # the pool filled: eviction ran
    # Orders built afresh: the first, one after each pool-bound retraction at most, and (batch,
    # auto) one when the group recency table passes 4 windows (32 admissions) and is cleared.
    assert stats["calls"] - stats["reused"] <= 2 + sched.num_retractions, stats
    assert stats["reused"] > 10, stats
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 6), r.rid


@pytest.mark.parametrize("policy", ["batch", "auto"])
def test_pulled_in_request_of_a_ranked_group_rebuilds_the_order(policy, monkeypatch):
    """B2 enters the window after an admission, and its group (same first 64 tokens) already has
    B1 ranked there: a fresh order puts B2 next to B1, not at the window's end, so the saved order
    must not be kept."""
    from test_scheduler import expected_output

    monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", 4)
    alloc, cache, sched, runner = _scheduler_setup(4, 400, max_running_requests=1, chunked_prefill_size=256,
                                                   schedule_policy=policy)
    rng = random.Random(2)
    rand = lambda n: [rng.randrange(1, 1000) for _ in range(n)]  # noqa: E731
    shared = rand(64)
    prompts = {"A": rand(70), "B1": shared + rand(6), "C": rand(70), "D": rand(70), "B2": shared + rand(6)}
    reqs = [_req(k, p, 3) for k, p in prompts.items()]
    stats = _run_batch_checked(sched, runner, reqs)
    assert stats["calls"] > 0
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 3), r.rid


def test_flushed_cache_schedules_a_resubmitted_batch_like_a_fresh_engine():
    """After the prefix cache is flushed, the same batch submitted again is admitted in the same
    order as the first time: the batch order's group recency (which groups were admitted last)
    goes with the cache (`Scheduler.prefix_cache_flushed`), as Engine.flush_cache does."""
    from test_scheduler import run_all

    rng = random.Random(9)
    heads = [[rng.randrange(1, 1000) for _ in range(64)] for _ in range(6)]
    prompts = [heads[i % 6] + [rng.randrange(1, 1000) for _ in range(rng.randint(2, 9))] for i in range(30)]
    rng.shuffle(prompts)
    alloc, cache, sched, runner = _scheduler_setup(4, 2000, max_running_requests=2, chunked_prefill_size=64,
                                                   schedule_policy="batch")

    def admission_order() -> list[int]:
        reqs = [_req(f"r{i}", p, 2) for i, p in enumerate(prompts)]
        for r in reqs:
            r.batch_job = True
            sched.add(r)
        seen: list[int] = []
        while sched.has_work:
            batch = sched.schedule()
            for c in batch.chunks:  # first appearance: the admission
                if int(c.req.rid[1:]) not in seen:
                    seen.append(int(c.req.rid[1:]))
            sched.commit(batch, runner.run(batch))
        return seen

    first = admission_order()
    cache.reset()
    sched.prefix_cache_flushed()
    assert admission_order() == first


@pytest.mark.parametrize("seed", range(12))
def test_kept_orders_equal_fresh_ones_on_random_queues(seed, monkeypatch):
    """Random mixes (policy, window, memory, shared heads, single and batch submissions, late
    arrivals): whenever the scheduler keeps its order, beyond the window or not, it equals a
    fresh one."""
    from test_scheduler import expected_output

    rng = random.Random(seed)
    policy = rng.choice(["lpm", "batch", "auto"])
    monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", rng.randint(2, 10))
    ps = rng.choice([1, 4])
    alloc, cache, sched, runner = _scheduler_setup(
        ps, rng.choice([120, 400, 2000]) // ps, max_running_requests=rng.randint(1, 4),
        chunked_prefill_size=rng.choice([16, 64]), conservativeness=0.05, schedule_policy=policy,
    )
    heads = [[rng.randrange(1, 1000) for _ in range(rng.randint(4, 70))] for _ in range(4)]

    def make(i):
        head = rng.choice(heads)[: rng.randint(0, 70)] if rng.random() < 0.6 else []
        r = _req(f"r{i}", head + [rng.randrange(1, 1000) for _ in range(rng.randint(1, 8))], rng.randint(1, 6))
        r.batch_job = rng.random() < 0.8
        return r

    reqs = [make(i) for i in range(rng.randint(10, 40))]
    late = [make(len(reqs) + i) for i in range(rng.randint(0, 10))]
    for r in reqs:
        sched.add(r)
    stats = _check_orders(sched)
    step = 0
    while sched.has_work or late:
        if step == 7:
            for r in late:
                sched.add(r)
            reqs += late
            late = []
        batch = sched.schedule()
        if batch is not None:
            sched.commit(batch, runner.run(batch))
        step += 1
        assert step < 10_000
    assert stats["calls"] > 0
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, r.params.max_new_tokens), r.rid


def test_requests_pulled_in_together_must_rank_in_arrival_order(monkeypatch):
    """lpm, a window of 2: A and B (8 cached tokens) are ranked; once they leave, C (nothing
    cached) and then D (4 cached) enter. Both rank below the window's lowest, but a fresh order
    puts D before C, so the order kept so far must go."""
    from test_scheduler import expected_output

    monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", 2)
    alloc, cache, sched, runner = _scheduler_setup(4, 200, max_running_requests=2, chunked_prefill_size=64,
                                                   schedule_policy="lpm")
    from test_scheduler import run_all

    p8, p4 = [11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24]
    for i, warm in enumerate([p8 + [9], p4 + [9]]):  # their KV lands in the tree
        sched.add(_req(f"warm{i}", warm, 1))
    run_all(sched, runner)
    reqs = [_req("A", p8 + [1, 2], 3), _req("B", p8 + [3, 4], 3), _req("C", [31, 32, 33, 34, 35], 3),
            _req("D", p4 + [5, 6], 3)]
    stats = _run_batch_checked(sched, runner, reqs)
    assert stats["calls"] > 1
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 3), r.rid


def _run_batch_checked(sched, runner, reqs) -> dict:
    """Submit reqs as one batch job and run them to the end, every admission order checked
    against a fresh one (`_check_orders`); returns its counters."""
    for r in reqs:
        r.batch_job = True
        sched.add(r)
    stats = _check_orders(sched)
    while sched.has_work:
        batch = sched.schedule()
        sched.commit(batch, runner.run(batch))
    return stats


def _check_orders(sched):
    """Wrap sched._ordered_waiting: every order it returns must equal a fresh one. Returns a
    counter of the orders that were reused."""
    original, stats = sched._ordered_waiting, {"reused": 0, "calls": 0}

    def checked(cached):
        stats["calls"] += 1
        stats["reused"] += sched._reuse_order() is not None
        order = original(cached)
        assert _waiting_rids(order) == [r.rid for r in sched._fresh_order({})]
        return order

    sched._ordered_waiting = checked
    return stats


def _waiting_rids(order) -> list[str]:
    """A returned admission order as admission sees it: a reused order keeps requests that have
    left `waiting` since it was made (at most half of it), which admission skips."""
    from pipeline_infer.request import RequestStatus

    return [r.rid for r in order if r.status is RequestStatus.WAITING]


def test_reused_batch_order_regroups_after_admissions():
    """batch: an admission moves its group ahead of groups with an equal cached prefix (recency),
    and removing a group's best-cached member can drop it behind another group: a reused order
    must notice both (`Scheduler._keeps_rank`)."""
    from test_scheduler import run_all

    ps = 4
    alloc, cache, sched, runner = _scheduler_setup(
        ps, 1000, max_running_requests=2, chunked_prefill_size=16, schedule_policy="batch"
    )
    rng = random.Random(5)
    rand = lambda n: [rng.randrange(1, 1000) for _ in range(n)]  # noqa: E731
    pa, pb, r4, q8 = rand(64), rand(64), rand(4), rand(8)
    for i, warm in enumerate([pb + q8 + [7], pa + r4 + [7]]):  # cache PB+Q, then PA+R: A is the newer group
        sched.add(_req(f"warm{i}", warm, 1))
        run_all(sched, runner)
    stats = _check_orders(sched)
    # Scenario 1: A (first arrival, long uncached suffixes: deferred by the packing) and B (short
    # suffixes) have equal cached prefixes; admitting B's members must move B ahead of A.
    a = [_req(f"a{i}", pa + rand(40), 2) for i in range(3)]
    b = [_req(f"b{i}", pb + rand(4), 2) for i in range(6)]
    for r in a + b:
        sched.add(r)
    run_all(sched, runner)
    # Scenario 2: B's best-cached member leaves; B (64 cached) must fall behind A (68 cached) even
    # though B has the newest recency.
    sched.add(_req("b-first", pb + rand(4), 2))
    batch = sched.schedule()  # admits it: B is now the group of the last admission
    sched.commit(batch, runner.run(batch))
    late = [_req("a-mid", pa + r4 + rand(4), 4), _req("b-best", pb + q8 + rand(4), 4)]
    late += [_req(f"b-rest{i}", pb + rand(4), 4) for i in range(3)]
    for r in late:
        sched.add(r)
    run_all(sched, runner)
    assert stats["reused"] > 0
    assert cache.locked_pages == 0


def test_admissions_moving_on_to_the_next_group_keep_the_order():
    """batch: three groups with equally long cached prefixes, admitted a few requests a step. Once
    a group's members are all in, the next step's admissions come from the next group: it is the
    first of its rank tier still waiting, so its newer recency moves nothing and the order is kept
    (`Scheduler._leads_its_tier`), where it was rebuilt at every such step before; every kept
    order equals a fresh one."""
    from test_scheduler import expected_output, run_all

    ps = 4
    alloc, cache, sched, runner = _scheduler_setup(
        ps, 2000, max_running_requests=64, chunked_prefill_size=12, schedule_policy="batch"
    )
    rng = random.Random(4)
    rand = lambda n: [rng.randrange(1, 1000) for _ in range(n)]  # noqa: E731
    systems = [rand(64) for _ in range(3)]
    for i, s in enumerate(systems):  # cache each system prompt (the runner checks the K/V it reads)
        sched.add(_req(f"warm{i}", s + [7], 1))
        run_all(sched, runner)
    reqs = [_req(f"g{i % 3}-{i}", systems[i % 3] + rand(5), 2) for i in range(12)]
    stats = _run_batch_checked(sched, runner, reqs)
    # 5 uncached tokens each, 12 a step: two admissions a step, a new group every other step;
    # one fresh order, the first.
    assert stats["calls"] >= 5 and stats["calls"] - stats["reused"] == 1, stats
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 2), r.rid


def test_a_single_submission_does_not_hold_its_batch_groups_rank():
    """auto ranks single submissions apart (first, in arrival order), so a single sharing a batch
    group's first tokens does not keep the group's best cached prefix when the group's best batch
    member is admitted: G (72 cached, then 64) must fall behind H (68), and the order be rebuilt."""
    from pipeline_infer.request import RequestStatus

    ps = 4
    alloc, cache, sched, runner = _scheduler_setup(
        ps, 1000, max_running_requests=8, chunked_prefill_size=4096, schedule_policy="auto"
    )
    rng = random.Random(7)
    rand = lambda n: [rng.randrange(1, 1000) for _ in range(n)]  # noqa: E731
    g, x, h, y = rand(64), rand(8), rand(64), rand(4)
    put(cache, g + x)
    put(cache, h + y)
    reqs = {"s": g + x + rand(3), "b1": g + x + rand(3), "b2": g + rand(5), "h1": h + y + rand(3)}
    made = {}
    for rid, prompt in reqs.items():
        made[rid] = r = _req(rid, prompt, 2)
        r.batch_job = rid != "s"
        sched.add(r)
    assert _waiting_rids(sched._ordered_waiting({})) == ["s", "b1", "b2", "h1"]
    sched._probe(made["s"])  # as an admission pass does when it checks s (e.g. held): 72 memoized
    key = sched._group_key(made["b1"])
    sched._last_group = key  # b1's group had the last batch admission: only its best can move it
    made["b1"].status = RequestStatus.RUNNING
    sched._dequeue(made["b1"], admitted=True)
    assert sched._order is None
    assert [r.rid for r in sched._fresh_order({})] == ["s", "h1", "b2"]


def test_the_trees_keys_and_pages_are_not_walked_by_the_cyclic_gc():
    """At page size 1 the tree holds a page id per cached token; as lists, every full GC
    collection walked all of them (0.1-0.2 s a collection, the engine thread stopped)."""
    import gc

    _, cache = make()
    put(cache, list(range(10)))
    put(cache, list(range(5)) + [99, 98])  # splits a node
    m = cache.match_prefix(list(range(8)))
    cache.lock(m.node)
    cache.unlock(m.node)
    cache.evict(1)  # trims a leaf
    gc.collect()
    nodes = [cache.root]
    for node in nodes:
        nodes.extend(node.children.values())
    assert len(nodes) > 2
    for node in nodes:
        assert not gc.is_tracked(node.pages) and not gc.is_tracked(node.key), node


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_long_edge_matches_up_to_the_page_where_it_diverges(page_size):
    """One 20-page edge; probes that diverge from it inside page k (at any token of the page)
    match exactly k pages: the binary search over pages inside _common_pages."""
    _, cache = make(num_pages=64, page_size=page_size)
    tokens = [random.Random(5).randrange(100) for _ in range(20 * page_size)]
    put(cache, tokens)
    for k in range(1, 20):
        for offset in range(page_size):
            probe = list(tokens)
            probe[k * page_size + offset] = 100 + k  # a token the edge does not have
            assert cache.match_len(probe) == k * page_size
            assert cache.match_len(probe[: (k + 1) * page_size]) == k * page_size
    assert cache.match_len(tokens) == len(tokens)
    assert cache.match_prefix(tokens[:7 * page_size] + [999] * page_size).num_tokens == 7 * page_size


def _deep_queue_of_groups(monkeypatch, policy: str, num_groups: int, num_reqs: int, prefix_len: int, **kw):
    """A scheduler with a policy window of 8 (page size 4) and num_reqs requests of 2 new tokens,
    request i starting with system prompt i % num_groups (prefix_len tokens) and a few of its
    own: most of the queue waits beyond the window. (cache, scheduler, runner, requests, prompts)."""
    monkeypatch.setattr("pipeline_infer.scheduler._POLICY_WINDOW", 8)
    _, cache, sched, runner = _scheduler_setup(4, 4000, schedule_policy=policy, **kw)
    rng = random.Random(num_groups)
    systems = [[rng.randrange(1, 1000) for _ in range(prefix_len)] for _ in range(num_groups)]
    reqs = [_req(f"r{i}", systems[i % num_groups] + [rng.randrange(1, 1000) for _ in range(rng.randint(1, 6))], 2)
            for i in range(num_reqs)]
    return cache, sched, runner, reqs, systems


@pytest.mark.parametrize("policy", ["batch", "auto"])
def test_keeps_rank_looks_only_at_a_groups_ranked_members(policy, monkeypatch):
    """A deep queue of one group (a batch job sharing a system prompt, most of it beyond the
    policy window): whether an admission keeps the order (`_keeps_rank`) depends on the group's
    members the order ranked (the window's), and is decided without walking the hundreds
    waiting beyond it."""
    cache, sched, runner, reqs, (system,) = _deep_queue_of_groups(
        monkeypatch, policy, 1, 600, 16, max_running_requests=64, chunked_prefill_size=4096
    )
    put(cache, system)  # the system prompt is cached: every member's memo is 16 once probed
    for r in reqs:
        r.batch_job = True
        sched.add(r)
    order = sched._ordered_waiting({})  # ranks the window: its 8 members probed, 16 cached each
    ranked, beyond = order[:8], order[8:]
    assert all(r.prefix_probe is not None and r.prefix_probe[2] == 16 for r in ranked)
    assert all(r.prefix_probe is None for r in beyond)
    key = sched._group_key(reqs[0])
    sched._last_group = key  # the group of the last admission
    group = sched._waiting_groups[key]
    visited = []

    class Counting(dict):
        def values(self):
            for v in dict.values(self):
                visited.append(v)
                yield v

    # A ranked member is still waiting: the group keeps its best (16), the order stands.
    assert sched._keeps_rank(ranked[0], key, Counting(group)) is True and len(visited) == 1
    # The last ranked member goes: the rest are unranked, so the order must be rebuilt; found at
    # the first member past the window, not after walking all 592.
    rest = Counting((id(r), r) for r in beyond)
    visited.clear()
    assert sched._keeps_rank(ranked[-1], key, rest) is False
    assert len(visited) == 1


@pytest.mark.parametrize("policy", ["batch", "auto", "lpm"])
def test_admission_skips_at_most_a_window_of_held_requests(policy, monkeypatch):
    """A deep queue held behind its groups' first prefills (one per group admitted, every other
    member waits for its prefix to land in the tree): an admission pass checks at most a policy
    window of held requests, not the whole queue; every order still equals a fresh one and every
    output is right."""
    from test_scheduler import expected_output

    from pipeline_infer import scheduler as scheduler_module

    cache, sched, runner, reqs, _ = _deep_queue_of_groups(
        monkeypatch, policy, 3, 300, 40, max_running_requests=16, chunked_prefill_size=256
    )
    checks = []
    held = scheduler_module.Scheduler._held

    def counted(self, req, cached):
        out = held(self, req, cached)
        checks[-1] += out
        return out

    monkeypatch.setattr(scheduler_module.Scheduler, "_held", counted)
    schedule = sched.schedule

    def counting_schedule():
        checks.append(0)
        return schedule()

    sched.schedule = counting_schedule
    _run_batch_checked(sched, runner, reqs)
    assert sched.num_held > 0
    assert max(checks) == 8  # a window's worth at most (it was 297 in the first pass)
    for r in reqs:
        assert r.output_ids == expected_output(r.prompt_ids, 2), r.rid


def test_insert_with_key_len_is_insert_of_the_slice():
    """insert(ids, pages, key_len=k) caches exactly what insert(ids[:k], pages) would, without
    the caller's slice; a key_len that does not fit the pages (or the ids) is refused."""
    ps = 4
    ids = list(range(100, 140))  # 10 pages' worth
    results = []
    for use_key_len in (False, True):
        alloc, cache = make(num_pages=64, page_size=ps)
        first = alloc.alloc(6)
        cache.insert(ids[:24], first)
        pages = first[:3] + alloc.alloc(5)  # 32 tokens: the first 3 pages duplicate what is cached
        if use_key_len:
            r = cache.insert(ids, pages, key_len=32)
        else:
            r = cache.insert(ids[:32], pages)
        results.append((r.duplicate_pages, r.pages, cache.total_pages, cache.match_len(ids)))
    assert results[0] == results[1] and results[0][3] == 32
    alloc, cache = make(num_pages=64, page_size=ps)
    with pytest.raises(ValueError, match="key of len"):
        cache.insert(ids, alloc.alloc(2), key_len=12)  # 2 pages are 8 tokens
    with pytest.raises(ValueError, match="key of len"):
        cache.insert(ids[:8], alloc.alloc(3), key_len=12)  # 12 tokens asked of 8 given
