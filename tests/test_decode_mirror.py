"""The torch backend's decode mirror over many steps of continuous batching, against dense attention.

Requests join (prefill), decode, finish and hand their pages to a successor with the same
tokens (as the radix cache does), in shuffled row orders, with the slack forced small so
buckets run out of room. Every step and layer is checked against float64 attention over each
request's full K/V, and the same steps run through a backend without the mirror.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.kernels.attention import decode_mirror
from pipeline_infer.kernels.attention.torch_backend import TorchAttentionBackend
from test_torch_backend import dense_reference

LAYERS, D = 2, 16


class Seq:
    def __init__(self, pages: list[int], k: list[torch.Tensor], v: list[torch.Tensor]):
        self.pages = pages
        self.k = k  # per layer [len, Hkv, D]
        self.v = v

    @property
    def length(self) -> int:
        return self.k[0].shape[0]


def run_step(backends, pool, rows, new_counts, hq, hkv, page_size):
    """One forward over `rows` (Seq objects), each adding new_counts[i] tokens; checks every output."""
    for s, n in zip(rows, new_counts):  # pages for the new tokens
        need = -(-(s.length + n) // page_size) - len(s.pages)
        if need > 0:
            s.pages += pool.allocator.alloc(need)
    slots, positions = [], []
    for s, n in zip(rows, new_counts):
        for p in range(s.length, s.length + n):
            slots.append(s.pages[p // page_size] * page_size + p % page_size)
            positions.append(p)
    table = torch.zeros(len(rows), max(len(s.pages) for s in rows), dtype=torch.int32)
    for b, s in enumerate(rows):
        table[b, : len(s.pages)] = torch.tensor(s.pages)
    T = len(slots)
    prefix = [s.length for s in rows]
    outs = {id(b): [] for b in backends}
    refs = []
    for layer in range(LAYERS):
        q = torch.randn(T, hq, D)
        new_k, new_v = torch.randn(T, hkv, D), torch.randn(T, hkv, D)
        for backend in backends:
            batch = ForwardBatch(
                input_ids=torch.zeros(T, dtype=torch.long),
                positions=torch.tensor(positions),
                extend_lens=list(new_counts),
                prefix_lens=prefix,
                page_table=table,
                page_table_host=table.numpy(),
                out_cache_loc=torch.tensor(slots),
                logits_indices=torch.zeros(0, dtype=torch.long),
                attn_backend=backend,
            )
            if layer == 0:
                backend.plan(batch)
                backend._batch = batch
            outs[id(backend)].append(backend.forward(q, new_k, new_v, layer, backend._batch, D**-0.5))
        start = 0
        for s, n in zip(rows, new_counts):
            s.k[layer] = torch.cat([s.k[layer], new_k[start : start + n]])
            s.v[layer] = torch.cat([s.v[layer], new_v[start : start + n]])
            ref = dense_reference(q[start : start + n], s.k[layer], s.v[layer], s.k[layer].shape[0] - n, D**-0.5)
            refs.append((layer, start, n, ref))
            start += n
    for backend in backends:
        for layer, start, n, ref in refs:
            got = outs[id(backend)][layer][start : start + n].double()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_mirror_over_continuous_batching(monkeypatch, page_size, hq, hkv):
    monkeypatch.setattr(decode_mirror, "SLACK_TOKENS", 5)  # buckets run out of room every few steps
    rng = random.Random(page_size * 10 + hq)
    torch.manual_seed(rng.randrange(1 << 30))
    pool = KVPool(LAYERS, 4096, page_size, hkv, D, torch.float32, "cpu")
    mirrored = TorchAttentionBackend(pool, hq, hkv, D)
    plain = TorchAttentionBackend(pool, hq, hkv, D)
    plain.mirror = None
    assert mirrored.mirror is not None

    def empty():
        return Seq([], [torch.zeros(0, hkv, D) for _ in range(LAYERS)], [torch.zeros(0, hkv, D) for _ in range(LAYERS)])

    running: list[Seq] = []
    continued = builds = successors = 0
    for step in range(60):
        rows, counts = [], []
        for s in running:  # every running sequence decodes one token
            rows.append(s)
            counts.append(1)
        if step % 7 == 0 or not running:  # newcomers prefill a prompt
            for _ in range(rng.randint(1, 3)):
                s = empty()
                running.append(s)
                rows.append(s)
                counts.append(rng.randint(2, 30))
        if step % 11 == 5 and running:
            # A finished sequence hands its pages to a successor with the same tokens (a full
            # radix hit): the successor's first step is a one-token extend on those pages.
            old = running.pop(rng.randrange(len(running)))
            i = rows.index(old)
            del rows[i], counts[i]
            if old.length % page_size == 0:  # only whole pages are shared
                succ = Seq(list(old.pages), [k.clone() for k in old.k], [v.clone() for v in old.v])
                running.append(succ)
                rows.append(succ)
                counts.append(1)
                successors += 1
        if step % 5 == 3 and len(running) > 2:  # one finishes, its pages freed
            gone = running.pop(rng.randrange(len(running)))
            if gone in rows:
                i = rows.index(gone)
                del rows[i], counts[i]
            pool.allocator.free(gone.pages)
        if step % 9 == 4:  # a prefill-only step (enable_mixed_chunk=False): the decodes wait
            keep = [i for i, n in enumerate(counts) if n > 1 and rows[i].length == 0]
            rows, counts = [rows[i] for i in keep], [counts[i] for i in keep]
            if not rows:
                continue
        order = list(range(len(rows)))
        rng.shuffle(order)  # the scheduler's row order changes from step to step
        rows = [rows[i] for i in order]
        counts = [counts[i] for i in order]
        run_step([mirrored, plain], pool, rows, counts, hq, hkv, page_size)
        buckets = mirrored.mirror.buckets
        if buckets:
            if all(b.gather_slots is None for b in buckets):
                continued += 1
            else:
                builds += 1
    # the mirror did carry most steps, and was rebuilt when it had to be
    assert continued > 20 and builds > 5, (continued, builds)
    assert successors >= 1


def test_engine_gives_mirror_back_when_idle(tmp_path):
    """After a batch the engine goes idle and the decode mirror's buffers are dropped."""
    import time

    from tiny_models import make_tiny_model

    from pipeline_infer import Engine

    directory, _ = make_tiny_model(str(tmp_path), "llama")
    with Engine(directory, page_size=1) as llm:
        mirror = llm._runner.attn_backend.mirror
        kept = []
        plan = mirror.plan

        def spy(*args, **kwargs):  # record that decode steps did run on the mirror
            out = plan(*args, **kwargs)
            kept.append(bool(mirror.buckets))
            return out

        mirror.plan = spy
        outs = llm.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params={"max_new_tokens": 8, "temperature": 0})
        assert all(len(o["output_ids"]) == 8 for o in outs)
        assert any(kept)
        deadline = time.monotonic() + 5
        while mirror.buckets and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mirror.buckets == []


