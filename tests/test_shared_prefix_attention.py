"""Shared-prefix (cascade) decode attention against plain decode attention over whole sequences.

Groups of sequences share their first pages (as the radix cache hands them out); the finder
(pipeline_infer/shared_prefix.py) groups the rows and the kernel must give what the torch
reference gives attending every row over all its keys. Every cache slot no sequence owns is
NaN, so reading outside a row's keys, or a prefix slot a row does not have, fails the test.
Without CUDA the kernels run in Triton's interpreter at small sizes.
"""

from types import SimpleNamespace

import torch

import pytest

pytest.importorskip("triton")

from pipeline_infer.kernels import reference as ref  # noqa: E402
from pipeline_infer.kernels.triton import decode_attention as decode_module  # noqa: E402
from pipeline_infer.kernels.triton import shared_prefix_attention as shared_module  # noqa: E402
from pipeline_infer.kernels.triton.decode_attention import DecodeRope, decode_attention  # noqa: E402
from pipeline_infer.kernels.triton.launch import is_interpreted  # noqa: E402
from pipeline_infer.kernels.triton.shared_prefix_attention import (  # noqa: E402
    SharedPrefix,
    _shared_prefix_kernel,
    rows_per_item,
    shared_prefix_decode_attention,
)
from pipeline_infer.layers.rotary import RotaryEmbedding  # noqa: E402
from pipeline_infer.shared_prefix import SharedPrefixFinder, common_prefix_len  # noqa: E402

