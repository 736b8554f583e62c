"""Dense copies of the running decodes' K/V, kept from one decode step to the next (CPU).

Plain torch cannot attend over a paged cache without first gathering each sequence's K/V
rows into a padded dense tensor, and on a CPU that gather costs a sixth of a decode step
(SmolLM2-135M, 32 sequences), every layer of every step. Yet between two decode steps of
the same running requests the gathered tensors differ by one new row per sequence. The
mirror keeps them: per bucket of sequences, per layer, a [G, cap, Hkv, D] buffer with
`cap - len` rows of slack, and each step only writes the new token's K/V into it.

A row is recognised across steps by the slot of its newest token. No two running requests
hold the same slot, and a slot a finished request gave to the radix cache can only come
back as the prefix of a request with the same tokens, hence the same K/V. A step reuses
the mirror when every decode row continues one of its rows by exactly one token within the
slack, in any order; a bucket that lost rows (finished, retracted) is compacted once, and
rows new to the decodes get a bucket of their own. A row out of slack, too many buckets or
an interrupted step make the next step gather afresh, which costs what the gather always
cost. The paged pool stays the source of truth: every new K/V still goes into its slot, so
prefix sharing, preemption and the radix cache never see the mirror.

Measured (benchmarks/cpu_vs_hf.py workload, 2-core CPU): a 32-sequence decode step of
SmolLM2-135M went from about 139 to 123 ms. Attention then reads the buffers from memory
instead of freshly gathered (cache-warm) copies, so it gets slower by part of what the
gather cost; the step still saves about a tenth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Rows of slack per buffer: a bucket is gathered afresh once per this many decode steps.
SLACK_TOKENS = 64
# Upper bound on the mirror's memory (all layers, K and V); above it decodes gather per step.
MAX_MIRROR_BYTES = 1 << 30
# Buckets kept before newcomers force a fresh split by length (each bucket is one SDPA call).
MAX_BUCKETS = 8


@dataclass
class MirrorBucket:
    """One bucket's dense K/V for every layer, and what the current step does to it."""

    keys: list[int]  # per row: slot of the row's newest token, its identity across steps
    lens: list[int]  # per row: tokens held, this step's included
    cap: int  # tokens each row has room for
    k: list[torch.Tensor | None]  # per layer [G, cap, Hkv, D]
    v: list[torch.Tensor | None]
    applied: list[int]  # per layer: the last step whose action it applied
    step: int = 0  # the step this plan is for
    gather_slots: torch.Tensor | None = None  # [G * cap]: build every layer from the pool
    keep_rows: torch.Tensor | None = None  # rows of the old buffers that continue (others finished)
    append_rows: torch.Tensor | None = None  # [G]: 0..G-1, the rows receiving this step's K/V
    append_pos: torch.Tensor | None = None  # [G]: where this step's K/V goes in each row


