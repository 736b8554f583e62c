"""Scheduler: which tokens run in the next step. Pure Python: it never touches torch.

Each step mixes the decodes of every running request with prefill chunks (of requests
already running, then of newly admitted ones) bounded by `chunked_prefill_size` tokens.
With `mixed_chunk=False` (the engine's `enable_mixed_chunk=False`, SGLang's default) a step
is either prefill chunks only, whenever there are any to run, or decodes only: decode steps
then always fit a captured CUDA graph, at the price of pausing decodes during prefills.

Page ownership
--------------
Every page of the pool is, at all times, exactly one of: free (in the allocator); owned by
the prefix cache (a radix-tree node holds it); or owned by exactly one running request. A
request's `pages[:num_shared_pages]` are tree pages it reads under a lock on `prefix_node`
(the node that spells exactly those pages); `pages[num_shared_pages:]` are its own. Waiting
requests hold no pages. Pages move between the three states only here:
- admission: a match lends tree pages (locked), the rest are allocated (evicting unlocked
  tree leaves if needed);
- after each committed prefill chunk, the request's computed whole pages are inserted into
  the tree (`_share_computed`): the tree takes the pages it did not have, the request swaps
  any duplicate for the tree's copy and frees its own, and moves its lock to the new node. A
  request admitted later then finds the prompt cached while the first one is still decoding;
- finish, abort or retraction (`_release`): whole computed pages go to the tree, the rest
  (and duplicates) are freed, the lock is dropped.

Memory policy
-------------
- A request is admitted only when free pages (plus pages the prefix cache could evict)
  cover its uncached prompt plus a decode reserve, after the reserves of the running
  requests are set aside. The reserve is `new_token_ratio` times the tokens a request may
  still generate; the ratio decays while memory suffices and jumps after a retraction, so
  retraction stays rare without leaving the pool idle.
- When a decode still finds no free page, the scheduler retracts running requests, newest
  first (`_pick_retraction` says why). Their KV goes to the prefix cache where there is
  one, and they are re-queued at the front in age order: they resume later by re-matching
  (or recomputing) their tokens, so nothing is lost or repeated. No request is admitted in
  a step that retracted one.

Scheduling policies (`schedule_policy`)
---------------------------------------
All of them share two rules. Retracted requests go first, oldest first (they were running;
resuming them first bounds their delay and stops newer work from starving them). And, with
the prefix cache on, a waiting request whose uncached prefix is being prefilled right now by
another request (admitted earlier, or earlier in this step) waits for that prefill to land in
the tree instead of computing the same tokens alongside it ("in-flight prefix sharing",
`_held`): of n samples of one prompt (`n > 1`), or of many prompts sharing a system
prompt, one prefills and the others reuse its pages one step later.

- "fcfs": arrival order. Admission stops at the first request that does not fit in memory
  (head-of-line), so no request is overtaken for long: predictable latency, no starvation.
  The serving-style default.
- "lpm": longest cached prefix first (ties in arrival order) among the first
  `_POLICY_WINDOW` waiting requests, the rest after them in arrival order. Maximises cache
  hits when the cache holds a mix of prefixes (e.g. multi-turn or agent workloads); a
  request with no cached prefix can wait behind a stream of cached ones. Head-of-line like
  fcfs. Without a prefix cache it is fcfs.
- "batch": for offline batch jobs, where only total throughput matters. Waiting requests
  (first `_POLICY_WINDOW`) are grouped by their leading `_GROUP_KEY_TOKENS` tokens, groups
  ordered by their longest cached prefix, then first arrival; members by cached prefix, then
  arrival. So a group whose prefix is cached runs together while the prefix stays in the tree
  (instead of every group's prefix competing for the pool), and with in-flight sharing one
  member of each uncached group prefills the prefix before its siblings follow. That first
  member of a group with nothing cached (and others waiting) is tried before the order, within
  a quarter of the step's budget (`_admit_leads`), so the prefixes of the groups that rank last
  are cached by their turn instead of holding their siblings back at the end. Then lengths
  are packed: requests whose uncached prompt fits whole in the step's remaining token budget
  go first (looking up to `_PACK_LOOKAHEAD` requests past the first that does not), and one
  that would need chunking only takes what budget is left; a request that does not fit in
  memory is skipped (up to `_PACK_LOOKAHEAD` of them) for smaller ones behind it instead of
  blocking the queue. The policy recommended for `generate` over a batch.
- "auto" (the engine's default): "batch" for batch submissions, "fcfs" for the rest. A
  request is a batch submission (`Request.batch_job`) when one `generate` call submitted it
  with others (a list of prompts, or `n > 1`), as the dataflow operators do. Single
  submissions, latency-bound, are tried first in arrival order (head-of-line, as in fcfs);
  the batch submissions behind them are ordered and packed as in "batch".
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.request import PLACEHOLDER, FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)

# Reserve decode room for at most this many future tokens per request: beyond it the
# estimate is noise, and a huge max_new_tokens must not block admission on its own.
_RESERVE_CLIP_TOKENS = 4096
# lpm / batch order at most this many waiting requests per step (each costs a tree probe).
_POLICY_WINDOW = 1024
# batch: requests whose first tokens agree form a group.
_GROUP_KEY_TOKENS = 64
# batch: requests skipped for lack of memory (or of step budget) before admission stops looking.
_PACK_LOOKAHEAD = 64
# A shared in-flight prefix shorter than this is not worth a step's wait (unless it is all the
# waiting request would compute from whole pages, as for the samples of one short prompt).
_HOLD_MIN_TOKENS = 32
# batch: the share of a step's token budget that first members of groups with nothing cached may
# take before the order's cached groups (see `_admit_leads`).
_LEAD_BUDGET_SHARE = 4


def _group_rank(best_cached: int, last_admission: int) -> int:
    """The "batch" order's key for a group, higher first: its longest cached prefix, then its
    last admission (-1: none). One formula for `_batch_order` and `_pull_in`, whose exactness
    depends on ranking a pulled-in request exactly as a fresh order would."""
    return best_cached << 40 | (last_admission + 1)


class PrefixCache(Protocol):
    """What the scheduler needs from cache/radix.py (kept abstract so it stays testable)."""

    def match_prefix(self, token_ids: list[int], limit: int | None = None) -> Any: ...
    def match_probed(self, num_tokens: int, where: Any) -> Any: ...
    def match_len(self, token_ids: list[int]) -> int: ...
    def probe(self, token_ids: list[int], limit: int | None = None) -> tuple[int, Any]: ...
    def probe_holds(self, stamp: int, where: Any) -> bool: ...
    def stamp(self) -> int: ...
    def changed_under_since(self, stamp: int) -> list[tuple[int, ...]] | None: ...
    def insert(self, token_ids: list[int], pages: list[int], node: Any = None, node_pages: int = 0) -> Any: ...
    def lock(self, node: Any) -> None: ...
    def unlock(self, node: Any) -> None: ...
    def evict(self, num_pages: int) -> int: ...
    @property
    def evictable_pages(self) -> int: ...


@dataclass(slots=True)  # one per request per step: cheap to build
class ScheduledChunk:
    req: Request
    start: int  # tokens of req already in the KV cache (the chunk's prefix length)
    length: int  # tokens fed this step: req.token_ids[start : start + length]
    samples: bool  # the chunk reaches the end of req.token_ids: sample the next token
    prefill: bool = True  # False for a decode step of a request past its prefill

    @property
    def is_decode(self) -> bool:
        return not self.prefill


class ScheduledBatch:
    """One step's work: its chunks, or, for a step of decodes alone (most steps of a batch job),
    two columns instead: the requests and each one's start (its one token's position).

    A decode-only step at 1,024 running requests would otherwise build 1,024 chunk objects that
    every consumer then walks attribute by attribute; the hot consumers (the model runner's
    build, launch and collect, `Scheduler.commit`, the step timer) read the columns. `chunks`
    is still there for everything else: built from the columns on first use.
    """

    __slots__ = ("_chunks", "decode_reqs", "decode_starts", "num_steps", "num_decodes")

    def __init__(
        self,
        chunks: list[ScheduledChunk] | None = None,
        decode_reqs: list[Request] | None = None,
        decode_starts: list[int] | None = None,
        num_steps: int = 1,
        num_decodes: int = 0,
    ) -> None:
        if (chunks is None) == (decode_reqs is None):
            raise TypeError("ScheduledBatch takes exactly one of chunks and decode_reqs (with decode_starts)")
        self._chunks = chunks
        # chunks only: how many of them, from the first, are one-token decodes that sample (a
        # mixed step puts its decodes first); commit takes their tokens as a decode step's.
        self.num_decodes = num_decodes
        self.decode_reqs = decode_reqs  # None unless every row is a one-token decode that samples
        self.decode_starts = decode_starts
        # Decode steps the batch runs back to back (a decode window, Scheduler._window_steps):
        # step k decodes each row at decode_starts[i] + k from the token step k - 1 sampled.
        self.num_steps = num_steps

    @property
    def chunks(self) -> list[ScheduledChunk]:
        if self._chunks is None:
            self._chunks = [ScheduledChunk(r, s, 1, True, False) for r, s in zip(self.decode_reqs, self.decode_starts)]
        return self._chunks

    @property
    def size(self) -> int:
        """Rows (chunks) in the step."""
        return len(self.decode_reqs) if self.decode_reqs is not None else len(self._chunks)

    @property
    def num_tokens(self) -> int:
        if self.decode_reqs is not None:
            return len(self.decode_reqs) * self.num_steps
        return sum(c.length for c in self._chunks)


class _TrieNode:
    __slots__ = ("key", "children", "count")

    def __init__(self, key: list[int], count: int):
        # The edge's tokens (empty for the root). A list, not a tuple: an edge is compared with
        # a slice of a request's token list, and list == list needs no tuple built from that
        # slice (1,024 tokens: 1.1 against 3.3 us on a 2-core CPU).
        self.key = key
        self.children: dict[int, _TrieNode] = {}  # by the first token of their edge
        self.count = count  # sequences whose path runs through this node


class _InFlight:
    """The token sequences of requests still prefilling: a compressed trie with counts.

    Kept up to date as requests are admitted and finish their prefill (not rebuilt per step):
    `add`/`remove` and `shared` cost one dict lookup and one slice comparison per edge.
    `shared(ids, n)` is the longest prefix of ids[:n] that some in-flight prefill covers, in tokens.
    """

    def __init__(self):
        self.root = _TrieNode([], 0)
        self.members: dict[int, tuple[Request, int]] = {}  # id(req) -> (req, tokens added)

    def __contains__(self, req: Request) -> bool:
        return id(req) in self.members

    def add(self, req: Request) -> None:
        n = req.num_tokens
        self.members[id(req)] = (req, n)
        ids, node, i = req.token_ids, self.root, 0
        node.count += 1
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                node.children[ids[i]] = _TrieNode(ids[i:n], 1)
                return
            m = _common(child.key, ids, i, n)
            if m < len(child.key):  # split: `upper` takes the common part
                upper = _TrieNode(child.key[:m], child.count)
                child.key = child.key[m:]
                upper.children[child.key[0]] = child
                node.children[ids[i]] = upper
                child = upper
            child.count += 1
            node, i = child, i + m

    def remove(self, req: Request) -> None:
        entry = self.members.pop(id(req), None)
        if entry is None:
            return
        _, n = entry
        ids, node, i = req.token_ids, self.root, 0
        node.count -= 1
        while i < n:  # every added sequence ends on a node boundary
            child = node.children[ids[i]]
            child.count -= 1
            if child.count == 0:
                del node.children[ids[i]]
                return
            node, i = child, i + len(child.key)

    def covers(self, ids: list[int], n: int) -> bool:
        """Whether some in-flight prefill covers all of ids[:n] (n <= len(ids)): `shared(ids, n) >= n`
        without finding where a partial match ends. One slice comparison per edge, and none when
        the edge's last compared token already differs (the usual miss), where `shared` binary-
        searches the mismatch: `Scheduler._held` only needs to know whether a given length is covered."""
        node, i = self.root, 0
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                return False
            m = min(len(child.key), n - i)
            if not _span_matches(child.key, ids, i, m):
                return False
            node, i = child, i + m
        return True

    def shared(self, ids: list[int], n: int | None = None) -> int:
        """n: only ids[:n] (no slice of a request's tokens needed to ask about its prefix)."""
        node, i = self.root, 0
        n = len(ids) if n is None else min(n, len(ids))
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                break
            m = _common(child.key, ids, i, n)
            i += m
            if m < len(child.key):
                break
            node = child
        return i


def _span_matches(key: list[int], ids: list[int], i: int, span: int) -> bool:
    """key[:span] == ids[i : i + span] (span >= 1) in one comparison, unless the last tokens
    already differ (the usual miss: two prompts sharing a long prefix, then not), where that
    comparison would be wasted."""
    return key[span - 1] == ids[i + span - 1] and (key if span == len(key) else key[:span]) == ids[i : i + span]


def _common(key: list[int], ids: list[int], i: int, n: int) -> int:
    """Length of the common prefix of key and ids[i:n] (key[0] == ids[i] is known)."""
    span = min(len(key), n - i)
    if _span_matches(key, ids, i, span):
        return span
    lo, hi = 1, span - 1  # key[:lo] matches; key[:hi + 1] does not
    while lo < hi:  # binary search with C-speed slice comparisons
        mid = (lo + hi + 1) // 2
        if key[lo:mid] == ids[i + lo : i + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# Decode steps one schedule may run back to back (num_scheduler_steps), at most (request.py's
# _WINDOW_ROOM: the positions a window may run past a request's end).
MAX_SCHEDULER_STEPS = 16
_by_age = attrgetter("queue_seq")  # submission order (kept across retractions)
_window_ok = attrgetter("window_ok")


def _known_computed(req: Request) -> int:
    """Computed tokens whose ids are on the host: the prefix cache is keyed by ids, so a page
    holding a placeholder (a token still in flight) must not enter it."""
    return min(req.num_computed, req.prompt_len + req.num_output)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_running_requests: int,
        chunked_prefill_size: int,
        schedule_policy: str = "fcfs",
        conservativeness: float = 1.0,
        prefix_cache: PrefixCache | None = None,
        mixed_chunk: bool = True,
        admission_batch: int = 1,
        num_scheduler_steps: int = 1,
    ):
        if schedule_policy not in ("auto", "fcfs", "lpm", "batch"):
            raise ValueError(f"schedule_policy must be 'auto', 'fcfs', 'lpm' or 'batch', got {schedule_policy!r}")
        self.allocator = allocator
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.chunked_prefill_size = chunked_prefill_size
        self.schedule_policy = schedule_policy
        self.prefix_cache = prefix_cache
        self.mixed_chunk = mixed_chunk
        if not isinstance(admission_batch, int) or admission_batch < 1:
            raise ValueError(f"admission_batch must be an int >= 1, got {admission_batch!r}")
        self.admission_batch = admission_batch
        if isinstance(num_scheduler_steps, bool) or not isinstance(num_scheduler_steps, int) or not (
            1 <= num_scheduler_steps <= MAX_SCHEDULER_STEPS
        ):
            raise ValueError(
                f"num_scheduler_steps must be an int in [1, {MAX_SCHEDULER_STEPS}], got {num_scheduler_steps!r}"
            )
        self.num_scheduler_steps = num_scheduler_steps
        self.last_commit_tokens = 0  # tokens the last commit() took (a window's several per request)
        self._held_admission_steps = 0  # steps admission waited for a batch (see _admission_due)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.init_new_token_ratio = min(1.0, 0.7 * conservativeness)
        self.min_new_token_ratio = min(1.0, 0.15 * conservativeness)
        self.new_token_ratio = self.init_new_token_ratio
        self.ratio_decay = 0.002
        self.num_retractions = 0
        self.num_held = 0  # admission attempts deferred to share an in-flight prefill (a statistic)
        self._seq = itertools.count()
        self._group_recency: dict[tuple[int, ...], int] = {}  # batch: group key -> last admission
        # Requests still prefilling, for in-flight prefix sharing (only with a prefix cache).
        self._inflight = _InFlight() if prefix_cache is not None else None
        self._num_admitted = 0
        # The last lpm / batch / auto admission order, reused while still exact (`_reuse_order`):
        # a full re-order costs O(waiting) per step, which at ~1000 queued requests dominates.
        self._order: list[Request] | None = None
        self._order_stamp = 0  # prefix cache stamp the order's cached lengths are valid at
        self._order_adds = -1  # self._adds when the order was built
        # Entries of the saved order that left `waiting` since (they stay in the list, skipped by
        # admission, until they are half of it): no O(waiting) filtering at every admission step.
        self._order_gone = 0
        # With more than _POLICY_WINDOW waiting, the order ranks only the first _POLICY_WINDOW (the
        # "ranked" part); admissions pull later arrivals into the window (`_pull_in`).
        self._order_ranked: set[int] | None = None  # ids of the ranked part; None: all ranked
        self._order_ranked_left = 0  # of those, still waiting (they lead `waiting`)
        self._order_floor: int | None = None  # the ranked part's lowest rank key (None: no bound)
        self._adds = 0  # requests that entered `waiting` so far (new or retracted)
        self._waiting_firsts: dict[tuple[int, ...], dict[int, Request]] = {}  # first page -> waiting reqs by id
        self._waiting_groups: dict[tuple[int, ...], dict[int, Request]] = {}  # group key -> waiting reqs by id
        self._last_group: tuple[int, ...] | None = None  # group of the last batch admission
        # batch: the first waiting member of each group with nothing cached and others waiting,
        # as of the last fresh order (`_batch_order`; `_admit_leads` skips the ones gone since).
        self._leads: list[Request] = []
        # batch / auto: the last fresh order's batch groups, in order, with the best cached prefix
        # each was ranked by (`_batch_order`), and where each sits: `_keeps_rank` checks that an
        # admission from another group than the last leaves the order as it was. None: no such order
        # (lpm, or resumed requests ahead of the groups). `_order_head` skips the groups emptied since.
        self._order_groups: list[tuple[int, ...]] | None = None
        self._order_best: dict[tuple[int, ...], int] = {}
        self._order_group_at: dict[tuple[int, ...], int] = {}
        self._order_head = 0

    # --- queue management --------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        if req.output_every_step:  # it streams: each step's token goes out as it comes
            req.window_ok = False
        if req.queue_seq < 0:
            req.queue_seq = next(self._seq)
        self.waiting.append(req)
        self._enqueued(req)

    def abort(self, rid: str) -> Request | None:
        """Finish `rid` with reason abort, releasing its pages; None if unknown or finished."""
        for req in self.waiting:
            if req.rid == rid:
                self._dequeue(req)
                self._release(req, cache_kv=False)
                req.finish(FinishReason("abort", None, "aborted by the caller"))
                return req
        for req in self.running:
            if req.rid == rid:
                self.running.remove(req)
                self._release(req, cache_kv=False)
                req.finish(FinishReason("abort", None, "aborted by the caller"))
                return req
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        retractions = self.num_retractions
        # One pass over the running requests sorts them into decodes and prefills in progress
        # (a loop over every running request each step: sizes by len() rather than through
        # the properties). A request whose token in flight is its last by length (overlap
        # schedule) has nothing left to decode: it finishes when that step is committed.
        decodes: list[Request] = []
        prefilling: list[Request] = []
        for r in self.running:
            n = len(r.token_ids) - 1
            c = r.num_computed
            if c == n:
                if n < r.decode_end - 1:
                    decodes.append(r)
            elif c < n:
                prefilling.append(r)
        if not self.mixed_chunk:
            # Prefill first, alone; decodes run in the steps with nothing to prefill.
            chunks = self._prefill_chunks(self.chunked_prefill_size, retractions, prefilling)
            if chunks:
                return self._batch(chunks)
        # A window only for a decode-only step: with prompts still prefilling the step is mixed.
        steps = self._window_steps(decodes) if self.num_scheduler_steps > 1 and decodes and not prefilling else 1
        decodes, steps = self._ensure_decode_pages(decodes, steps)  # 1 if pages ran short for the window
        if self.mixed_chunk:
            if self.num_retractions != retractions:  # retracted to make room: no longer running
                prefilling = [r for r in prefilling if r.status is RequestStatus.RUNNING]
            prefill = self._prefill_chunks(self.chunked_prefill_size, retractions, prefilling)
            if prefill:
                chunks = [ScheduledChunk(req, req.num_computed, 1, True, False) for req in decodes]
                return self._batch(chunks + prefill, num_decodes=len(chunks))
        if steps > 1 and self.waiting and len(self.running) < self.max_running_requests:
            self._held_admission_steps += steps - 1  # admission's bound counts steps, not schedules
        return self._decode_batch(decodes, steps) if decodes else None

    def _window_steps(self, decodes: list[Request]) -> int:
        """Decode steps for this batch to run back to back from one schedule (num_scheduler_steps),
        or 1. Only a decode-only step is a window, so none admits while waiting requests have a
        slot and pages: a window starts when nothing waits, no slot is free, or admission_batch
        holds the free ones (its extra steps count as held steps), and a slot that frees inside
        it is taken at its end. Every row must be a `window_ok` request: sampling that needs
        nothing from the host between steps, nothing returned but its final result, and room in
        its context for the whole window. A row may finish inside the window (a stop token, or
        its length): the tokens sampled after that are dropped at commit, as a step in flight past
        a request's end is under the overlap schedule. The steps after the first need no host
        work: the device feeds each step's samples to the next (ModelRunner.launch), so the host's
        per-step work is paid once a window."""
        if False in map(_window_ok, decodes):
            return 1
        return self.num_scheduler_steps

    def _prefill_chunks(self, budget: int, retractions: int, prefilling: list[Request]) -> list[ScheduledChunk]:
        """Prefill chunks within `budget` tokens: requests already prefilling (`prefilling`, in
        running order: oldest admission first), then admissions."""
        chunks: list[ScheduledChunk] = []
        for req in prefilling:
            if budget <= 0:
                break
            chunk = self._prefill_chunk(req, budget)
            chunks.append(chunk)
            budget -= chunk.length
        # A step that had to retract is short of memory: admitting now would only invite the
        # next retraction (and could re-admit the request just retracted).
        if budget > 0 and self.waiting and self.num_retractions == retractions and self._admission_due(chunks):
            for req in self._admit(budget):
                chunk = self._prefill_chunk(req, budget)
                chunks.append(chunk)
                budget -= chunk.length
        return chunks

    def _admission_due(self, prefilling: list[ScheduledChunk]) -> bool:
        """Whether this step may admit waiting requests (`admission_batch` > 1 batches them).

        A step that prefills cannot replay a decode CUDA graph, and on a GPU such an eager step
        costs a fixed ~10 ms of kernel launches whatever its size. Admitting each request as soon
        as one slot frees makes one such step per finished request; holding admission until
        `admission_batch` slots are free makes one step (or one chunked run) per batch of them.
        No hold when nothing decodes (idle slots would be wasted), while a prefill runs anyway
        (the step is eager already), when every waiting request fits in the free slots (the end
        of a job, or a light load: no latency added), or after `admission_batch` held steps
        (a bound on the added latency).
        """
        n = self.admission_batch
        free = self.max_running_requests - len(self.running)
        if n <= 1 or not self.running or prefilling or free >= n or free >= len(self.waiting):
            self._held_admission_steps = 0
            return True
        if free <= 0:
            return False  # nothing could be admitted anyway; not a held step
        self._held_admission_steps += 1
        if self._held_admission_steps > n:
            self._held_admission_steps = 0
            return True
        return False

    def _batch(self, chunks: list[ScheduledChunk], num_decodes: int = 0) -> ScheduledBatch:
        self._decay_new_token_ratio()
        self._advance(chunks)
        return ScheduledBatch(chunks, num_decodes=num_decodes)

    def _decay_new_token_ratio(self) -> None:
        """Each scheduled step lowers the decode-growth estimate admission reserves for (a
        retraction raises it again: `_retract`)."""
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.ratio_decay)

    def _decode_batch(self, decodes: list[Request], steps: int = 1) -> ScheduledBatch:
        """A step of decodes alone, as columns (see ScheduledBatch); `_advance` for each row inline.
        steps > 1: a decode window, each row `steps` tokens further (as many placeholders)."""
        self._decay_new_token_ratio()
        starts: list[int] = []
        placeholders = [PLACEHOLDER] * steps
        for req in decodes:
            start = req.num_computed
            starts.append(start)
            req.num_computed = start + steps
            req.token_ids.extend(placeholders)
        return ScheduledBatch(decode_reqs=decodes, decode_starts=starts, num_steps=steps)

    def _advance(self, chunks: list[ScheduledChunk]) -> None:
        """Move the requests past the step just scheduled, before it runs.

        The step's tokens count as computed (their K/V is written by the step, and every later
        step runs after it on the device), and a sampling chunk appends a placeholder for its
        token, filled in by `commit`. So the next step can be scheduled while this one is still
        in flight (overlap schedule).
        """
        for chunk in chunks:
            chunk.req.num_computed = chunk.start + chunk.length
            if chunk.samples:
                chunk.req.token_ids.append(PLACEHOLDER)

    def overlap_safe(self) -> bool:
        """Whether the next step may be scheduled before the step in flight is committed.

        Only a retraction would need that step's token on the host first (a retracted request
        re-queues its tokens); each decode takes at most one new page a step, so with as many
        pages free (or evictable) as requests running, none can happen.
        """
        return self.allocator.num_free + self._evictable() >= len(self.running)

    def commit(self, batch: ScheduledBatch, next_tokens: list[int | None]) -> list[Request]:
        """Fill in a step's sampled tokens; returns the requests that got one (finished ones included).
        A decode window's tokens come step by step ([step][row]); each request is returned once."""
        if batch.decode_reqs is not None:
            reqs, starts = batch.decode_reqs, batch.decode_starts
            updated = self._commit_decodes(reqs, starts, next_tokens)
            taken = len(updated)
            n = len(reqs)
            for k in range(1, batch.num_steps):
                # A request finished at an earlier step of the window is skipped (not running).
                later = [s + k for s in starts]
                taken += len(self._commit_decodes(reqs, later, next_tokens[k * n : (k + 1) * n]))
            self.last_commit_tokens = taken
            return updated
        chunks, k = batch.chunks, batch.num_decodes
        updated: list[Request] = []
        if k:  # a mixed step's decodes, as a decode step's (~1.7 -> ~0.4 us a row on a 2-core CPU)
            decodes = chunks[:k]
            updated = self._commit_decodes([c.req for c in decodes], [c.start for c in decodes], next_tokens[:k])
            chunks, next_tokens = chunks[k:], next_tokens[k:]
        running, inflight = RequestStatus.RUNNING, self._inflight
        for chunk, token in zip(chunks, next_tokens):
            req = chunk.req
            if req.status is not running:  # finished or aborted while the step ran
                continue
            if chunk.samples:
                # Prefill done. Only a prefill chunk can end one: a request is in the in-flight
                # set from admission until its first sampling chunk (a prefill) is committed,
                # or until it is released, so for a decode this would be a no-op.
                if inflight is not None and chunk.prefill:
                    inflight.remove(req)
                assert token is not None
                done = self._take_token(req, chunk.start + chunk.length, token)
                updated.append(req)
                if done:
                    continue
            if chunk.prefill:
                # The prefix cache takes the computed whole pages once the step has run (with the
                # overlap schedule num_computed may count a later step's chunk too: that one runs
                # before any step that could read the pages, so they are as good as computed).
                self._share_computed(req)
        self.last_commit_tokens = len(updated)
        return updated

    def _commit_decodes(self, reqs: list[Request], starts: list[int], tokens: list[int]) -> list[Request]:
        """commit() for a decode-only step. A request that cannot stop on this token by anything
        but a stop token or its length (Request.plain_commit) takes the token inline: no method
        call, no re-derived sizes; a stop token, its last token by length, or anything else goes
        through Request.fill_token."""
        updated: list[Request] = []
        running = RequestStatus.RUNNING
        for req, start, token in zip(reqs, starts, tokens):
            if req.status is not running:  # finished or aborted while the step ran
                continue
            position = start + 1
            if (
                req.plain_commit and position + 1 < req.decode_end and token not in req.stop_tokens
                and req.first_token_time is not None
            ):
                req.output_ids.append(token)
                req.token_ids[position] = token
                deferred = req.deferred_ids
                if deferred is not None:
                    deferred.append(token)
                updated.append(req)
                continue
            self._take_token(req, position, token)
            updated.append(req)
        return updated

    def _take_token(self, req: Request, position: int, token: int) -> bool:
        """Request.fill_token, then release the request if that finished it (True then)."""
        req.fill_token(position, token)
        if req.status is not RequestStatus.FINISHED:
            return False
        self.running.remove(req)
        self._release(req, cache_kv=True)
        return True

    # --- admission -----------------------------------------------------------------
    def _admit(self, budget: int) -> list[Request]:
        if len(self.running) >= self.max_running_requests:
            return []
        reserved = self._reserved_pages()
        if self.allocator.num_free + self._evictable() - reserved < 1:
            return []  # every admission needs a page for at least its last prompt token
        cached: dict[int, int] = {}  # id(req) -> cached prefix length, probed once per step
        order = self._ordered_waiting(cached)
        admitted, budget, reserved = self._admit_leads(budget, reserved, cached)
        deferred: list[Request] = []  # batch: would need chunking; gets what budget is left
        misses = held = 0
        waiting = RequestStatus.WAITING
        for req in order:
            if budget <= 0 or len(self.running) >= self.max_running_requests:
                break
            if req.status is not waiting:
                continue  # left `waiting` after the saved order was made (_reuse_order)
            if self._held(req, cached):
                self.num_held += 1
                held += 1
                # Skipping held requests to find others is bounded like the policy's ranking:
                # a held request costs no budget, so with a whole queue held behind a few
                # groups' first prefills this walked all of it (a 30,000-prompt job sharing 8
                # system prompts: 30,000 checks, 115 ms, in its first admitting step).
                if held >= _POLICY_WINDOW:
                    break
                continue
            packed = self._is_batch_job(req)
            if packed and not req.num_retractions and req.num_tokens - self._cached_len(req, cached) > budget:
                deferred.append(req)
                # Looking for a prompt small enough for the budget left: at most as far as the
                # memory lookahead, not the whole queue (an O(waiting) scan every admission step).
                if len(deferred) > _PACK_LOOKAHEAD:
                    break
                continue
            ok, reserved = self._try_admit(req, reserved)
            if not ok:
                # fcfs / lpm: head-of-line, so arrival order stays fair and long prompts are not
                # starved. batch: look past it for requests that fit, but never past a retracted
                # request (it must resume before newer work takes its memory again).
                misses += 1
                if not packed or req.num_retractions or misses > _PACK_LOOKAHEAD:
                    break
                continue
            admitted.append(req)
            budget -= min(budget, req.num_tokens - req.num_computed)
        for req in deferred:
            if budget <= 0 or len(self.running) >= self.max_running_requests:
                break
            ok, reserved = self._try_admit(req, reserved)
            if not ok:
                break
            admitted.append(req)
            budget -= min(budget, req.num_tokens - req.num_computed)
        return admitted

    def _admit_leads(self, budget: int, reserved: int, cached: dict[int, int]) -> tuple[list[Request], int, int]:
        """batch: admit the first members of groups with nothing cached (`_leads`) ahead of the
        order, within 1/_LEAD_BUDGET_SHARE of the step's budget; (admitted, budget, reserved) left.

        The order puts groups with a cached prefix first, so a group whose prefix nobody has
        computed yet waits until every cached group's members are in; its own members then wait
        a step more for its first member's prefill to land in the tree (in-flight sharing), and
        the job ends its admission with a step of a few stragglers beside the whole decode batch.
        Started early, each such prefix is cached by the time its group's turn comes. Bounded by
        a share of the budget, so the cached groups keep most of each step, and new prefixes take
        pages from the pool (or from the tree's least recently used) a few at a time.
        Shared-prefix workload (32 groups of 32): the last two groups' first members came in the
        seventh admission step, their 62 siblings in an eighth; with this, all 1,024 are in
        after seven.
        """
        admitted: list[Request] = []
        if not self._leads:
            return admitted, budget, reserved
        allowance = budget // _LEAD_BUDGET_SHARE
        waiting = RequestStatus.WAITING
        for req in self._leads:
            if len(self.running) >= self.max_running_requests:
                break
            if req.status is not waiting or req.num_retractions or self._held(req, cached):
                continue
            if req.num_tokens - self._cached_len(req, cached) > allowance:
                continue  # more than the share left: it keeps its place in the order
            ok, reserved = self._try_admit(req, reserved)
            if not ok:
                break  # memory: the order decides what else fits
            admitted.append(req)
            spent = min(budget, req.num_tokens - req.num_computed)
            budget -= spent
            allowance -= spent
        return admitted, budget, reserved

    def _try_admit(self, req: Request, reserved: int) -> tuple[bool, int]:
        """Admit req if memory allows (its pages allocated, its match locked); (admitted, reserved)."""
        matched_pages, matched_tokens, node = self._match(req)
        # Lock the match before anything can evict: the allocation below may evict.
        if node is not None:
            self.prefix_cache.lock(node)
        new = self._pages_for(req.num_tokens) - len(matched_pages)
        reserve = self._reserve_pages(req)
        need = new + reserve
        available = self.allocator.num_free + self._evictable() - reserved
        new_pages = self._alloc(new) if need <= available else None
        if new_pages is None:
            if node is not None:
                self.prefix_cache.unlock(node)
            return False, reserved
        req.prefix_node = node
        req.pages = list(matched_pages) + new_pages
        req.pages_version += 1
        req.num_shared_pages = len(matched_pages)
        req.num_computed = matched_tokens
        if req.num_retractions == 0:
            req.cached_tokens = matched_tokens
        req.status = RequestStatus.RUNNING
        self._dequeue(req, admitted=True)
        self.running.append(req)
        if self._inflight is not None:
            self._inflight.add(req)  # its prefill is in flight until its sampling chunk lands
        self._num_admitted += 1
        if self._is_batch_job(req):
            if len(self._group_recency) > 4 * _POLICY_WINDOW:
                self._group_recency.clear()  # bounded; only the recent groups matter
                self._order = None  # the order of the groups still waiting may change
            self._group_recency[self._group_key(req)] = self._num_admitted
            self._last_group = self._group_key(req)
        # _future_pages(req) now: its pages are exactly _pages_for(num_tokens), so that is `reserve`.
        return True, reserved + reserve

    def prefix_cache_flushed(self) -> None:
        """The prefix cache was emptied (an idle engine's flush_cache): no group's prefix is hot
        any more, so the batch order's group recency goes too. Kept, it would rank a resubmitted
        prompt's group by an admission from before the flush, and (being a rank above the
        window's floor) stop every admission from keeping the order (`_pull_in`)."""
        self._group_recency.clear()
        self._last_group = None
        self._order = None

    # --- waiting-queue bookkeeping (for _reuse_order) ---------------------------------------
    def _enqueued(self, req: Request) -> None:
        self._adds += 1
        self._waiting_firsts.setdefault(tuple(req.token_ids[: self.page_size]), {})[id(req)] = req
        self._waiting_groups.setdefault(self._group_key(req), {})[id(req)] = req

    def _dequeue(self, req: Request, admitted: bool = False) -> None:
        """Remove req from `waiting`. Removing the last waiting member of a batch group leaves the
        order of the rest as it was; removing one of several may move its group (best cached
        prefix, first arrival, recency), so the saved order is dropped unless `_keeps_rank`."""
        self.waiting.remove(req)
        self._order_gone += 1  # (meaningful only while an order is saved: reset with each one)
        ranked = self._order_ranked
        if ranked is not None and id(req) in ranked:
            ranked.discard(id(req))  # ids are reused once a request is gone
            self._order_ranked_left -= 1
        first = tuple(req.token_ids[: self.page_size])
        members = self._waiting_firsts[first]
        del members[id(req)]
        if not members:
            del self._waiting_firsts[first]
        key = self._group_key(req)
        group = self._waiting_groups[key]
        del group[id(req)]
        if not group:
            del self._waiting_groups[key]
        elif self._order is not None and self.schedule_policy != "lpm" and not (
            admitted and self._keeps_rank(req, key, group)
        ):
            self._order = None  # lpm's stable sort by cached prefix has no groups: never reorders

    def _keeps_rank(self, req: Request, key: tuple[int, ...], rest: dict[int, Request]) -> bool:
        """Whether admitting req leaves its group's rank (and so the whole order) as it was.

        True for a single submission under "auto" (ranked by arrival alone). For a batch job, the
        group's best cached prefix must stay as it was: a member left behind has as long a cached
        prefix. Cached lengths are the memos the order was ranked by (see `_reuse_order`), so only
        the members the order ranked count: with more than _POLICY_WINDOW waiting, those in its
        window (`_order_ranked`). A group's members are kept in arrival order, as the window is
        taken, so its ranked ones come first and the search stops at the first unranked one (a
        retracted member, ranked at the queue's front but re-added at the group's end, is not
        looked for: False only costs a fresh order). It walked every waiting member of the group
        before: with 8 groups of ~3,700 waiting requests, ~3,600 unranked ones at each admission
        once the window's were in (57 us an admission).

        And the admission gives the group the newest recency (a recency is unique, so first arrival
        never breaks its ties): nothing moves if the group had the last batch admission already, or
        if no group ranked ahead of it with waiting members has the same best cached prefix (it
        would now rank behind): `_leads_its_tier`. Without that second case a step's admissions
        moving on to the next group dropped the order, to be rebuilt in the next step
        (shared-prefix workload, emulated device: 8 fresh orders a run, now 6, the rest real
        reorders: a group's prefix landing, a lead admitted ahead of groups held behind theirs).
        """
        if not self._is_batch_job(req):
            return True
        mine = req.prefix_probe[2] if req.prefix_probe is not None else 0
        ranked = self._order_ranked  # None: the order ranked every waiting request
        for r in rest.values():
            if ranked is not None and id(r) not in ranked:
                return False
            if not self._is_batch_job(r):
                continue  # an "auto" single submission: ranked apart from the group (first)
            if (r.prefix_probe[2] if r.prefix_probe is not None else 0) >= mine:
                return self._last_group == key or self._leads_its_tier(key)
        return False

    def _leads_its_tier(self, key: tuple[int, ...]) -> bool:
        """Whether no batch group ranked ahead of `key` in the saved order, with members still
        waiting, has key's best cached prefix (see `_keeps_rank`). The groups ahead are usually
        all admitted already (`_order_head` has moved past them): a look or two."""
        groups = self._order_groups
        at = self._order_group_at.get(key) if groups is not None else None
        if at is None:
            return False  # no group order (a pulled-in request is alone in its group: never asked)
        waiting = self._waiting_groups
        head = self._order_head
        while head < at and groups[head] not in waiting:
            head += 1
        self._order_head = head  # groups never refill while the order is kept (`_order_adds`)
        if at - head > _PACK_LOOKAHEAD:
            return False  # many groups still waiting ahead (held): not worth the walk
        best, tier = self._order_best, self._order_best[key]
        for k in itertools.islice(groups, head, at):
            if best[k] == tier and k in waiting:
                return False
        return True

    def _reuse_order(self) -> list[Request] | None:
        """The saved admission order minus the requests that left `waiting`, when it is exactly
        what a fresh ordering would give: no request entered `waiting` since (`_adds`), no
        removal could move a group (`_dequeue`), and no waiting request's cached prefix changed:
        the tree was not reset, and the waiting requests under a first page it changed under
        (the only ones whose match can have changed: `changed_under_since`) re-probe to the
        lengths the order used. Those are their memos: building the order probed every request
        it ranks, and each successful check re-probes the ones it looks at. With more than
        _POLICY_WINDOW waiting, the requests that admissions brought into the window must also
        rank at its end (`_pull_in`)."""
        order = self._order
        if order is None or self._order_adds != self._adds:
            self._order = None
            return None
        cache = self.prefix_cache
        if cache is not None:
            changed = cache.changed_under_since(self._order_stamp)
            if changed is None:
                self._order = None
                return None
            firsts = self._waiting_firsts
            for first in set(changed):
                for r in firsts.get(first, {}).values():
                    before = r.prefix_probe[2] if r.prefix_probe is not None else 0
                    if self._probe(r) != before:
                        # The probe just refreshed r's memo: the order must go, or a second
                        # check would compare against the new value and accept it.
                        self._order = None
                        return None
            self._order_stamp = cache.stamp()  # verified up to now: the next check scans less
        if self._order_ranked is not None and not self._pull_in():
            self._order = None
            return None
        if len(order) - self._order_gone != len(self.waiting):  # belt and braces: `waiting` changed behind us
            self._order = None
            return None
        if self._order_gone > len(order) // 2:
            waiting = RequestStatus.WAITING
            order = self._order = [r for r in order if r.status is waiting]
            self._order_gone = 0
        return order  # may hold requests that left `waiting`: _admit skips them

    def _is_batch_job(self, req: Request) -> bool:
        """Whether req is scheduled as a batch job: look past it when it does not fit, pack it."""
        return self.schedule_policy == "batch" or (self.schedule_policy == "auto" and req.batch_job)

    def _ordered_waiting(self, cached: dict[int, int]) -> list[Request]:
        """Waiting requests in the order admission tries them (see the module docstring); a
        reused order may also hold requests that have left `waiting` (skip them). Not a copy:
        iterate it, do not change it.

        Retracted requests sit at the front of `waiting`, oldest first (`_retract` keeps them
        so); every policy tries them first.
        """
        policy = self.schedule_policy
        if policy == "fcfs" or (policy == "lpm" and self.prefix_cache is None):
            return list(self.waiting)
        reused = self._reuse_order()
        if reused is not None:
            return reused  # with its `_leads`
        if policy == "auto" and not any(r.batch_job for r in self.waiting):
            self._leads = []
            return list(self.waiting)
        stamp = self.prefix_cache.stamp() if self.prefix_cache is not None else 0
        order = self._fresh_order(cached)
        self._order, self._order_stamp, self._order_adds = order, stamp, self._adds  # never changed in place
        self._order_gone = 0
        self._order_ranked = None
        if len(self.waiting) > _POLICY_WINDOW:
            ranked = order[:_POLICY_WINDOW]
            self._order_ranked = {id(r) for r in ranked}
            self._order_ranked_left = len(ranked)
            self._order_floor = self._rank_floor(ranked, cached)
        return order

    def _rank_key(self, req: Request, cached: int) -> int:
        """Where req would rank as the only waiting member of its group: lpm ranks by cached
        prefix; batch (and auto's batch jobs) by its group's best cached prefix, then recency
        (`_batch_order`'s key)."""
        if self.schedule_policy == "lpm":
            return cached
        return _group_rank(cached, self._group_recency.get(self._group_key(req), -1))

    def _rank_floor(self, ranked: list[Request], cached: dict[int, int]) -> int | None:
        """The lowest rank key in a freshly ranked window: its last request's (lpm), or its last
        group's (batch / auto: the best cached prefix of the group's members in the window).
        None when the ranked part has nothing a later arrival must rank behind."""
        policy = self.schedule_policy
        tail = [r for r in ranked if not r.num_retractions and (policy != "auto" or r.batch_job)]
        if not tail:
            return None
        last = tail[-1]
        if policy == "lpm":
            return cached[id(last)]
        key = self._group_key(last)
        best = 0
        for r in reversed(tail):
            if self._group_key(r) != key:
                break
            best = max(best, cached.get(id(r), 0))
        return self._rank_key(last, best)

    def _pull_in(self) -> bool:
        """Admissions left room in the policy window: the waiting requests that now enter it
        (the earliest arrivals behind the ranked part) must rank exactly where the saved order
        has them, at the window's end in arrival order. That holds when each is a batch job
        (under auto) alone in its group (batch / auto), and their rank keys do not rise from
        the window's lowest on. Then they join the ranked part; otherwise the order must go."""
        waiting = self.waiting
        end = min(_POLICY_WINDOW, len(waiting))
        start = self._order_ranked_left
        if start >= end:
            return True
        policy = self.schedule_policy
        floor = self._order_floor
        ranked = self._order_ranked
        for r in itertools.islice(waiting, start, end):
            if policy != "lpm":
                if policy == "auto" and not r.batch_job:
                    return False
                if len(self._waiting_groups[self._group_key(r)]) != 1:
                    return False
            key = self._rank_key(r, self._probe(r))
            if floor is not None and key > floor:
                return False
            floor = key
            ranked.add(id(r))
        self._order_floor = floor
        self._order_ranked_left = end
        return True

    def _fresh_order(self, cached: dict[int, int]) -> list[Request]:
        policy = self.schedule_policy
        head = list(itertools.islice(self.waiting, _POLICY_WINDOW))
        k = 0
        while k < len(head) and head[k].num_retractions:
            k += 1
        resumed, window = head[:k], head[k:]
        self._leads = []
        self._order_groups = None
        if policy == "lpm":
            for r in window:
                self._cached_len(r, cached)
            # sort() is stable: equal cached prefixes keep arrival order.
            window.sort(key=lambda r: -cached[id(r)])
        elif policy == "batch":
            window = self._batch_order(window, cached)
        else:  # auto: single submissions first, in arrival order, then the batch jobs
            singles = [r for r in window if not r.batch_job]
            window = singles + self._batch_order([r for r in window if r.batch_job], cached)
            if singles:
                self._leads = []  # nothing goes before single submissions
        if resumed:
            self._leads = []  # nor before resumed (retracted) requests
            self._order_groups = None  # and a group's resumed members rank outside its place
        # Then the rest in arrival order, put straight in (a job's deep queue: ~20,000 requests
        # copied once, not three times, at every order made).
        order = resumed + window
        order.extend(itertools.islice(self.waiting, _POLICY_WINDOW, None))
        return order

    def _batch_order(self, reqs: list[Request], cached: dict[int, int]) -> list[Request]:
        """The "batch" policy's order: groups of shared leading tokens, most cached first."""
        groups: dict[tuple[int, ...], list[Request]] = {}
        best: dict[tuple[int, ...], int] = {}  # group -> its longest cached prefix
        for r in reqs:  # the per-step loop over the waiting queue: inlined memo lookups
            c = cached.get(id(r))
            if c is None:
                c = cached[id(r)] = self._probe(r)
            key = r.group_key or self._group_key(r)
            g = groups.get(key)
            if g is None:
                groups[key] = [r]
                best[key] = c
            else:
                g.append(r)
                if c > best[key]:
                    best[key] = c
        recent = self._group_recency
        # Longest cached prefix first; among equals, the group admitted from most recently
        # (finish the group in progress while its prefix is hot), then first arrival (dicts
        # keep insertion order and sorted() is stable).
        # One int key (best, then recency) and a reverse sort, which Python keeps stable.
        ordered = sorted(groups, key=lambda k: _group_rank(best[k], recent.get(k, -1)), reverse=True)
        out: list[Request] = []
        leads: list[Request] = []
        for key in ordered:
            g = groups[key]
            if len(g) > 1:
                g.sort(key=lambda r: -cached[id(r)])
                if best[key] == 0:
                    leads.append(g[0])
            out.extend(g)
        self._leads = leads
        self._order_groups, self._order_best, self._order_head = ordered, best, 0
        self._order_group_at = {k: i for i, k in enumerate(ordered)}
        return out

    def _cached_len(self, req: Request, memo: dict[int, int]) -> int:
        """Tokens of req's prefix in the tree (whole pages; a side-effect-free probe), memoized."""
        n = memo.get(id(req))
        if n is None:
            n = memo[id(req)] = self._probe(req)
        return n

    def _probe(self, req: Request) -> int:
        """match_len of req's cacheable prefix, re-probed only when the tree changed where the last
        probe's match ended (`RadixCache.probe_holds`): most waiting requests cost a few attribute
        reads and a dict lookup. The memo's `where` also lets `_match` admit without a new walk."""
        cache = self.prefix_cache
        if cache is None:
            return 0
        limit = req.max_prefix_len
        if limit < self.page_size:
            return 0  # no whole page to match
        probe = req.prefix_probe
        if probe is not None and probe[0] == limit and cache.probe_holds(probe[3], probe[1]):
            return probe[2]
        stamp = cache.stamp()
        n, where = cache.probe(req.token_ids, limit, split=True)
        req.prefix_probe = (limit, where, n, stamp)
        return n

    def _group_key(self, req: Request) -> tuple[int, ...]:
        """batch: the request's group, its first _GROUP_KEY_TOKENS tokens (memoized once that many exist)."""
        key = req.group_key
        if key is None:
            key = tuple(req.token_ids[:_GROUP_KEY_TOKENS])
            if len(key) == _GROUP_KEY_TOKENS:
                req.group_key = key
        return key

    def _held(self, req: Request, cached: dict[int, int]) -> bool:
        """Whether req should wait for an in-flight prefill of its uncached prefix to land in the tree.

        It waits when the prefill in flight covers at least _HOLD_MIN_TOKENS of what req would
        compute from whole pages, or all of it (the samples of one short prompt).
        """
        if self._inflight is None or not self._inflight.members or req.num_retractions:
            return False  # a resumed request goes first; at worst a few pages are computed twice
        ps, ids, limit = self.page_size, req.token_ids, req.max_prefix_len
        # In page-floored tokens: shared = inflight.shared(ids, limit) // ps * ps, in_flight = shared
        # - cached, own = limit // ps * ps - cached; held iff in_flight > 0 and in_flight >=
        # min(_HOLD_MIN_TOKENS, own), i.e. iff shared >= target, the first page boundary at or past
        # cached + max(1, min(_HOLD_MIN_TOKENS, own)): whether the in-flight trie covers
        # ids[:target] (`_InFlight.covers`, cheaper than finding `shared` itself). As before, no
        # probe of the prefix cache unless shared > 0 (the trie covers the first page).
        if limit < ps or not self._inflight.covers(ids, ps):
            return False
        cached_len = self._cached_len(req, cached)
        own = limit // ps * ps - cached_len
        target = -(-(cached_len + max(1, min(_HOLD_MIN_TOKENS, own))) // ps) * ps
        return target <= limit and self._inflight.covers(ids, target)

    def _match(self, req: Request) -> tuple[list[int], int, Any]:
        if self.prefix_cache is None:
            return [], 0, None
        # Leave at least one token to compute (its logits sample the next token), and every
        # position whose logprobs or hidden states the request still has to return.
        limit, probe = req.max_prefix_len, req.prefix_probe
        if probe is not None and probe[0] == limit and self.prefix_cache.probe_holds(probe[3], probe[1]):
            # Ordering the queue probed it this step (usually): no comparing its tokens again.
            result = self.prefix_cache.match_probed(probe[2], probe[1])
        else:
            result = self.prefix_cache.match_prefix(req.token_ids, limit)
        return list(result.pages), result.num_tokens, result.node

    def _prefill_chunk(self, req: Request, budget: int) -> ScheduledChunk:
        remaining = req.num_tokens - req.num_computed
        length = min(remaining, budget)
        return ScheduledChunk(req, req.num_computed, length, samples=length == remaining)

    # --- memory ----------------------------------------------------------------------
    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _reserve_pages(self, req: Request) -> int:
        future = min(req.remaining_new_tokens, _RESERVE_CLIP_TOKENS) * self.new_token_ratio
        return self._pages_for(req.num_tokens + int(future)) - self._pages_for(req.num_tokens)

    def _future_pages(self, req: Request) -> int:
        """Pages a running request is expected to still allocate."""
        future = min(req.remaining_new_tokens, _RESERVE_CLIP_TOKENS) * self.new_token_ratio
        return max(0, self._pages_for(req.num_tokens + int(future)) - len(req.pages))

    def _reserved_pages(self) -> int:
        """sum(_future_pages(r) for r in running), inlined: it runs over every running request at
        each admission attempt."""
        ratio, ps, clip = self.new_token_ratio, self.page_size, _RESERVE_CLIP_TOKENS
        total = 0
        for r in self.running:
            n = len(r.token_ids)
            remaining = min(r.params.max_new_tokens - len(r.output_ids), r.context_length - n)
            if remaining < 0:
                remaining = 0
            need = -(-(n + int(min(remaining, clip) * ratio)) // ps) - len(r.pages)
            if need > 0:
                total += need
        return total

    def _evictable(self) -> int:
        return self.prefix_cache.evictable_pages if self.prefix_cache is not None else 0

    def _alloc(self, n: int) -> list[int] | None:
        pages = self.allocator.alloc(n)
        if pages is None and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def _ensure_decode_pages(self, decodes: list[Request], steps: int = 1) -> tuple[list[Request], int]:
        """Give each decode room for its next token (its next `steps` tokens: a window),
        retracting requests when pages run out; (decodes, steps they have room for). A window
        whose pages the free ones (after evicting) do not cover gets none of them: the rows get
        room for one token, as for a single step, and steps is 1."""
        # Oldest first: the victims (newest first) are then always newer than the request being
        # served, so no request already given its page this step is retracted afterwards.
        decodes = sorted(decodes, key=_by_age)
        # The common case: the free pages (after evicting from the prefix cache if needed) cover
        # every decode that needs one (at page size 1, all of them), so nothing is retracted.
        # One allocation then hands out the same pages, in the same order, as
        # _decode_pages_one_by_one would from the same free list.
        ps = self.page_size
        if steps > 1:
            # Pages each row lacks for positions up to num_computed + steps - 1.
            last = steps - 1
            wants = [(r.num_computed + last) // ps + 1 - len(r.pages) for r in decodes]
            total = sum(w for w in wants if w > 0)
            short = total - self.allocator.num_free
            if short > 0 and self.prefix_cache is not None and self._evictable() >= short:
                self.prefix_cache.evict(short)
            if total <= self.allocator.num_free:
                pages = self.allocator.alloc(total) if total else []
                i = 0
                for req, w in zip(decodes, wants):
                    if w > 0:
                        req.pages.extend(pages[i : i + w])
                        i += w
                return decodes, steps
        needy = [r for r in decodes if r.num_computed // ps >= len(r.pages)]  # no room for the next token
        short = len(needy) - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None and self._evictable() >= short:
            # A full pool (the prefix cache holds the rest): one eviction for the whole step, and
            # as much again for the next, instead of one eviction per decode (at page size 1 with
            # 256 decodes, 256 evictions a step: ~1 ms of host time a step on a 2-core CPU, most
            # of schedule() in a file job with a stub device). The extra pages are the least
            # recently used, which the next steps would evict anyway.
            self.prefix_cache.evict(short + len(needy))
        if len(needy) <= self.allocator.num_free:
            for req, page in zip(needy, self.allocator.alloc(len(needy))):
                req.pages.append(page)
            return decodes, 1
        return self._decode_pages_one_by_one(decodes), 1

    def _decode_pages_one_by_one(self, decodes: list[Request]) -> list[Request]:
        """_ensure_decode_pages when pages may run out: page by page, oldest request first,
        evicting from the prefix cache and then retracting newer requests where needed."""
        ready: list[Request] = []
        for req in decodes:
            if req.status is not RequestStatus.RUNNING:
                continue  # retracted below to make room for an older request
            if self._pages_for(req.num_computed + 1) <= len(req.pages):
                ready.append(req)
                continue
            page = self._alloc(1)
            while page is None:
                victim = self._pick_retraction()
                if victim is None or (victim is req and len(self.running) == 1):
                    break
                self._retract(victim)
                if victim is req:
                    break
                page = self._alloc(1)
            if req.status is not RequestStatus.RUNNING:
                continue  # it was the newest: it yielded to the older ones
            if page is None:
                # Alone and still no page: the pool cannot hold this sequence any longer.
                self.running.remove(req)
                self._release(req, cache_kv=True)
                req.finish(FinishReason("length", None, "KV cache capacity reached"))
                continue
            req.pages.extend(page)
            ready.append(req)
        return [r for r in ready if r.status is RequestStatus.RUNNING]

    def _pick_retraction(self) -> Request | None:
        # Retract the newest request (last submitted; a resumed request keeps its age):
        # - it has made the least progress, so the least work is lost (and its computed KV
        #   mostly survives in the prefix cache anyway);
        # - the older requests it yields to are nearer their end and free their pages soonest;
        # - the oldest running request is never a victim, so it always makes progress: no
        #   livelock where requests retract each other forever.
        if not self.running:
            return None
        return max(self.running, key=lambda r: r.queue_seq)

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req, cache_kv=True)
        req.num_computed = 0
        req.num_retractions += 1
        req.status = RequestStatus.WAITING
        # Front of the queue, after retracted requests older than it: they resume oldest first.
        i = 0
        while i < len(self.waiting) and self.waiting[i].num_retractions and self.waiting[i].queue_seq < req.queue_seq:
            i += 1
        self.waiting.insert(i, req)
        self._enqueued(req)
        self.num_retractions += 1
        # Admission under-estimated decode growth: reserve more from now on.
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.debug("retracted %s at %d tokens", req.rid, req.num_tokens)

    def _share_computed(self, req: Request) -> None:
        """Hand the request's computed whole pages to the prefix cache right after a prefill chunk.

        The tree takes the pages it lacks; where it already had a page (another request inserted
        the same tokens meanwhile) the request switches to the tree's page and frees its own.
        The request then reads all of pages[:full] as shared pages under a lock on the node
        spelling them, which replaces its previous lock.
        """
        if self.prefix_cache is None:
            return
        full = min(_known_computed(req) // self.page_size, len(req.pages))
        if full <= req.num_shared_pages:
            return
        # From the locked node of the shared pages: no comparing their tokens again.
        mine = req.pages[:full]
        result = self.prefix_cache.insert(
            req.token_ids, mine, req.prefix_node, req.num_shared_pages, key_len=full * self.page_size
        )
        self.prefix_cache.lock(result.node)  # before the unlock: the shared part stays pinned
        if req.prefix_node is not None:
            self.prefix_cache.unlock(req.prefix_node)
        req.prefix_node = result.node
        if result.pages != mine:  # some were duplicates: the request reads the tree's copies now
            req.pages[:full] = result.pages
            # A page list changed other than by appending: the page tables rewrite its row.
            # Usually nothing changed (the tree took the request's own pages), and the bump
            # made the next step rewrite every row just prefilled (~70 pages each in the
            # shared-prefix workload, three ints a page in the device table's update).
            req.pages_version += 1
        req.num_shared_pages = full
        # Duplicates were the request's own pages (never the tree's): no one else has them.
        self.allocator.free(result.duplicate_pages)

    def _release(self, req: Request, cache_kv: bool) -> None:
        """Return a request's pages: whole computed pages to the prefix cache, the rest freed.

        The first `num_shared_pages` pages belong to the tree and are never freed here.
        """
        if self._inflight is not None:
            self._inflight.remove(req)
        pages, req.pages = req.pages, []
        req.pages_version += 1
        shared, req.num_shared_pages = req.num_shared_pages, 0
        node, req.prefix_node = req.prefix_node, None
        if self.prefix_cache is not None and node is not None:
            self.prefix_cache.unlock(node)
        if self.prefix_cache is None or not cache_kv:
            self.allocator.free(pages[shared:])
            return
        full = max(shared, min(_known_computed(req) // self.page_size, len(pages)))
        # From the node just unlocked (nothing can have evicted it yet): see _share_computed.
        result = self.prefix_cache.insert(req.token_ids, pages[:full], node, shared, key_len=full * self.page_size)
        # insert never reports the tree's own pages (pages[:shared]) as duplicates.
        self.allocator.free(result.duplicate_pages + pages[full:])