INTERPRETED = is_interpreted(_shared_prefix_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"


def _fake_req(pages: list[int], shared: int) -> SimpleNamespace:
    return SimpleNamespace(pages=pages, pages_version=0, num_shared_pages=shared, shared_prefix_memo=None)


def _grouped_case(seed, groups, page_size, hkv, head_dim, dtype=torch.float32, own_lens=None):
    """groups: [(prefix pages, [own tokens of each member])]. Returns caches, table, lens, fake requests.

    Each member holds seq_len = prefix pages * page_size + own tokens keys (the last is the new token's).
    """
    gen = torch.Generator().manual_seed(seed)
    members = [(g, own) for g, (_, owns) in enumerate(groups) for own in owns]
    total_pages = sum(p for p, _ in groups) + sum(-(-own // page_size) for _, own in members)
    order = (torch.randperm(total_pages + 2, generator=gen) + 1).tolist()
    shape = (total_pages + 3, page_size, hkv, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)

    def fill(pages: list[int], n: int) -> None:
        pos = torch.arange(n)
        idx = torch.tensor(pages, dtype=torch.long)[pos // page_size], pos % page_size
        k_cache[idx] = torch.randn(n, hkv, head_dim, generator=gen).to(dtype)
        v_cache[idx] = torch.randn(n, hkv, head_dim, generator=gen).to(dtype)

    prefix_pages = []
    for num_pages, _ in groups:
        pages = [order.pop() for _ in range(num_pages)]
        fill(pages, num_pages * page_size)
        prefix_pages.append(pages)
    reqs, lens = [], []
    for g, own in members:
        own_pages = [order.pop() for _ in range(-(-own // page_size))]
        fill(own_pages, own)
        reqs.append(_fake_req(prefix_pages[g] + own_pages, len(prefix_pages[g])))
        lens.append(len(prefix_pages[g]) * page_size + own)
    # Rows of a group are not next to each other in the batch: the kernel's row list gathers them.
    perm = torch.randperm(len(reqs), generator=gen).tolist()
    reqs, lens = [reqs[i] for i in perm], [lens[i] for i in perm]
    width = max(len(r.pages) for r in reqs) + 1
    table = torch.zeros((len(reqs), width), dtype=torch.int32)
    for b, r in enumerate(reqs):
        table[b, : len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(DEVICE), lens, reqs


def _shared_tensors(plan, num_rows: int, num_splits: int, spare_items: int = 0) -> SharedPrefix:
    i32 = dict(dtype=torch.int32, device=DEVICE)
    items = torch.tensor(plan.items + [0] * (4 * spare_items), **i32).view(-1, 4)
    return SharedPrefix(
        torch.tensor(plan.kv_starts, **i32), torch.tensor(plan.rows + [0] * (num_rows - len(plan.rows)), **i32),
        items, torch.tensor([plan.num_items], **i32), num_splits,
    )


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group,hkv,head_dim", [(7, 2, 64), (4, 2, 128), (1, 2, 64)])
def test_shared_prefix_matches_attention_over_whole_sequences(page_size, group, hkv, head_dim) -> None:
    ps = page_size
    # Two sharing groups (one with more rows than one kernel entry takes), one row alone.
    per_item = rows_per_item(group * hkv, hkv, head_dim)
    big = per_item + 3
    groups = [(48 // ps + 1, [5 + i % 7 for i in range(big)]), (32 // ps, [1, 17, 40]), (64 // ps, [9])]
    k_cache, v_cache, table, lens, reqs = _grouped_case(page_size * 31 + group, groups, ps, hkv, head_dim)
    finder = SharedPrefixFinder(ps, per_item, max_groups=8, min_saving=0.0)
    plan = finder.plan(reqs, lens)
    assert plan is not None and plan.num_items == 3  # the big group in two entries, the 3-row one in one
    assert sorted(plan.kv_starts) == sorted([(48 // ps + 1) * ps] * big + [32 // ps * ps] * 3 + [0])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(len(lens), group * hkv, head_dim, generator=gen).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    expected = ref.decode_attention_ref(q, k_cache, v_cache, table, seq_lens, head_dim**-0.5)
    for kv_splits, prefix_splits, spare in ((1, 1, 0), (3, 2, 2)):
        shared = _shared_tensors(plan, len(lens), prefix_splits, spare)
        out = torch.full_like(q, float("nan"))
        shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, head_dim**-0.5, shared, kv_splits, out=out)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_shared_prefix_with_rotary_and_kv_store_matches_the_decode_kernel() -> None:
    ps, hkv, group, head_dim = 4, 2, 7, 64
    groups = [(5, [3, 6, 2, 9]), (3, [4, 1])]
    k_cache, v_cache, table, lens, reqs = _grouped_case(11, groups, ps, hkv, head_dim)
    b = len(lens)
    gen = torch.Generator().manual_seed(5)
    # The new token's key is not in the cache yet: the kernels rotate and store it.
    slots = torch.tensor([r.pages[(n - 1) // ps] * ps + (n - 1) % ps for r, n in zip(reqs, lens)], device=DEVICE)
    k_cache.view(-1, hkv, head_dim)[slots] = float("nan")
    v_cache.view(-1, hkv, head_dim)[slots] = float("nan")
    q = torch.randn(b, group * hkv, head_dim, generator=gen).to(DEVICE)
    k_new = torch.randn(b, hkv, head_dim, generator=gen).to(DEVICE)
    v_new = torch.randn(b, hkv, head_dim, generator=gen).to(DEVICE)
    rotary = RotaryEmbedding(head_dim, head_dim, 256, {"rope_type": "default", "rope_theta": 1e4}).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    rope = DecodeRope(k_new, v_new, seq_lens.long() - 1, rotary.cos_sin_cache, slots)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = decode_attention(q, k_ref, v_ref, table, seq_lens, 0.125, 2, rope=rope)
    plan = SharedPrefixFinder(ps, rows_per_item(group * hkv, hkv, head_dim), max_groups=4, min_saving=0.0).plan(reqs, lens)
    out = shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, _shared_tensors(plan, b, 2), 1, rope=rope)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)


def test_own_keys_pass_with_the_batch_fastest_grid(monkeypatch) -> None:
    """The split kernel's other grid order (decode_attention.HEADS_FASTEST off) in cascade's own-keys pass."""
    monkeypatch.setattr(decode_module, "HEADS_FASTEST", False)
    test_shared_prefix_matches_attention_over_whole_sequences(16, 7, 2, 64)


def test_finder_groups_rows_by_their_common_pages_and_skips_small_savings() -> None:
    a = _fake_req([5, 6, 7, 8, 20], 4)
    b = _fake_req([5, 6, 7, 9, 21], 4)  # shares 3 pages with a
    c = _fake_req([5, 6, 7, 8, 22], 4)  # shares 4 with a, but the group's common part is 3
    d = _fake_req([30, 31], 1)  # alone
    e = _fake_req([40, 41, 42], 0)  # first page equal to f's, but not the prefix cache's: never shared
    f = _fake_req([40, 43, 44], 0)
    finder = SharedPrefixFinder(page_size=2, rows_per_item=2, max_groups=4, min_saving=0.0)
    lens = [10, 10, 9, 4, 6, 6]
    plan = finder.plan([a, b, c, d, e, f], lens)
    assert plan.kv_starts == [6, 6, 6, 0, 0, 0]
    assert plan.rows == [0, 1, 2]
    assert plan.items == [0, 2, 6, 0, 2, 1, 6, 0]  # rows 0-1, then row 2; prefix 6 keys; table row 0
    assert plan.saved_tokens == 6  # three rows read the prefix in two entries
    # A prefix is never longer than a member's keys before its new token.
    assert SharedPrefixFinder(2, 2, 4, 0.0).plan([a, b, c], [10, 10, 5]).kv_starts == [4, 4, 4]
    # The same requests again: the same plan object, no new work.
    assert finder.plan([a, b, c, d, e, f], [n + 1 for n in lens], same_batch=True) is plan
    finder.reset()  # a step the finder did not plan ran in between: "same batch" is about that one
    rebuilt = finder.plan([a, b, c, d, e, f], [n + 1 for n in lens], same_batch=True)
    assert rebuilt is not plan and rebuilt.kv_starts == plan.kv_starts
    # A saving under min_saving of the step's key reads: no plan.
    assert SharedPrefixFinder(2, 2, 4, min_saving=0.5).plan([a, b, c, d], lens[:4]) is None
    # max_groups keeps the groups that save the most.
    g1 = [_fake_req([50, 51, 52, 53 + i], 3) for i in range(4)]
    g2 = [_fake_req([60, 61 + i], 1) for i in range(4)]
    plan = SharedPrefixFinder(2, 4, max_groups=1, min_saving=0.0).plan(g1 + g2, [8] * 8)
    assert plan.rows == [0, 1, 2, 3] and plan.kv_starts == [6] * 4 + [0] * 4


def test_finder_narrows_the_last_plan_when_rows_leave() -> None:
    """A batch of the last plan's requests less some keeps its groups less those rows; a new
    request or a replaced page list in the batch, or a cut by max_groups, builds afresh."""
    g1 = [_fake_req([5, 6, 7, 10 + i], 3) for i in range(5)]
    g2 = [_fake_req([8, 9, 20 + i], 2) for i in range(3)]
    lone = _fake_req([30, 31], 1)
    batch = [g1[0], g2[0], g1[1], lone, g1[2], g2[1], g1[3], g2[2], g1[4]]
    finder = SharedPrefixFinder(page_size=2, rows_per_item=2, max_groups=4, min_saving=0.0)
    finder.plan(batch, [8] * len(batch))
    assert finder.shrunk_plans == 0

    def fresh(reqs, lens):
        return SharedPrefixFinder(2, 2, 4, 0.0).plan(reqs, lens)

    # g1[1] and g2[0] and g2[2] finish: g2 keeps one row (no group), g1 four.
    smaller = [g1[0], lone, g1[2], g2[1], g1[3], g1[4]]
    lens = [9, 9, 9, 9, 9, 9]
    plan = finder.plan(smaller, lens)
    assert finder.shrunk_plans == 1
    want = fresh(smaller, lens)
    assert plan.kv_starts == want.kv_starts == [6, 0, 6, 0, 6, 6]
    assert sorted(plan.rows) == sorted(want.rows) == [0, 2, 4, 5]
    assert plan.saved_tokens == want.saved_tokens and plan.longest_prefix == want.longest_prefix
    assert sorted(zip(*[iter(plan.items)] * 4)) == sorted(zip(*[iter(want.items)] * 4))
    # Smaller again: narrowed from the built plan still.
    plan = finder.plan([g1[0], g1[4]], [10, 10])
    assert finder.shrunk_plans == 2 and plan.kv_starts == [6, 6] and plan.rows == [0, 1]
    # A group left with one row saves nothing: no plan.
    assert finder.plan([g1[0], lone], [10, 10]) is None and finder.shrunk_plans == 3
    # A request the built plan did not have: built afresh.
    newcomer = _fake_req([5, 6, 7, 40], 3)
    plan = finder.plan([g1[0], g1[2], newcomer], [10, 10, 10])
    assert finder.shrunk_plans == 3 and plan.kv_starts == [6, 6, 6]
    # A member whose pages were replaced (retracted and admitted again): built afresh.
    finder.plan(batch, [8] * len(batch))
    g1[2].pages_version += 1
    g1[2].pages = [50, 51, 52, 53]
    plan = finder.plan([g1[0], g1[1], g1[2]], [10, 10, 10])
    assert finder.shrunk_plans == 3 and plan.kv_starts == [6, 6, 0]
    # When max_groups cut groups, a shrunk batch could favour one that was cut: built afresh.
    capped = SharedPrefixFinder(2, 2, max_groups=1, min_saving=0.0)
    capped.plan(batch, [8] * len(batch))
    capped.plan(batch[:-1], [9] * (len(batch) - 1))
    assert capped.shrunk_plans == 0


def test_finder_leaves_groups_under_min_group_rows_out_and_bounds_entries() -> None:
    """Groups with fewer than min_group_rows rows attend through their own keys (kv_starts 0),
    when built and when a narrowed group falls under it; max_items bounds every plan's entries."""
    g3 = [_fake_req([5, 6, 7, 10 + i], 3) for i in range(3)]
    g2 = [_fake_req([8, 9, 20 + i], 2) for i in range(2)]
    finder = SharedPrefixFinder(page_size=2, rows_per_item=2, max_groups=4, min_saving=0.0, min_group_rows=3)
    batch = [g3[0], g2[0], g3[1], g2[1], g3[2]]
    plan = finder.plan(batch, [8] * 5)
    assert plan.kv_starts == [6, 0, 6, 0, 6] and plan.rows == [0, 2, 4]
    assert SharedPrefixFinder(2, 2, 4, 0.0).plan(batch, [8] * 5).kv_starts == [6, 4, 6, 4, 6]  # the default: 2
    # g3 loses a row: under 3, so no group is left and no plan.
    assert finder.plan([g3[0], g2[0], g3[2], g2[1]], [9] * 4) is None and finder.shrunk_plans == 1
    with pytest.raises(ValueError, match="min_group_rows"):
        SharedPrefixFinder(2, 2, 4, min_group_rows=1)
    # Entries: a group of n rows takes ceil(n / rows_per_item); groups number <= rows // min_group_rows.
    for per_item, min_rows, sizes in [(2, 3, [3, 3, 3]), (4, 2, [2] * 6 + [5]), (16, 16, [17, 16, 31])]:
        big = SharedPrefixFinder(2, per_item, max_groups=64, min_saving=0.0, min_group_rows=min_rows)
        reqs = [_fake_req([100 * g, 100 * g + 1, 1000 + i], 2) for g, n in enumerate(sizes) for i in range(n)]
        plan = big.plan(reqs, [8] * len(reqs))
        assert plan.num_items == sum(-(-n // per_item) for n in sizes) <= big.max_items(len(reqs))
    assert SharedPrefixFinder(2, 16, 64, min_group_rows=16).max_items(64) == 4 + 4
    assert SharedPrefixFinder(2, 16, 64, min_group_rows=16).max_items(4096) == 256 + 64


def test_prefix_splits_fill_one_wave_of_two_programs_an_sm() -> None:
    from pipeline_infer.kernels.triton.shared_prefix_attention import choose_prefix_splits

    # 132 SMs: 264 program slots. 64 entries x 2 kv heads = 128 programs a split: 2 splits.
    assert choose_prefix_splits(64, 2, 1024, 132) == 2
    assert choose_prefix_splits(32, 2, 1024, 132) == 4  # 64 programs a split
    assert choose_prefix_splits(16, 2, 1024, 132) == 4  # 8 would fit; 1,024 keys allow 4 of >= 256
    assert choose_prefix_splits(200, 2, 4096, 132) == 1  # more programs than slots: never 0
    assert choose_prefix_splits(1, 1, 100, 132) == 1  # a short prefix is not split


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([9, 2], [1, 2]) == 0
    for guess in range(5):  # a wrong guess only costs time
        assert common_prefix_len([1, 2, 3, 4], [1, 2, 3, 5], guess) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_first", [False, True])
def test_prefix_pass_on_a_side_stream_matches_one_stream_eagerly_and_in_a_graph(monkeypatch, prefix_first) -> None:
    """The prefix pass on a second stream (the backend's default) gives the one-stream result,
    launched before or after the own-keys pass (prefix_pass_first).

    Large enough that the two passes' programs are resident together; with rotary and the K/V
    store, so the own-keys pass writes the cache while the prefix pass reads it. Inside a CUDA
    graph the fork and join must be captured, or replay would merge before the prefix pass ends.
    """
    monkeypatch.setattr(shared_module, "prefix_pass_first", lambda head_dim, rows: prefix_first)
    ps, hkv, group, head_dim = 16, 2, 7, 64
    groups = [(64, [40 + (7 * i) % 90 for i in range(48)]) for _ in range(6)]
    k_cache, v_cache, table, lens, reqs = _grouped_case(21, groups, ps, hkv, head_dim, dtype=torch.bfloat16)
    b = len(lens)
    gen = torch.Generator().manual_seed(8)
    slots = torch.tensor([r.pages[(n - 1) // ps] * ps + (n - 1) % ps for r, n in zip(reqs, lens)], device=DEVICE)
    q = torch.randn(b, group * hkv, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    k_new = torch.randn(b, hkv, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    v_new = torch.randn(b, hkv, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    rotary = RotaryEmbedding(head_dim, head_dim, 4096, {"rope_type": "default", "rope_theta": 1e4}).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    rope = DecodeRope(k_new, v_new, seq_lens.long() - 1, rotary.cos_sin_cache, slots)
    plan = SharedPrefixFinder(ps, rows_per_item(group * hkv, hkv, head_dim), max_groups=8, min_saving=0.0).plan(reqs, lens)
    shared = _shared_tensors(plan, b, 2)
    expected = decode_attention(q, k_cache.clone(), v_cache.clone(), table, seq_lens, 0.125, 1, rope=rope)
    one_stream = shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, shared, 1, rope=rope)
    torch.testing.assert_close(one_stream, expected, rtol=2e-2, atol=2e-2)
    side = torch.cuda.Stream()
    out = torch.full_like(q, float("nan"))
    shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, shared, 1, out=out, rope=rope, side_stream=side)
    assert torch.equal(out, one_stream)

    def step():
        shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, shared, 1, out=out, rope=rope, side_stream=side)

    capture = torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture):
        step()
    for trial in range(5):
        out.fill_(float("nan"))
        q.copy_(torch.randn(q.shape, generator=gen).to(DEVICE, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        again = shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, shared, 1, rope=rope)
        assert torch.equal(out, again), trial