class DecodeMirror:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.num_layers = num_layers
        elem = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = 2 * num_layers * num_kv_heads * head_dim * elem  # one token, all layers, K and V
        self.buckets: list[MirrorBucket] = []
        self.step = 0

    def reset(self) -> None:
        """Drop every buffer (the engine went idle: nothing to continue, memory to give back)."""
        self.buckets = []

    def plan(
        self,
        buckets: list[list[int]],
        seq_lens: list[int],
        slot_at: Callable[[int, int], int],
        slot_table: Callable[[list[int], int], torch.Tensor],
        written: Callable[[], list[int]] | None = None,
    ) -> list[tuple[list[int], MirrorBucket]] | None:
        """This step's decode rows as (rows in buffer order, bucket); None: gather as usual.

        buckets: fresh length buckets of the decode rows (batch indices), used when the mirror
        cannot continue. seq_lens[b]: row b's tokens including this step's. slot_at(b, pos):
        the cache slot of row b's token at pos. slot_table(rows, n): [len(rows), n] slots,
        padded with the scratch slot 0 past each row's length. written(): the slots this step
        writes (asked for only on a step without decodes).
        """
        self.step += 1
        rows = [b for bucket in buckets for b in bucket]
        if not rows:
            # A step without decodes (prefills only): the rows held stay valid for the next
            # decode step, unless this step writes a slot one of them is known by. That is a
            # request that finished, its slots freed and handed to a prefill, whose own
            # decodes could otherwise be taken for the finished row's continuation.
            if self.buckets and written is not None:
                keys = {key for mb in self.buckets for key in mb.keys}
                if any(s in keys for s in written()):
                    self.buckets = []
            return None
        planned = self._continue(rows, seq_lens, slot_at, slot_table)
        if planned is None:
            planned = self._build(buckets, seq_lens, slot_table)
        for batch_rows, mb in planned or []:
            mb.step = self.step
            mb.keys = [slot_at(b, seq_lens[b] - 1) for b in batch_rows]
        self.buckets = [mb for _, mb in planned or []]
        return planned

    def _continue(self, rows, seq_lens, slot_at, slot_table):
        """The current buckets re-pointed at this step's rows (plus one new bucket for newcomers)."""
        if not self.buckets or any(a != mb.step for mb in self.buckets for a in mb.applied):
            return None  # nothing kept, or a step stopped part way through the layers
        where = {key: (i, r) for i, mb in enumerate(self.buckets) for r, key in enumerate(mb.keys)}
        members: list[list[tuple[int, int]]] = [[] for _ in self.buckets]  # (row in buffer, batch row)
        newcomers = []
        for b in rows:
            hit = where.get(slot_at(b, seq_lens[b] - 2)) if seq_lens[b] >= 2 else None
            if hit is None:
                newcomers.append(b)  # joined the decodes this step (or a one-token chunk)
                continue
            i, r = hit
            mb = self.buckets[i]
            if seq_lens[b] != mb.lens[r] + 1 or seq_lens[b] > mb.cap:
                return None  # not exactly one token on, or out of slack: start over
            members[i].append((r, b))
        planned = []
        for mb, mine in zip(self.buckets, members):
            if not mine:
                continue  # every sequence of this bucket finished: drop its buffers
            mine.sort()
            old_rows = [r for r, _ in mine]
            batch_rows = [b for _, b in mine]
            mb.keep_rows = torch.tensor(old_rows) if len(old_rows) < len(mb.lens) else None
            mb.gather_slots = None
            mb.lens = [seq_lens[b] for b in batch_rows]
            mb.append_rows = torch.arange(len(batch_rows))  # once per step, not per layer
            mb.append_pos = torch.tensor(mb.lens) - 1
            planned.append((batch_rows, mb))
        if newcomers:
            if len(planned) >= MAX_BUCKETS:
                return None  # too fragmented: re-bucket everything by length
            held = sum(len(mb.lens) * mb.cap for _, mb in planned)
            fresh = self._build([newcomers], seq_lens, slot_table, held)
            if fresh is None:
                return None
            planned += fresh
        return planned

    def _build(self, buckets, seq_lens, slot_table, held_rows: int = 0):
        """Fresh buckets, gathered from the pool; None when they would exceed the memory bound."""
        caps = [max(seq_lens[b] for b in bucket) + SLACK_TOKENS for bucket in buckets]
        if (held_rows + sum(len(b) * c for b, c in zip(buckets, caps))) * self.row_bytes > MAX_MIRROR_BYTES:
            return None
        return [
            (
                bucket,
                MirrorBucket(
                    keys=[],
                    lens=[seq_lens[b] for b in bucket],
                    cap=cap,
                    k=[None] * self.num_layers,
                    v=[None] * self.num_layers,
                    applied=[0] * self.num_layers,
                    gather_slots=slot_table(bucket, cap).reshape(-1),
                ),
            )
            for bucket, cap in zip(buckets, caps)
        ]

    @staticmethod
    def update(
        mb: MirrorBucket,
        layer_id: int,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring one layer's buffers up to this step (the pool already holds its K/V); return them.

        k_new / v_new: [G, Hkv, D], this step's K/V of the bucket's rows in buffer order.
        """
        if mb.gather_slots is not None:
            G, n = len(mb.lens), mb.gather_slots.numel()
            kb = k_flat.new_empty((G, mb.cap) + tuple(k_flat.shape[1:]))
            vb = v_flat.new_empty(kb.shape)
            torch.index_select(k_flat, 0, mb.gather_slots.to(k_flat.device), out=kb.view(n, *k_flat.shape[1:]))
            torch.index_select(v_flat, 0, mb.gather_slots.to(v_flat.device), out=vb.view(n, *v_flat.shape[1:]))
        else:
            kb, vb = mb.k[layer_id], mb.v[layer_id]
            if mb.keep_rows is not None:
                kb, vb = kb.index_select(0, mb.keep_rows), vb.index_select(0, mb.keep_rows)
            kb[mb.append_rows, mb.append_pos] = k_new.to(kb.dtype)
            vb[mb.append_rows, mb.append_pos] = v_new.to(vb.dtype)
        mb.k[layer_id], mb.v[layer_id] = kb, vb
        mb.applied[layer_id] = mb.step
        return kb, vb
