"""Cascade (shared-prefix) decode attention by its pieces, against plain decode attention, on a GPU.

For each shape (groups x rows a group sharing a prefix, plus rows in no group, each row's own
keys after the prefix drawn from a range), one layer as the engine runs it (bf16 paged cache,
page size 16, the step's rotary and K/V store fused in, the work list laid out as
pipeline_infer/shared_prefix.py does) and times, inside a CUDA graph of 20 calls (device time
per call, median of 15 replays):

- own:     the own-keys pass (the split decode kernel from each row's prefix on)
- prefix:  the prefix pass (shared_prefix_attention._launch_prefix)
- merge:   the merge of both passes' partial results
- one stream / side stream: the whole cascade, the prefix pass after the own-keys pass or beside
  it on a second stream (the engine's default; launched first or second as prefix_pass_first says)
- plain:   decode_attention over each row's whole sequence, at 1, 2 and 4 splits

The cascade's output is checked against plain decode attention before timing. The prefix
pass's grid is sized as a decode graph of that many rows sizes it (the finder's max_items)
with the graph's split count (at most GRAPH_MAX_PREFIX_SPLITS).

    python benchmarks/cascade_attention.py [--shapes 32x32:40-200,32x16:150-400+64] [--json out.json]

A shape is GROUPSxROWS:LO-HI[+UNGROUPED]. Qwen2.5-0.5B's heads (14 query, 2 kv, head_dim 64)
and 1,024-key prefixes unless --heads / --prefix say otherwise. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from linear_kernels import graph_time_us as _graph_time_us  # benchmarks/, next to this file

from pipeline_infer.kernels.attention.triton_backend import GRAPH_MAX_PREFIX_SPLITS
from pipeline_infer.kernels.triton.decode_attention import (
    DecodeRope,
    _launch_settings,
    choose_num_kv_splits,
    decode_attention,
    launch_decode_merge,
    launch_decode_split,
    split_buffers,
)
from pipeline_infer.kernels.triton.launch import device_num_sms
from pipeline_infer.kernels.triton.shared_prefix_attention import (
    ITEM_FIELDS,
    SharedPrefix,
    _launch_prefix,
    choose_prefix_splits,
    own_keys_warps,
    rows_per_item,
    shared_prefix_decode_attention,
)
from pipeline_infer.shared_prefix import SharedPrefixFinder


PAGE_SIZE = 16
DEFAULT_SHAPES = "32x32:40-200,32x32:150-400,32x16:40-200,32x8:150-400,32x27:150-400+160,8x8:150-400"


def graph_time_us(fn) -> float:
    """Device us per fn() inside a CUDA graph of 20 calls, median of 15 replays."""
    return _graph_time_us(fn, calls=20, repeats=15)


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """GROUPSxROWS:LO-HI[+UNGROUPED] -> (groups, rows a group, own keys lo, hi, ungrouped rows)."""
    head, _, extra = text.partition("+")
    sizes, _, own = head.partition(":")
    groups, rows = (int(x) for x in sizes.split("x"))
    lo, hi = (int(x) for x in own.split("-"))
    return groups, rows, lo, hi, int(extra or 0)


def make_layer(groups, rows, own_lo, own_hi, ungrouped, prefix, hq, hkv, d, gen, device):
    """Paged bf16 K/V, queries, the step's rope inputs and the cascade's work list for one layer."""
    batch = groups * rows + ungrouped
    own = torch.randint(own_lo, own_hi + 1, (batch,), generator=gen)
    prefix_pages = prefix // PAGE_SIZE
    width = prefix_pages + -(-own_hi // PAGE_SIZE) + 1
    table = torch.zeros(batch, width, dtype=torch.int32)
    nxt = 1  # page 0 stays unused, as the pool's scratch
    for g in range(groups):  # a group's rows share its prefix pages
        table[g * rows : (g + 1) * rows, :prefix_pages] = torch.arange(nxt, nxt + prefix_pages, dtype=torch.int32)
        nxt += prefix_pages
    for b in range(groups * rows, batch):  # in no group: a prefix of its own, read by the own-keys pass
        table[b, :prefix_pages] = torch.arange(nxt, nxt + prefix_pages, dtype=torch.int32)
        nxt += prefix_pages
    for b in range(batch):
        n = -(-int(own[b]) // PAGE_SIZE)
        table[b, prefix_pages : prefix_pages + n] = torch.arange(nxt, nxt + n, dtype=torch.int32)
        nxt += n
    k_cache = torch.randn(nxt, PAGE_SIZE, hkv, d, generator=gen).to(device, torch.bfloat16)
    v_cache = torch.randn(nxt, PAGE_SIZE, hkv, d, generator=gen).to(device, torch.bfloat16)
    seq_lens = (prefix + own).to(torch.int32).to(device)
    table = table.to(device)
    positions = (seq_lens - 1).long()
    slots = table.gather(1, (positions // PAGE_SIZE).unsqueeze(1)).squeeze(1).long() * PAGE_SIZE + positions % PAGE_SIZE
    rope = DecodeRope(
        torch.randn(batch, hkv, d, generator=gen).to(device, torch.bfloat16),
        torch.randn(batch, hkv, d, generator=gen).to(device, torch.bfloat16),
        positions,
        torch.randn(prefix + own_hi + 1, d, generator=gen).to(device),
        slots,
    )
    q = torch.randn(batch, hq, d, generator=gen).to(device, torch.bfloat16)
    # The work list as the engine lays it out (SharedPrefixFinder._layout), in a grid sized as
    # the engine's decode graph of `batch` rows sizes it (groups of 8 rows or more), or larger
    # when this shape has smaller groups than the engine would plan.
    finder = SharedPrefixFinder(PAGE_SIZE, rows_per_item(hq, hkv, d), max_groups=64, min_saving=0.0, min_group_rows=8)
    groups_rows = [(0, list(range(g * rows, (g + 1) * rows)), prefix) for g in range(groups)]
    plan = finder._layout(batch, groups_rows, seq_lens.tolist())
    kv_starts, order, items = (plan.kv_starts, plan.rows, plan.items) if plan is not None else ([0] * batch, [], [])
    grid_items = max(len(items) // ITEM_FIELDS, finder.max_items(batch))
    item_table = torch.zeros(grid_items, ITEM_FIELDS, dtype=torch.int32)
    if items:
        item_table[: len(items) // ITEM_FIELDS] = torch.tensor(items, dtype=torch.int32).view(-1, ITEM_FIELDS)
    shared_ints = (
        torch.tensor(kv_starts, dtype=torch.int32),
        torch.tensor(order + [0] * (batch - len(order)), dtype=torch.int32),
        item_table,
        torch.tensor([len(items) // ITEM_FIELDS], dtype=torch.int32),
    )
    return q, k_cache, v_cache, table, seq_lens, rope, tuple(t.to(device) for t in shared_ints)


def measure(shape, prefix, hq, hkv, d, device) -> dict:
    groups, rows, lo, hi, ungrouped = shape
    gen = torch.Generator().manual_seed(hash(shape) & 0xFFFF)
    q, k_cache, v_cache, table, seq_lens, rope, shared_ints = make_layer(
        groups, rows, lo, hi, ungrouped, prefix, hq, hkv, d, gen, device
    )
    batch, sms = q.shape[0], device_num_sms(device)
    splits = min(GRAPH_MAX_PREFIX_SPLITS, choose_prefix_splits(max(1, batch // rows_per_item(hq, hkv, d)), hkv, 32768, sms))
    shared = SharedPrefix(*shared_ints, splits)
    own_splits = choose_num_kv_splits(batch, hkv, 32768, sms)
    scale = d**-0.5
    side = torch.cuda.Stream(device)
    out, want = torch.empty_like(q), torch.empty_like(q)
    # Correctness first: the cascade equals plain decode attention (each with its own K/V store
    # of the step's token, the same values into the same slots).
    shared_prefix_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, shared, own_splits, out=out, rope=rope,
                                   side_stream=side)
    decode_attention(q, k_cache, v_cache, table, seq_lens, scale, own_splits, out=want, rope=rope)
    torch.cuda.synchronize()
    err = (out.float() - want.float()).abs().max().item()
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2, msg=f"shape {shape}: cascade != plain")
    part, lse = split_buffers(q, own_splits + splits)
    block_n, warps, stages = _launch_settings(d, None, own_keys_warps(d), None)
    res = {
        "own": graph_time_us(lambda: launch_decode_split(
            q, k_cache, v_cache, table, seq_lens, scale, part, lse, own_splits, rope,
            kv_starts=shared.kv_starts, block_n=block_n, num_warps=warps, num_stages=stages)),
        "prefix": graph_time_us(lambda: _launch_prefix(q, k_cache, v_cache, table, scale, shared, part, lse, own_splits, rope)),
        "merge": graph_time_us(lambda: launch_decode_merge(part, lse, out, own_splits + splits, kv_starts=shared.kv_starts,
                                                           num_own_splits=own_splits)),
        "one stream": graph_time_us(lambda: shared_prefix_decode_attention(
            q, k_cache, v_cache, table, seq_lens, scale, shared, own_splits, out=out, rope=rope)),
        "side stream": graph_time_us(lambda: shared_prefix_decode_attention(
            q, k_cache, v_cache, table, seq_lens, scale, shared, own_splits, out=out, rope=rope, side_stream=side)),
    }
    for n in (1, 2, 4):
        res[f"plain {n}"] = graph_time_us(lambda: decode_attention(q, k_cache, v_cache, table, seq_lens, scale, n, out=want,
                                                                   rope=rope))
    return {"shape": f"{groups}x{rows}:{lo}-{hi}+{ungrouped}", "rows": batch, "prefix": prefix, "prefix_splits": splits,
            "own_splits": own_splits, "max_abs_err": err, "us": {k: round(v, 2) for k, v in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated GROUPSxROWS:LO-HI[+UNGROUPED]")
    ap.add_argument("--prefix", type=int, default=1024, help="shared prefix length (a multiple of 16)")
    ap.add_argument("--heads", default="14,2,64", help="query heads, kv heads, head_dim")
    ap.add_argument("--json", default=None, help="write the results (a JSON list) here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    if args.prefix % PAGE_SIZE:
        raise SystemExit(f"--prefix must be a multiple of {PAGE_SIZE}, got {args.prefix}")
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    device = torch.device("cuda")
    results = []
    print(f"{torch.cuda.get_device_name(device)}, heads {hq}/{hkv}/{d}, prefix {args.prefix}, us per layer "
          f"(CUDA graph of 20 calls, median of 15 replays)")
    for text in args.shapes.split(","):
        r = measure(parse_shape(text), args.prefix, hq, hkv, d, device)
        results.append(r)
        print(f"  {r['shape']:<22} rows {r['rows']:>5}  " + "  ".join(f"{k} {v:.1f}" for k, v in r["us"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r, "device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d")}
                       for r in results], f, indent=1)


if __name__ == "__main__":
    main()
