"""DevicePageTable (the page table kept on the device, updated by each step's changes)
against a table rebuilt from scratch, and the engine that uses it against the torch backend."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline_infer.device_page_table import DevicePageTable
from test_page_table import random_batches, rebuilt


def step(table: DevicePageTable, reqs) -> np.ndarray:
    """One step on the CPU: the update goes through an int64 tensor as it would to the GPU."""
    update = table.prepare(reqs)
    out = table.apply(update, torch.tensor(update.ints, dtype=torch.long))
    assert out.dtype == torch.int32 and out.is_contiguous()
    return out.numpy()


def req(rid: str, pages: list[int], version: int = 1):
    return SimpleNamespace(rid=rid, pages_version=version, pages=pages)


@pytest.mark.parametrize("seed", range(4))
def test_device_table_equals_rebuilt_table(seed):
    table = DevicePageTable(torch.device("cpu"))
    rewritten = total = 0
    widest = 0
    for running in random_batches(seed):
        np.testing.assert_array_equal(step(table, running), rebuilt(running))
        rewritten += table.rows_rewritten
        total += len(running)
        widest = max(widest, max(len(r.pages) for r in running))
    assert rewritten < 0.2 * total  # most rows only got their new pages
    assert widest > 256  # the device table grew its columns on the way
    assert table.fast_steps > 0  # and steps of an unchanged batch took the same-batch path


def test_a_decode_step_sends_the_order_and_one_write_per_new_page():
    """The point of it: a step's upload grows with the batch and the pages added, not with the
    sequences' length (4 ints per request at page size 1, whatever the length)."""
    table = DevicePageTable(torch.device("cpu"))
    rng = random.Random(0)
    reqs = [req(f"r{i}", list(range(1, rng.randint(500, 3000)))) for i in range(100)]
    step(table, reqs)  # admission: whole rows
    for r in reqs:
        r.pages.append(7)
    update = table.prepare(reqs)
    assert len(update.ints) == 4 * len(reqs) and table.rows_rewritten == 0
    table.apply(update, torch.tensor(update.ints))
    for r in reqs[::2]:  # at a larger page size most decodes add no page
        r.pages.append(9)
    assert len(table.prepare(reqs).ints) == len(reqs) + 3 * 50


def test_steps_of_the_same_batch_equal_rebuilt_tables():
    """The same requests in the same order step after step (the usual decode step) take the
    same-batch path while each gains at most one page; a step where one gains several, or one's
    pages are replaced, takes the general path; every table equals the rebuilt one."""
    rng = random.Random(7)
    next_page = iter(range(1, 10**7))
    reqs = [req(f"r{i}", [next(next_page) for _ in range(rng.randint(1, 300))]) for i in range(50)]
    table = DevicePageTable(torch.device("cpu"))
    step(table, reqs)
    expected_fast = 0
    for k in range(60):
        general = False
        for r in reqs:
            if rng.random() < 0.5:
                r.pages.append(next(next_page))
        if k % 10 == 3:  # a prefill chunk's worth of pages
            reqs[5].pages.extend(next(next_page) for _ in range(9))
            general = True
        if k % 10 == 7:  # pages swapped for the prefix cache's
            reqs[9].pages[:3] = [next(next_page) for _ in range(3)]
            reqs[9].pages_version += 1
            general = True
        np.testing.assert_array_equal(step(table, reqs), rebuilt(reqs))
        expected_fast += not general
    assert table.fast_steps == expected_fast


def test_rows_grow_beyond_the_first_block_and_come_back():
    table = DevicePageTable(torch.device("cpu"))
    reqs = [req(f"r{i}", [i + 1] * (i % 7 + 1)) for i in range(150)]
    np.testing.assert_array_equal(step(table, reqs), rebuilt(reqs))
    few = reqs[140:]
    np.testing.assert_array_equal(step(table, few), rebuilt(few))  # the others' rows go back
    again = reqs[:20] + few  # back after leaving: written whole into whatever row they get
    np.testing.assert_array_equal(step(table, again), rebuilt(again))


def test_a_reused_row_or_rid_never_shows_the_old_pages():
    table = DevicePageTable(torch.device("cpu"))
    long = req("a", list(range(1, 41)))
    step(table, [long])
    short = req("a", [5, 6])  # the same rid, another request (same pages_version)
    np.testing.assert_array_equal(step(table, [short]), [[5, 6]])
    wide = req("w", list(range(100, 140)))
    np.testing.assert_array_equal(step(table, [short, wide])[0], [5, 6] + [0] * 38)
    longer = req("a", [7, 8, 9])  # the rid again, as long as or longer than its row, same version
    np.testing.assert_array_equal(step(table, [longer]), [[7, 8, 9]])
    table.reset()  # the engine went idle: the next request lands in a row that held pages
    b = req("b", [3])
    np.testing.assert_array_equal(step(table, [b, wide])[0], [3] + [0] * 39)


@pytest.mark.parametrize("page_size", [1, 4])
def test_triton_engine_with_the_device_table_matches_the_torch_backend(tmp_path, page_size):
    """End to end through the model runner under Triton's interpreter: overlap on, admissions
    while others decode, a prefix shared through the radix cache, and a pool small enough to
    retract; greedy ids must equal the torch backend's (which rebuilds the table on the host)."""
    from pipeline_infer import Engine
    from tiny_models import make_tiny_model, mixed_admission_workload

    directory, _ = make_tiny_model(str(tmp_path), "llama", head_dim=16)
    prompts, params = mixed_admission_workload(page_size)
    outs = {}
    for backend in ("torch", "triton"):
        with Engine(directory, attention_backend=backend, page_size=page_size, dtype="float32",
                    disable_overlap_schedule=False, max_running_requests=4, max_total_tokens=96) as llm:
            assert (llm._runner.device_tables is not None) == (backend == "triton")
            outs[backend] = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=params)]
            info = llm.get_server_info()
            assert info["num_retractions"] > 0 and info["num_steps"] > 20
    assert outs["triton"] == outs["torch"]
