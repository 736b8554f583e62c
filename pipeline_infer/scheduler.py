"""Scheduler: which tokens run in the next step. Pure Python: it never touches torch.

Each step mixes the decodes of every running request with prefill chunks (of requests
already running, then of newly admitted ones) bounded by `chunked_prefill_size` tokens.

Memory policy:
- A request is admitted only when free pages (plus pages the prefix cache could evict)
  cover its uncached prompt plus a decode reserve, after the reserves of the running
  requests are set aside. The reserve is `new_token_ratio` times the tokens a request may
  still generate; the ratio decays while memory suffices and jumps after a retraction, so
  retraction stays rare without leaving the pool idle.
- When a decode still finds no free page, the scheduler retracts running requests (their
  KV goes to the prefix cache where there is one) and re-queues them at the front: they
  resume later by recomputing (or re-matching) their tokens, so nothing is lost or repeated.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline_infer.cache.kv_pool import PageAllocator
from pipeline_infer.request import FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)

# Reserve decode room for at most this many future tokens per request: beyond it the
# estimate is noise, and a huge max_new_tokens must not block admission on its own.
_RESERVE_CLIP_TOKENS = 4096


class PrefixCache(Protocol):
    """What the scheduler needs from cache/radix.py (kept abstract so it stays testable)."""

    def match_prefix(self, token_ids: list[int]) -> Any: ...
    def insert(self, token_ids: list[int], pages: list[int]) -> Any: ...
    def lock(self, node: Any) -> None: ...
    def unlock(self, node: Any) -> None: ...
    def evict(self, num_pages: int) -> int: ...
    @property
    def evictable_pages(self) -> int: ...


@dataclass
class ScheduledChunk:
    req: Request
    start: int  # tokens of req already in the KV cache (the chunk's prefix length)
    length: int  # tokens fed this step: req.token_ids[start : start + length]
    samples: bool  # the chunk reaches the end of req.token_ids: sample the next token

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.start == self.req.num_tokens - 1


@dataclass
class ScheduledBatch:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


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
    ):
        self.allocator = allocator
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.chunked_prefill_size = chunked_prefill_size
        self.schedule_policy = schedule_policy
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.init_new_token_ratio = min(1.0, 0.7 * conservativeness)
        self.min_new_token_ratio = min(1.0, 0.15 * conservativeness)
        self.new_token_ratio = self.init_new_token_ratio
        self.ratio_decay = 0.002
        self.num_retractions = 0

    # --- queue management --------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def abort(self, rid: str) -> Request | None:
        """Finish `rid` with reason abort, releasing its pages; None if unknown or finished."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
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
        chunks: list[ScheduledChunk] = []
        decodes = [r for r in self.running if r.num_computed == r.num_tokens - 1]
        decodes = self._ensure_decode_pages(decodes)
        for req in decodes:
            chunks.append(ScheduledChunk(req, req.num_computed, 1, True))

        budget = self.chunked_prefill_size
        # Requests admitted earlier whose prompts are still being prefilled, oldest first.
        for req in self.running:
            if budget <= 0:
                break
            if req.num_computed < req.num_tokens - 1:
                chunk = self._prefill_chunk(req, budget)
                chunks.append(chunk)
                budget -= chunk.length
        if budget > 0 and self.waiting:
            for req in self._admit(budget):
                chunk = self._prefill_chunk(req, budget)
                chunks.append(chunk)
                budget -= chunk.length
        if not chunks:
            return None
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.ratio_decay)
        return ScheduledBatch(chunks)

    def commit(self, batch: ScheduledBatch, next_tokens: list[int | None]) -> list[Request]:
        """Apply a step's results; returns the requests that got a new token (finished ones included)."""
        updated: list[Request] = []
        for chunk, token in zip(batch.chunks, next_tokens):
            req = chunk.req
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed = chunk.start + chunk.length
            if not chunk.samples:
                continue
            assert token is not None
            req.append_token(token)
            updated.append(req)
            if req.is_finished:
                self.running.remove(req)
                self._release(req, cache_kv=True)
        return updated

    # --- admission -----------------------------------------------------------------
    def _admit(self, budget: int) -> list[Request]:
        admitted: list[Request] = []
        reserved = sum(self._future_pages(r) for r in self.running)
        for req in self._ordered_waiting():
            if budget <= 0 or len(self.running) >= self.max_running_requests:
                break
            matched_pages, matched_tokens, node = self._match(req)
            # Lock the match before anything can evict: the allocation below may evict.
            if node is not None:
                self.prefix_cache.lock(node)
            need = self._pages_for(req.num_tokens) - len(matched_pages) + self._reserve_pages(req)
            available = self.allocator.num_free + self._evictable() - reserved
            new_pages = None
            if need <= available:
                new_pages = self._alloc(self._pages_for(req.num_tokens) - len(matched_pages))
            if new_pages is None:
                if node is not None:
                    self.prefix_cache.unlock(node)
                break  # head-of-line: keep arrival order fair rather than starve long prompts
            req.prefix_node = node
            req.pages = list(matched_pages) + new_pages
            req.num_shared_pages = len(matched_pages)
            req.num_computed = matched_tokens
            if req.num_retractions == 0:
                req.cached_tokens = matched_tokens
            req.status = RequestStatus.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
            admitted.append(req)
            reserved += self._future_pages(req)
            budget -= min(budget, req.num_tokens - req.num_computed)
        return admitted

    def _ordered_waiting(self) -> list[Request]:
        # fcfs for now; lpm / batch policies order this list (see schedule_policy docs).
        return list(self.waiting)

    def _match(self, req: Request) -> tuple[list[int], int, Any]:
        if self.prefix_cache is None:
            return [], 0, None
        # Leave at least one token to compute: its logits sample the next token.
        result = self.prefix_cache.match_prefix(req.token_ids[: req.num_tokens - 1])
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

    def _evictable(self) -> int:
        return self.prefix_cache.evictable_pages if self.prefix_cache is not None else 0

    def _alloc(self, n: int) -> list[int] | None:
        pages = self.allocator.alloc(n)
        if pages is None and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def _ensure_decode_pages(self, decodes: list[Request]) -> list[Request]:
        """Give each decode room for its next token, retracting requests when pages run out."""
        ready: list[Request] = []
        # Oldest first, so that under pressure the newest requests are the ones retracted.
        pending = sorted(decodes, key=lambda r: r.arrival_time)
        while pending:
            req = pending.pop(0)
            if req.status is not RequestStatus.RUNNING:
                continue  # retracted below to make room for an older request
            if self._pages_for(req.num_computed + 1) <= len(req.pages):
                ready.append(req)
                continue
            page = self._alloc(1)
            while page is None:
                victim = self._pick_retraction(exclude=req)
                if victim is None:
                    break
                self._retract(victim)
                page = self._alloc(1)
            if page is None:
                # Alone and still no page: the pool cannot hold this sequence any longer.
                self.running.remove(req)
                self._release(req, cache_kv=True)
                req.finish(FinishReason("length", None, "KV cache capacity reached"))
                continue
            req.pages.extend(page)
            ready.append(req)
        return [r for r in ready if r.status is RequestStatus.RUNNING]

    def _pick_retraction(self, exclude: Request) -> Request | None:
        # Retract the newest admission: it has made the least progress, so the least work is
        # redone, and the older requests it yields to finish (and free pages) soonest.
        candidates = [r for r in self.running if r is not exclude]
        if not candidates:
            return None
        return max(candidates, key=lambda r: r.arrival_time)

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req, cache_kv=True)
        req.num_computed = 0
        req.num_retractions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_retractions += 1
        # Admission under-estimated decode growth: reserve more from now on.
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.debug("retracted %s at %d tokens", req.rid, req.num_tokens)

    def _release(self, req: Request, cache_kv: bool) -> None:
        """Return a request's pages: whole computed pages to the prefix cache, the rest freed.

        The first `num_shared_pages` pages came from a prefix match: they belong to the tree
        and are never freed here.
        """
        pages, req.pages = req.pages, []
        shared, req.num_shared_pages = req.num_shared_pages, 0
        if self.prefix_cache is not None and req.prefix_node is not None:
            self.prefix_cache.unlock(req.prefix_node)
        req.prefix_node = None
        if self.prefix_cache is None or not cache_kv:
            self.allocator.free(pages[shared:])
            return
        full = min(req.num_computed // self.page_size, len(pages))
        result = self.prefix_cache.insert(req.token_ids[: full * self.page_size], pages[:full])
        tree_owned = set(pages[:shared])
        duplicates = [p for p in result.duplicate_pages if p not in tree_owned]
        self.allocator.free(duplicates + pages[full:])
