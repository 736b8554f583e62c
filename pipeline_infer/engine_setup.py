"""Build an engine's parts from its config: device, weights, tokenizer, runner, scheduler, core.

Kept apart from engine.py so the front end stays about the API and this file about
the one-time decisions (which device, which dtype, how long a context, which backend).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline_infer.config import EngineConfig
from pipeline_infer.engine_core import EngineCore
from pipeline_infer.model_runner import ModelRunner
from pipeline_infer.scheduler import Scheduler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Decode steps a window runs by default (config.num_scheduler_steps). Rows finishing inside a
# window compute up to this many - 1 dropped steps; a window's host work is paid once.
DEFAULT_SCHEDULER_STEPS = 4


@dataclass
class EngineParts:
    tokenizer: Any
    hf_config: Any
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    vocab_size: int
    eos_token_ids: set[int]
    attention_backend: str
    runner: ModelRunner
    scheduler: Scheduler
    prefix_cache: Any
    core: EngineCore
    holds_host_thread_limit: bool  # limit_host_threads applied: shutdown must release it
    holds_gil_switch: bool  # shorten_gil_switch_interval applied: shutdown must restore it


def build_engine_parts(cfg: EngineConfig) -> EngineParts:
    _quiet_dependencies()
    from pipeline_infer import loader

    if cfg.random_seed is not None:
        torch.manual_seed(cfg.random_seed)
    device = _device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    model_dir = loader.resolve_model_path(cfg.model_path, revision=cfg.revision)
    hf_config = loader.load_hf_config(model_dir, trust_remote_code=cfg.trust_remote_code)
    model = loader.load_model(model_dir, hf_config, load_format=cfg.load_format, dtype=dtype, device=device)

    tokenizer = None if cfg.skip_tokenizer_init else _tokenizer(cfg.tokenizer_path or model_dir, cfg)
    eos = _eos_ids(hf_config, model_dir, tokenizer)
    model_context = int(getattr(hf_config, "max_position_embeddings", 0) or 4096)
    if cfg.context_length is not None and cfg.context_length > model_context:
        raise ValueError(
            f"context_length={cfg.context_length} exceeds the model's max_position_embeddings ({model_context})"
        )
    context = cfg.context_length or model_context

    max_running = cfg.max_running_requests or default_max_running_requests(device)
    chunk = cfg.chunked_prefill_size or default_chunked_prefill_size(device)
    backend = cfg.attention_backend or _default_backend(device, hf_config, cfg.page_size, dtype)
    # Triton's interpreter (TRITON_INTERPRET=1) runs its kernels on the CPU: slow, for tests.
    triton_on_cpu = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if backend != "torch" and device.type != "cuda" and not triton_on_cpu:
        raise ValueError(f"attention_backend={backend!r} needs a CUDA device; on the CPU use 'torch'")
    runner = ModelRunner(
        model,
        hf_config,
        device=device,
        dtype=dtype,
        page_size=cfg.page_size,
        max_total_tokens=cfg.max_total_tokens,
        mem_fraction_static=cfg.mem_fraction_static,
        attention_backend=backend,
        eos_token_ids=eos,
        max_context=context,
        cuda_graph_max_bs=decode_graph_max_bs(cfg, max_running),
        chunked_prefill_size=chunk,
        max_running_requests=max_running,
        extend_cuda_graph=not (cfg.disable_extend_cuda_graph or cfg.disable_cuda_graph),
        shared_prefix_attention=cfg.enable_cascade_attn and not cfg.disable_radix_cache,
    )
    # A lone sequence must always fit in the pool, so the pool also caps the context.
    context = min(context, runner.capacity_tokens)

    overlap = not cfg.disable_overlap_schedule if cfg.disable_overlap_schedule is not None else device.type == "cuda"
    prefix_cache = None
    if not cfg.disable_radix_cache:
        prefix_cache = _prefix_cache(runner, cfg)
    scheduler = Scheduler(
        runner.kv_pool.allocator,
        page_size=cfg.page_size,
        max_running_requests=max_running,
        chunked_prefill_size=chunk,
        schedule_policy=cfg.schedule_policy,
        conservativeness=cfg.schedule_conservativeness,
        prefix_cache=prefix_cache,
        mixed_chunk=cfg.enable_mixed_chunk,
        admission_batch=cfg.admission_batch or (max(1, max_running // 8) if device.type == "cuda" else 1),
        num_scheduler_steps=cfg.num_scheduler_steps or default_scheduler_steps(device, runner, overlap),
    )
    timer = None
    if cfg.enable_step_timing:
        from pipeline_infer.step_timing import StepTimer

        timer = StepTimer(device)
    # Take everything alive now (the imported libraries' ~360k objects, the model's modules)
    # out of the cyclic GC: a full (gen-2) collection otherwise walks all of them, 100-200 ms
    # on a slow host every few thousand steps (docs/benchmarks.md, "CPU: scheduler host time
    # per step"), a stall of that many decode steps. None of it is garbage; Engine.shutdown
    # unfreezes so the model's own reference cycles can still be collected.
    gc.collect()
    gc.freeze()
    holds_thread_limit = limit_host_threads(device)
    holds_gil_switch = shorten_gil_switch_interval(device)
    raise_gc_threshold()  # every engine: Engine.shutdown restores it
    core = EngineCore(scheduler, runner, timer, overlap=overlap)
    return EngineParts(
        tokenizer=tokenizer,
        hf_config=hf_config,
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        context_length=context,
        vocab_size=int(hf_config.vocab_size),
        eos_token_ids=eos,
        attention_backend=backend,
        runner=runner,
        scheduler=scheduler,
        prefix_cache=prefix_cache,
        core=core,
        holds_host_thread_limit=holds_thread_limit,
        holds_gil_switch=holds_gil_switch,
    )


def _prefix_cache(runner: ModelRunner, cfg: EngineConfig):
    try:
        from pipeline_infer.cache.radix import RadixCache
    except ImportError:  # radix cache not available in this build
        return None
    return RadixCache(runner.kv_pool.allocator, cfg.page_size)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device='cpu'")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# vLLM's tiers for offline use: GPUs with at least this much memory (H100, H200, MI300) run up
# to 1024 sequences at once, smaller ones 256.
_LARGE_GPU_BYTES = 70 * 2**30


def default_max_running_requests(device: torch.device, total_memory: int | None = None) -> int:
    """Requests decoding at once when the user does not say: 1024 on a GPU of >= 70 GiB, 256 on
    a smaller one, 64 on the CPU. On an H200 (Qwen2.5-0.5B) 1024 against 256 took the random
    workload from 4.51 to 3.22 s and decode-heavy from 5.05 to 2.88 s (docs/benchmarks.md):
    a decode step's weight reads are shared by more rows. The KV pool still bounds admission,
    so a large model simply runs fewer."""
    if device.type != "cuda":
        return 64
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory
    return 1024 if total_memory >= _LARGE_GPU_BYTES else 256


def default_chunked_prefill_size(device: torch.device, total_memory: int | None = None) -> int:
    """Prefill tokens per step when the user does not say: 16384 on a GPU of >= 70 GiB, 8192 on a
    smaller one and on the CPU. Fewer, larger prefill (mixed) steps run the prefill's matmuls at
    more rows each and pay a step's fixed costs (host scheduling, launches) half as often. On an
    H200 (Qwen2.5-0.5B, tenth session, docs/benchmarks.md) random took 2.90 and 2.89 s against
    3.03 and 3.10 s at 8192 in two calls (its mixed steps' device time 1.11 -> 0.99 s), and
    shared-prefix's 14 admission steps became 7 (device 0.24 -> 0.19-0.20 s). The activation
    peak the KV pool sets aside is measured at this size, so the pool shrinks to fit it."""
    if device.type != "cuda":
        return 8192
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory
    return 16384 if total_memory >= _LARGE_GPU_BYTES else 8192


def default_scheduler_steps(device: torch.device, runner: ModelRunner, overlap: bool) -> int:
    """num_scheduler_steps when not given: decode windows where their later steps replay the
    decode graphs without host work (CudaGraphRunner.replay_next), and the host's work overlaps
    the device's anyway (overlap: the engine runs the overlap schedule); elsewhere they would
    only add launches or latency."""
    graphs = runner.graph_runner
    if device.type != "cuda" or not overlap or graphs is None or not graphs.replays_windows:
        return 1
    return DEFAULT_SCHEDULER_STEPS


def decode_graph_max_bs(cfg: EngineConfig, max_running: int) -> int:
    """The largest decode batch captured as a CUDA graph (0: none): by default every batch the
    scheduler can form, since a larger one would fall back to eager launches."""
    if cfg.disable_cuda_graph:
        return 0
    return min(cfg.cuda_graph_max_bs or max_running, max_running)


def _default_backend(device: torch.device, hf_config, page_size: int, dtype: torch.dtype) -> str:
    """The fastest GPU attention backend for this model's heads on this device, measured once
    (select.fastest_backend; torch on the CPU)."""
    from pipeline_infer.kernels.attention.select import fastest_backend

    if device.type != "cuda":
        return "torch"
    num_q = hf_config.num_attention_heads
    num_kv = getattr(hf_config, "num_key_value_heads", None) or num_q
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_q
    return fastest_backend(device, num_q, num_kv, head_dim, page_size, dtype)


def _tokenizer(path: str, cfg: EngineConfig):
    from pipeline_infer.tokenizer import Tokenizer

    has_tokenizer = any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    if not has_tokenizer:
        if cfg.load_format == "dummy" or cfg.tokenizer_path is None:
            return None  # random-weight benchmarks run on token ids alone
    return Tokenizer.from_pretrained(path)


def _eos_ids(hf_config, model_dir: str, tokenizer) -> set[int]:
    ids: set[int] = set()
    candidates = [getattr(hf_config, "eos_token_id", None)]
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        import json

        with open(gen_path) as f:
            candidates.append(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        candidates.append(sorted(tokenizer.eos_token_ids))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple, set)):
            ids.update(int(x) for x in c)
    return ids


class _SharedSetting:
    """A process-wide setting that engines share: the first holder changes it, the last to
    let go puts back what it found, unless something else changed it meanwhile."""

    def __init__(
        self,
        get: Callable[[], Any],
        set_: Callable[[Any], None],
        wanted: Callable[[], Any],
        take_over: Callable[[Any], bool],
    ):
        # wanted() is read at each first acquire (benchmarks may change it); take_over(current)
        # says whether to change the setting at all (False: the user's own choice stands).
        self.get, self.set, self.wanted, self.take_over = get, set_, wanted, take_over
        self.lock = threading.Lock()
        self.holders = 0
        self.before: Any = None  # the value found, when it was changed
        self.applied: Any = None

    def acquire(self) -> None:
        with self.lock:
            if self.holders == 0:
                current = self.get()
                self.before = self.applied = None
                if self.take_over(current):
                    self.before, self.applied = current, self.wanted()
                    self.set(self.applied)
            self.holders += 1

    def release(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0 and self.before is not None and math.isclose(self.get(), self.applied, abs_tol=1e-9):
                self.set(self.before)


# torch's CPU thread count: one while a CUDA engine runs.
_HOST_THREADS = _SharedSetting(torch.get_num_threads, torch.set_num_threads, lambda: 1, lambda current: True)


def limit_host_threads(device: torch.device) -> bool:
    """On a CUDA engine, run torch's CPU ops on one thread; True if this engine holds the limit.

    A GPU engine's host work is one Python thread feeding the device, and its CPU tensors are
    tiny. A pool of one torch thread per core only costs it: on the H200 host (32 cores) the
    decode-heavy workload's steps took 2.57 ms with the default pool, host-bound, and 1.88 ms
    (device-bound) with one thread (docs/benchmarks.md, "Torch's CPU thread pool made decode
    steps host-bound"). As vLLM does for its workers, an OMP_NUM_THREADS the user set wins.
    """
    if device.type != "cuda" or os.environ.get("OMP_NUM_THREADS"):
        return False
    _HOST_THREADS.acquire()
    return True


def release_host_threads() -> None:
    """One holder of limit_host_threads is done; the last restores the count it found."""
    _HOST_THREADS.release()


# How long a Python thread may hold the GIL while another waits for it (Python's default: 5 ms).
GIL_SWITCH_INTERVAL_S = 0.0005
_PYTHON_DEFAULT_SWITCH_INTERVAL_S = 0.005
_GIL_SWITCH = _SharedSetting(
    sys.getswitchinterval,
    sys.setswitchinterval,
    lambda: GIL_SWITCH_INTERVAL_S,
    # An interval the user already changed from Python's default is left as it is.
    lambda current: math.isclose(current, _PYTHON_DEFAULT_SWITCH_INTERVAL_S, abs_tol=1e-9),
)


def shorten_gil_switch_interval(device: torch.device) -> bool:
    """On a CUDA engine, make threads holding the GIL hand it over within 0.5 ms, not 5 ms.

    The engine thread lets go of the GIL at every copy and sync of a step and then waits to get
    it back; in a file job the batch threads (tokenizing, detokenizing, Arrow work) hold it
    meanwhile, for up to the switch interval each time. On an H200 host, 8,000 rows with
    window 8: 41.5 s with 5 ms and 35.2 s with 0.5 ms (56.3k -> 66.5k output tok/s), the
    median decode step 2.56 -> 2.23 ms against 2.21 ms of device time (docs/benchmarks.md,
    "The GIL's switch interval"). An interval the user already changed from Python's default
    is left as it is. Returns True if this engine holds the setting (and must restore it).
    """
    if device.type != "cuda":
        return False
    _GIL_SWITCH.acquire()
    return True


def restore_gil_switch_interval() -> None:
    """One holder of shorten_gil_switch_interval is done; the last restores what it found."""
    _GIL_SWITCH.release()


# The cyclic GC's young-generation threshold while an engine runs: container allocations
# between automatic collections (Python's default: 700; 2,000 from 3.13).
GC_YOUNG_THRESHOLD = 200_000
_PYTHON_DEFAULT_GC_YOUNG = (700, 2000)
# A generate call starts with a young collection when at least this many objects are pending.
GC_CALL_COLLECT_MIN = 10_000
_GC_YOUNG = _SharedSetting(
    lambda: gc.get_threshold()[0],
    lambda n: gc.set_threshold(n, *gc.get_threshold()[1:]),
    lambda: GC_YOUNG_THRESHOLD,
    # A threshold the user already changed from Python's default is left as it is.
    lambda current: current in _PYTHON_DEFAULT_GC_YOUNG,
)


def raise_gc_threshold() -> None:
    """While an engine runs, the cyclic GC's young pass runs between generate calls
    (`collect_young_before_call`), not inside them: automatic young collections every 200,000
    container allocations instead of every 700.

    A young collection walks every container made since the last one that is still alive, a
    list item by item. Inside a call that is the call's requests, each with its token list
    (1,100 ids a prompt in the shared-prefix workload), and whatever a step's host work holds at
    the time (a prefill step's id lists). At 700, on the 2-core CPU against its emulated H200
    (benchmarks/emulated_device.py), a 1,024-prompt call ran 42-56 young and 4 older collections
    (40-55 ms of host time, in the admission steps where the host is the bottleneck) and a full
    one (50-125 ms) every few calls; at 50,000 one young collection every second call, 60-95 ms
    on the CPU and 75-80 ms on an H200 host (the requests alive). Between calls the requests are
    gone: they make no reference cycles (EngineCore._emit; RadixCache.reset unlinks a dropped
    tree), so reference counting frees them and the young pass walks only what outlives a call.
    The last engine to shut down restores the threshold it found.
    """
    _GC_YOUNG.acquire()


def collect_young_before_call() -> None:
    """The young collection `raise_gc_threshold` moves to a call's start, before its requests
    exist: when an engine holds the raised threshold and GC_CALL_COLLECT_MIN objects are pending."""
    if _GC_YOUNG.applied is not None and gc.isenabled() and gc.get_count()[0] >= GC_CALL_COLLECT_MIN:
        gc.collect(0)


def restore_gc_threshold() -> None:
    """One holder of raise_gc_threshold is done; the last restores what it found."""
    _GC_YOUNG.release()


def _quiet_dependencies() -> None:
    """Our dependencies' warnings and progress bars are noise in a batch job's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="huggingface_hub")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass
