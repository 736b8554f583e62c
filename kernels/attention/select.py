"""Choose the default attention backend by timing the candidates on this device.

`attention_backend=None` means "the fastest one here". Which that is depends on the GPU, the
model's head layout and the page size, so we measure instead of guessing: each available
backend runs a decode batch (64 sequences of 1024 tokens) and a prefill batch (4 chunks of
512 new tokens over 512 cached ones) on one layer of random paged KV, and the lowest total
median time wins. The result is kept in a JSON file in the user cache, keyed by device,
shapes and library versions, so only the first engine start on a machine pays for it (about
a second, plus FlashInfer's one-time JIT build when it is installed).

The candidates are the GPU backends (`triton`, `flashinfer`); `torch`, the reference, is the
choice only where neither can run. One layer's attention time does not show what a backend
costs a run: on an H200 with Qwen2.5-0.5B's heads, torch's layer timed 0.37 ms against
Triton's 0.45 at page size 16 (0.29 against 0.28 at page size 1), but a whole run with it is
over ten times slower (no decode CUDA graphs, no cascade, its per-sequence work): the
shared-prefix workload took 14-50 s a run against 1.1 s, random 22-125 s against 2.9 s
(docs/benchmarks.md, seventeenth session). Timed in with the others, it was chosen.

The CPU always uses `torch` (Triton kernels need a GPU; FlashInfer is CUDA-only).
"""

from __future__ import annotations

import json
import logging
import os
import statistics

import torch

from pipeline_infer.cache.kv_pool import KVPool
from pipeline_infer.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

DECODE_BATCH, DECODE_CONTEXT = 64, 1024
PREFILL_SEQS, PREFILL_CACHED, PREFILL_NEW = 4, 512, 512


def available_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["torch"]
    names = ["torch"]
    try:
        import triton  # noqa: F401

        names.append("triton")
    except ImportError:
        pass
    try:
        import flashinfer  # noqa: F401

        names.append("flashinfer")
    except ImportError:
        pass
    return names


def _cache_file() -> str:
    root = os.environ.get("PIPELINE_INFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pipeline_infer")
    return os.path.join(root, "attention_backend_choice.json")


def _key(device, num_q_heads, num_kv_heads, head_dim, page_size, dtype, names) -> str:
    versions = []
    for mod in ("triton", "flashinfer"):
        try:
            versions.append(f"{mod}={__import__(mod).__version__}")
        except Exception:
            pass
    return "|".join(
        [torch.cuda.get_device_name(device), f"torch={torch.__version__}", *versions,
         f"heads={num_q_heads}/{num_kv_heads}", f"d={head_dim}", f"page={page_size}", str(dtype), ",".join(names)]
    )


def fastest_backend(
    device: torch.device, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype
) -> str:
    names = [n for n in available_backends(device) if n != "torch"]  # torch: the fallback (module doc)
    if not names:
        return "torch"
    # The key names the timed candidates: a choice remembered from when torch was timed too
    # (its key listed "torch,...") is not read back.
    key = _key(device, num_q_heads, num_kv_heads, head_dim, page_size, dtype, names)
    path = _cache_file()
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["choice"]
    times = {}
    for name in names:
        try:
            times[name] = time_backend(name, device, num_q_heads, num_kv_heads, head_dim, page_size, dtype)
        except Exception as e:  # a backend that cannot run this shape is simply not chosen
            logger.info("attention backend %s not usable here: %s", name, e)
    choice = min(times, key=times.get) if times else "torch"
    logger.info("attention backend timings (ms): %s -> %s", times, choice)
    known[key] = {"choice": choice, "ms": times}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
    return choice


def make_backend(name: str, pool: KVPool, num_q_heads: int, num_kv_heads: int, head_dim: int, **kwargs):
    if name == "torch":
        from pipeline_infer.kernels.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim)
    if name == "triton":
        from pipeline_infer.kernels.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        from pipeline_infer.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(pool, num_q_heads, num_kv_heads, head_dim, **kwargs)
    raise ValueError(f"attention_backend must be 'torch', 'triton' or 'flashinfer', got {name!r}")


def _batch(pool: KVPool, prefix_lens: list[int], extend_lens: list[int], gen: torch.Generator) -> ForwardBatch:
    ps, dev = pool.page_size, pool.device
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    max_pages = max(-(-n // ps) for n in seq_lens)
    perm = 1 + torch.randperm(pool.allocator.capacity, generator=gen)
    table = perm[: len(seq_lens) * max_pages].view(len(seq_lens), max_pages).to(torch.int32)
    slots, positions = [], []
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        pos = torch.arange(p, p + e)
        slots.append(table[b].long()[pos // ps] * ps + pos % ps)
        positions.append(pos)
    t = sum(extend_lens)
    return ForwardBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=dev),
        positions=torch.cat(positions).to(dev),
        extend_lens=extend_lens,
        prefix_lens=prefix_lens,
        page_table=table.to(dev),
        page_table_host=table.numpy(),
        out_cache_loc=torch.cat(slots).to(dev),
        logits_indices=torch.zeros(1, dtype=torch.long, device=dev),
    )


@torch.inference_mode()
def time_backend(
    name: str, device, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype, reps: int = 20
) -> float:
    """Median milliseconds of one layer's attention: a decode batch plus a prefill batch."""
    tokens = max(DECODE_BATCH * DECODE_CONTEXT, PREFILL_SEQS * (PREFILL_CACHED + PREFILL_NEW))
    pool = KVPool(1, tokens // page_size + 2 * DECODE_BATCH + 2, page_size, num_kv_heads, head_dim, dtype, device)
    gen = torch.Generator().manual_seed(0)
    pool.k_cache[0].normal_()
    pool.v_cache[0].normal_()
    backend = make_backend(name, pool, num_q_heads, num_kv_heads, head_dim)
    total = 0.0
    for prefix, extend in (
        ([DECODE_CONTEXT - 1] * DECODE_BATCH, [1] * DECODE_BATCH),
        ([PREFILL_CACHED] * PREFILL_SEQS, [PREFILL_NEW] * PREFILL_SEQS),
    ):
        fb = _batch(pool, prefix, extend, gen)
        backend.plan(fb)
        t = fb.num_tokens
        q = torch.randn(t, num_q_heads, head_dim, device=device, dtype=dtype)
        k = torch.randn(t, num_kv_heads, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        scale = head_dim**-0.5
        for _ in range(3):  # compile / JIT, then warm
            backend.forward(q, k, v, 0, fb, scale)
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backend.forward(q, k, v, 0, fb, scale)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        total += statistics.median(samples)
    return total
