"""PageAllocator: the free list and its double-free checks, on short lists (a Python loop) and
long ones (one numpy operation, from kv_pool._ARRAY_FROM pages)."""

from __future__ import annotations

import random

import pytest

from pipeline_infer.cache import kv_pool
from pipeline_infer.cache.kv_pool import PageAllocator

LONG = kv_pool._ARRAY_FROM + 10


def _free_set(a: PageAllocator) -> set[int]:
    return {p for p in range(a.num_pages) if a.is_free(p)}


@pytest.mark.parametrize("sizes", [[1, 3, 7], [LONG, 5, LONG * 2], [LONG * 3]])
def test_pages_handed_out_are_unique_and_come_back(sizes):
    a = PageAllocator(LONG * 8)
    held: list[list[int]] = []
    for n in sizes:
        pages = a.alloc(n)
        assert len(pages) == n and all(not a.is_free(p) for p in pages)
        held.append(pages)
    taken = [p for pages in held for p in pages]
    assert len(set(taken)) == len(taken) and 0 not in taken  # page 0 is the scratch page
    assert a.num_free == a.capacity - len(taken)
    assert _free_set(a) == set(range(1, a.num_pages)) - set(taken)
    random.Random(0).shuffle(held)
    for pages in held:
        a.free(pages)
    assert a.num_free == a.capacity
    assert _free_set(a) == set(range(1, a.num_pages))
    # The free list is a stack: the pages freed last are handed out first.
    assert a.alloc(len(held[-1])) == held[-1][::-1]


def test_low_page_ids_are_handed_out_first():
    a = PageAllocator(LONG * 4)
    assert a.alloc(3) == [1, 2, 3]
    assert a.alloc(LONG) == list(range(4, 4 + LONG))


@pytest.mark.parametrize("n", [3, LONG])
def test_double_free_is_refused(n):
    a = PageAllocator(LONG * 4)
    pages = a.alloc(n)
    a.free(pages)
    with pytest.raises(AssertionError, match=f"double free of page {pages[0]}"):
        a.free(pages)


def test_a_long_list_with_a_repeated_or_foreign_page_is_refused_and_nothing_changes():
    a = PageAllocator(LONG * 4)
    pages = a.alloc(LONG)
    before = (a.num_free, _free_set(a))
    with pytest.raises(AssertionError, match=f"double free of page {pages[5]}"):
        a.free(pages + [pages[5]])  # repeated within the list
    with pytest.raises(AssertionError, match="out of range"):
        a.free(pages + [a.num_pages])
    with pytest.raises(AssertionError, match="out of range"):
        a.free([0] + pages)  # the scratch page is never handed out
    assert (a.num_free, _free_set(a)) == before
    a.free(pages)
    assert a.num_free == a.capacity
