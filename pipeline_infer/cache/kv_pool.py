"""Paged KV storage and the page allocator.

Every layer owns a K and a V tensor of shape [num_pages, page_size, num_kv_heads, head_dim].
A token's slot is page * page_size + offset, so `view_flat(layer)` gives [num_slots, heads, dim]
views that a store kernel indexes with one integer per token. Page 0 is never handed out: it is
a scratch page that padded rows (CUDA-graph padding, masked lanes) may write into harmlessly.

The allocator knows nothing about requests or prefixes: it hands out and takes back page ids.
Who holds which pages is the scheduler's (and the radix cache's) business.
"""

from __future__ import annotations

import numpy as np
import torch


# Page lists at least this long are marked free / taken with one numpy operation (on a 2-core
# CPU the two ways cost the same at ~150 pages: 7.2 vs 7.5 us for alloc + free of 128).
_ARRAY_FROM = 192


def _first_bad(alloc: "PageAllocator", pages: list[int]) -> str:
    """The first page of a refused free() list that is out of range, already free or repeated."""
    seen = set()
    for p in pages:
        if not 0 < p < alloc.num_pages:
            return f"page {p} (out of range)"
        if alloc._is_free[p] or p in seen:
            return f"page {p}"
        seen.add(p)
    return "no page"


class PageAllocator:
    """Free list of page ids 1..num_pages-1 (page 0 is the scratch page)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        # Popping from the end hands out low page ids first, which keeps small runs compact.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._is_free = bytearray(num_pages)
        # The same bytes as an array, for the bookkeeping of long page lists in one operation.
        self._is_free_view = np.frombuffer(self._is_free, dtype=np.uint8)
        self._is_free_view[1:] = 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the scratch page)."""
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, or None (and nothing taken) when fewer than n are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        if n >= _ARRAY_FROM:
            self._is_free_view[np.array(pages, dtype=np.int64)] = 0
        else:
            for p in pages:
                self._is_free[p] = 0
        return pages[::-1]

    def free(self, pages: list[int]) -> None:
        if len(pages) >= _ARRAY_FROM:
            # A finished request gives back hundreds of pages at page size 1 (~870 in the random
            # workload): one array check and write instead of a Python loop took free + alloc of
            # 866 pages from 50 to 30 us on a 2-core CPU. Short lists stay on the loop, where
            # converting to an array would cost more than it saves.
            idx = np.sort(np.array(pages, dtype=np.int64))
            if idx[0] <= 0 or idx[-1] >= self.num_pages or (idx[1:] == idx[:-1]).any() or self._is_free_view[idx].any():
                raise AssertionError(f"double free of {_first_bad(self, pages)}")
            self._is_free_view[idx] = 1
        else:
            for p in pages:
                assert 0 < p < self.num_pages and not self._is_free[p], f"double free of page {p}"
                self._is_free[p] = 1
        self._free.extend(pages)

    def is_free(self, page: int) -> bool:
        return bool(self._is_free[page])


class KVPool:
    """K/V tensors of every layer plus the page allocator."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.allocator = PageAllocator(num_pages)

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * elem

    def view_flat(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_pages * page_size, num_kv_heads, head_dim] views of one layer's K and V."""
        n = self.num_pages * self.page_size
        return (
            self.k_cache[layer_id].view(n, self.num_kv_heads, self.head_dim),
            self.v_cache[layer_id].view(n, self.num_kv_heads, self.head_dim),
        )

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
