"""Paged decode attention: our Triton kernel against FlashInfer on the same inputs, one run.

For each shape, both kernels read the same bf16 paged KV cache (random pages, shuffled so
sequences are not contiguous) and the same queries; outputs are checked against each other
and against a torch reference before timing. Times are medians over many launches
(triton.testing.do_bench, L2 flushed between launches), and the achieved KV read bandwidth
is reported next to the device's measured copy bandwidth.

    python benchmarks/attention_kernels.py [--json out.json]
    python benchmarks/attention_kernels.py --sweep   # our kernel's launch settings, fastest first
    python benchmarks/attention_kernels.py --sweep --shapes 512x600x14x2x64x1,1024x600x14x2x64x1

Needs a CUDA device; FlashInfer is optional (without it only our kernel is timed).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from pipeline_infer.kernels.triton.decode_attention import (
    choose_num_kv_splits,
    decode_attention,
    default_launch,
)
from pipeline_infer.kernels.triton.launch import device_num_sms

# (batch, context, q heads, kv heads, head dim, page size): the two shapes, then more.
SHAPES = [
    (256, 1024, 14, 2, 64, 16),  # Qwen2.5-0.5B
    (128, 1024, 32, 8, 128, 16),  # Llama-3.1-8B
    (64, 4096, 14, 2, 64, 16),
    (32, 8192, 32, 8, 128, 16),
    (256, 1024, 14, 2, 64, 1),
]


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second (median of do_bench)."""
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * n / (ms * 1e-3)


def make_inputs(batch, context, hq, hkv, d, ps, device, gen):
    pages_per_seq = math.ceil(context / ps)
    num_pages = batch * pages_per_seq + 1
    k = torch.randn(num_pages, ps, hkv, d, generator=gen, device=device).to(torch.bfloat16)
    v = torch.randn(num_pages, ps, hkv, d, generator=gen, device=device).to(torch.bfloat16)
    perm = torch.randperm(num_pages - 1, generator=gen, device=device) + 1
    table = perm[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, d, generator=gen, device=device).to(torch.bfloat16)
    return q, k, v, table, lens


def reference(q, k, v, table, lens, scale, rows=8):
    """fp32 attention for the first `rows` sequences (enough to catch a wrong kernel)."""
    outs = []
    group = q.shape[1] // k.shape[2]
    for b in range(rows):
        n = int(lens[b])
        pages = table[b, : math.ceil(n / k.shape[1])].long()
        kb = k[pages].reshape(-1, k.shape[2], k.shape[3])[:n].float().repeat_interleave(group, 1)
        vb = v[pages].reshape(-1, v.shape[2], v.shape[3])[:n].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), kb) * scale
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vb))
    return torch.stack(outs)


def flashinfer_decode(q, k, v, table, lens, tensor_cores: bool):
    import flashinfer

    batch, hq, d = q.shape
    ps, hkv = k.shape[1], k.shape[2]
    npages = (lens + ps - 1) // ps
    indptr = torch.zeros(batch + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(npages.cpu(), 0)
    indices = torch.cat([table[b, : int(npages[b])] for b in range(batch)])
    last = (lens - (npages - 1) * ps).cpu().to(torch.int32)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=q.device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=q.dtype, kv_data_type=k.dtype)
    out = torch.empty_like(q)
    return lambda: w.run(q, (k, v), out=out), out


