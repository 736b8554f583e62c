"""PageTableBuilder against a table rebuilt from scratch, over random steps of a running batch."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline_infer.page_table import PageTableBuilder


def rebuilt(reqs) -> np.ndarray:
    width = max(max((len(r.pages) for r in reqs), default=0), 1)
    table = np.zeros((len(reqs), width), dtype=np.int32)
    for b, r in enumerate(reqs):
        table[b, : len(r.pages)] = r.pages
    return table


def random_batches(seed: int, steps: int = 300):
    """A running batch over `steps` scheduler steps, yielded after each step's changes:
    admissions, decodes, prefill chunks, prefix-cache page swaps, retractions, finishes and
    re-orderings, at the rates the comments give. Shared with test_device_page_table.py."""
    rng = random.Random(seed)
    next_page = iter(range(1, 10**7))
    running = []
    for step in range(steps):
        for _ in range(rng.choice([0, 0, 0, 1, 3])):  # admissions: pages from a prefix match + new
            running.append(SimpleNamespace(rid=f"r{step}-{len(running)}", pages_version=1,
                                           pages=[next(next_page) for _ in range(rng.randint(0, 90))]))
        for r in running:
            roll = rng.random()
            if roll < 0.6:
                r.pages.append(next(next_page))  # a decode crossing into a new page
            elif roll < 0.65:
                r.pages.extend(next(next_page) for _ in range(rng.randint(2, 70)))  # a prefill chunk
            elif roll < 0.68:  # shared with the prefix cache: leading pages replaced in place
                k = rng.randint(0, len(r.pages))
                r.pages[:k] = [next(next_page) for _ in range(k)]
                r.pages_version += 1
            elif roll < 0.70:  # retracted and re-admitted: a new, possibly shorter list
                r.pages = [next(next_page) for _ in range(rng.randint(0, 40))]
                r.pages_version += 1
        if running and rng.random() < 0.3:  # finishes
            running.pop(rng.randrange(len(running)))
        if rng.random() < 0.2:  # the scheduler's order changes
            rng.shuffle(running)
        if running:
            yield running


@pytest.mark.parametrize("seed", range(4))
def test_patched_table_equals_rebuilt_table(seed):
    builder = PageTableBuilder()
    kept = total = 0
    for running in random_batches(seed):
        table = builder.build(running)
        assert table.dtype == np.int32 and table.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(table, rebuilt(running))
        kept += builder.rows_kept
        total += len(running)
    assert kept > 0.8 * total  # most rows were carried over, not rebuilt


def test_version_bump_without_length_change_is_seen():
    builder = PageTableBuilder()
    r = SimpleNamespace(rid="a", pages_version=0, pages=[5, 6, 7])
    builder.build([r])
    r.pages[:2] = [1, 2]
    r.pages_version += 1
    np.testing.assert_array_equal(builder.build([r]), [[1, 2, 7]])


def test_same_rows_as_last_step_equal_rebuilt_table():
    """The usual decode step (the same requests in the same rows, same pages_version) takes the
    column-wise path: rows growing by none, one or several pages, or shrinking, must all match."""
    rng = random.Random(5)
    next_page = iter(range(1, 10**7))
    running = [SimpleNamespace(rid=f"r{i}", pages_version=0, pages=[next(next_page) for _ in range(rng.randint(0, 70))])
               for i in range(40)]
    builder = PageTableBuilder()
    builder.build(running)
    for step in range(200):
        shrunk = 0
        for r in running:
            roll = rng.random()
            if roll < 0.5:
                r.pages.append(next(next_page))
            elif roll < 0.55:
                r.pages.extend(next(next_page) for _ in range(rng.randint(2, 80)))
            elif roll < 0.56 and r.pages:  # shorter without a version bump: rebuilt, not kept
                del r.pages[rng.randrange(len(r.pages)) :]
                shrunk += 1
        table = builder.build(running)
        np.testing.assert_array_equal(table, rebuilt(running))
        assert builder.rows_kept == len(running) - shrunk


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_ints_to_device_keeps_every_value(dtype):
    # Unsigned conversion first (the fast one), the signed one for a negative value; the same
    # tensor either way, as torch.tensor would make it.
    from pipeline_infer.forward_batch import ints_to_device

    top = 2**63 - 1 if dtype == torch.long else 2**31 - 1
    for values in ([0, 1, 5, 151_935, top], [3, -1, 7, -(top + 1), top], list(range(1000)), [-2]):
        got = ints_to_device(values, torch.device("cpu"), dtype)
        assert got.dtype == dtype and got.tolist() == values
    assert ints_to_device([], torch.device("cpu"), dtype).shape == (0,)
    with pytest.raises(OverflowError):  # past what the dtype holds: refused, not wrapped
        ints_to_device([5, top + 1 if dtype == torch.int32 else 2**64], torch.device("cpu"), dtype)