def test_a_step_without_decodes_keeps_the_mirror():
    from pipeline_infer.kernels.attention.decode_mirror import DecodeMirror

    mirror = DecodeMirror(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    k_flat, v_flat = torch.randn(64, 1, 4), torch.randn(64, 1, 4)
    slots = list(range(10, 40))  # the one sequence's slot at each position
    lens = [5]

    def plan():
        return mirror.plan([[0]], lens, lambda b, pos: slots[pos],
                           lambda rows, n: torch.tensor([[slots[p] if p < lens[0] else 0 for p in range(n)]]))

    def forward(planned):
        (rows, mb), = planned
        new = k_flat[slots[lens[0] - 1]].view(1, 1, 4)
        DecodeMirror.update(mb, 0, k_flat, v_flat, new, new)
        return mb

    assert forward(plan()).gather_slots is not None  # first decode step: gathered
    assert mirror.plan([], [], None, None) is None  # a prefill-only step: no decodes here
    lens[0] += 1
    mb = forward(plan())
    assert mb.gather_slots is None  # continued: the held rows were still valid
    torch.testing.assert_close(mb.k[0][0, :6], k_flat[slots[:6]])


def test_a_prefill_into_a_held_rows_slot_drops_the_mirror():
    """A finished row's newest slot, freed and written by a prefill while decodes paused, must not
    let the prefilled request's first decode pass for that row's continuation."""
    from pipeline_infer.kernels.attention.decode_mirror import DecodeMirror

    mirror = DecodeMirror(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    k_flat = torch.randn(64, 1, 4)
    old = list(range(10, 15))  # the finished request's slots; its newest is 14
    new = [20, 21, 22, 23, 14, 30]  # a later request of one token more, whose 5th token got slot 14

    def plan(slots, n):
        return mirror.plan([[0]], [n], lambda b, pos: slots[pos],
                           lambda rows, m: torch.tensor([[slots[p] if p < n else 0 for p in range(m)]]),
                           written=lambda: [])

    (rows, mb), = plan(old, 5)
    DecodeMirror.update(mb, 0, k_flat, k_flat, k_flat[14].view(1, 1, 4), k_flat[14].view(1, 1, 4))
    assert mirror.plan([], [], None, None, written=lambda: [20, 21, 22, 23, 14]) is None  # the prefill
    assert mirror.buckets == []
    (rows, mb), = plan(new, 6)
    assert mb.gather_slots is not None  # gathered afresh, not continued from the finished row