def _shapes(text: str) -> list[tuple[int, ...]]:
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 6 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"shape {item!r}: expected batch x context x q heads x kv heads x head dim x page size, e.g. 512x600x14x2x64x1")
        out.append(tuple(int(p) for p in parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per variant")
    ap.add_argument("--sweep", action="store_true",
                    help="time our kernel over splits x block_n x num_warps x num_stages instead")
    ap.add_argument("--shapes", type=_shapes, default=None,
                    help="sweep these instead, e.g. 512x600x14x2x64x1,1024x600x14x2x64x1 "
                         "(batch x context x q heads x kv heads x head dim x page size)")
    args = ap.parse_args()
    from triton.testing import do_bench

    if args.sweep:
        return sweep(args)

    device = torch.device("cuda")
    try:
        import flashinfer  # noqa: F401

        have_fi = True
    except ImportError:
        have_fi = False
    bw = copy_bandwidth(device)
    sms = device_num_sms(device)
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, flashinfer {have_fi}")
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "copy_bandwidth_Bps": bw, "shapes": []}
    gen = torch.Generator(device=device).manual_seed(0)
    header = f"{'batch':>5} {'ctx':>5} {'hq/hkv':>6} {'d':>4} {'ps':>3} | {'variant':<22} {'us':>8} {'TB/s':>6} {'%copy':>6} {'err':>8}"
    print(header)
    for batch, context, hq, hkv, d, ps in SHAPES:
        q, k, v, table, lens = make_inputs(batch, context, hq, hkv, d, ps, device, gen)
        scale = d**-0.5
        expected = reference(q, k, v, table, lens, scale)
        kv_bytes = 2 * batch * context * hkv * d * 2  # K and V, bf16
        splits = choose_num_kv_splits(batch, hkv, context, sms)
        ours_out = torch.full_like(q, float("nan"))
        variants = {f"triton (splits={splits})": (lambda: decode_attention(q, k, v, table, lens, scale, splits, out=ours_out), ours_out)}
        if have_fi:
            for tc in (False, True):
                try:
                    variants[f"flashinfer ({'tensor' if tc else 'cuda'} cores)"] = flashinfer_decode(q, k, v, table, lens, tc)
                except Exception as e:  # a group size the CUDA-core kernel is not built for
                    print(f"  flashinfer tensor_cores={tc}: {type(e).__name__}: {str(e)[:120]}")
        row = {"batch": batch, "context": context, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "page_size": ps, "variants": {}}
        for name, (fn, out) in variants.items():
            fn()
            torch.cuda.synchronize()
            err = ((out[:8].float() - expected).norm() / expected.norm()).item()
            ms = do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median")
            tbs = kv_bytes / (ms * 1e-3) / 1e12
            row["variants"][name] = {"us": ms * 1e3, "TBps": tbs, "rel_err": err}
            print(f"{batch:>5} {context:>5} {hq:>3}/{hkv:<2} {d:>4} {ps:>3} | {name:<22} {ms * 1e3:>8.1f} {tbs:>6.2f} {100 * tbs * 1e12 / bw:>5.0f}% {err:>8.1e}")
            assert err < 2e-2, f"{name} disagrees with the reference: {err}"
        fi = [r["us"] for n, r in row["variants"].items() if n.startswith("flashinfer")]
        if fi:
            ours = next(r["us"] for n, r in row["variants"].items() if n.startswith("triton"))
            row["ours_over_best_flashinfer"] = ours / min(fi)
            print(f"{'':>27} ours / best FlashInfer = {ours / min(fi):.2f}x")
        results["shapes"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


SWEEP_SHAPES = [
    (256, 1024, 14, 2, 64, 16),
    (256, 512, 14, 2, 64, 16),
    (128, 1024, 32, 8, 128, 16),
]


def sweep(args) -> None:
    """Every launch setting of our decode kernel on the model shapes; checked, then timed."""
    import itertools

    from triton.testing import do_bench

    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    sms = device_num_sms(device)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs")
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "copy_bandwidth_Bps": bw, "sweeps": []}
    for batch, context, hq, hkv, d, ps in args.shapes or SWEEP_SHAPES:
        q, k, v, table, lens = make_inputs(batch, context, hq, hkv, d, ps, device, gen)
        scale = d**-0.5
        expected = reference(q, k, v, table, lens, scale)
        kv_bytes = 2 * batch * context * hkv * d * 2
        default_splits = choose_num_kv_splits(batch, hkv, context, sms)
        out = torch.empty_like(q)
        rows = []
        for splits, block_n, warps, stages in itertools.product((1, 2, 4, 8), (32, 64, 128), (2, 4, 8), (1, 2, 3)):
            def fn():
                decode_attention(q, k, v, table, lens, scale, splits, out=out,
                                 block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:  # e.g. out of shared memory for a big tile
                print(f"  skip splits={splits} n={block_n} w={warps} s={stages}: {type(e).__name__}")
                continue
            err = ((out[:8].float() - expected).norm() / expected.norm()).item()
            assert err < 2e-2, f"splits={splits} n={block_n} w={warps} s={stages}: error {err}"
            us = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median") * 1e3
            rows.append({"splits": splits, "block_n": block_n, "num_warps": warps, "num_stages": stages,
                         "us": us, "TBps": kv_bytes / (us * 1e-6) / 1e12})
        rows.sort(key=lambda r: r["us"])
        default_setting = (default_splits, *default_launch(d))  # decode_attention's
        default = next((r for r in rows if (r["splits"], r["block_n"], r["num_warps"], r["num_stages"])
                        == default_setting), None)
        print(f"batch {batch} ctx {context} heads {hq}/{hkv} d {d} page {ps}: current default "
              f"{default['us'] if default else float('nan'):.1f} us (splits={default_splits})")
        for r in rows[:8]:
            print(f"   splits={r['splits']} block_n={r['block_n']:>3} warps={r['num_warps']} stages={r['num_stages']}"
                  f"  {r['us']:7.1f} us  {r['TBps']:.2f} TB/s")
        results["sweeps"].append({"shape": [batch, context, hq, hkv, d, ps], "default_splits": default_splits,
                                  "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
