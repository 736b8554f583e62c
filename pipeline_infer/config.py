"""EngineConfig: every engine option, its default, and its validation.

Option names follow SGLang's ServerArgs where the concept is the same, so a user's
`sgl.Engine(model_path=..., page_size=16, ...)` call carries over unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SCHEDULE_POLICIES = ("auto", "fcfs", "lpm", "batch")
_ATTENTION_BACKENDS = ("torch", "triton", "flashinfer")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass
class EngineConfig:
    model_path: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    tokenizer_path: str | None = None
    revision: str | None = None
    load_format: str = "auto"  # "dummy": random weights from config.json alone
    dtype: str = "auto"  # bf16 on CUDA, fp32 on the CPU
    device: str = "auto"
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    context_length: int | None = None  # default: the model's max_position_embeddings

    # KV cache and batching
    page_size: int = 1
    max_total_tokens: int | None = None  # KV capacity in tokens; default from memory
    mem_fraction_static: float = 0.85  # CUDA: fraction of free memory for weights + KV
    max_running_requests: int | None = None
    # Prefill tokens per step across requests. None: 16384 on a GPU of >= 70 GiB, 8192 on a
    # smaller one and on the CPU (engine_setup.default_chunked_prefill_size).
    chunked_prefill_size: int | None = None
    # True: prefill chunks share steps with the running decodes. False (SGLang's default): a
    # step is prefill-only or decode-only, so every decode step can replay a CUDA graph.
    enable_mixed_chunk: bool = True
    # While requests decode, admit waiting ones in groups of at least this many (free slots),
    # so that prefill steps, which cannot replay a CUDA graph, are few and large; bounded by as
    # many held steps (scheduler._admission_due). None: max_running_requests // 8 on CUDA, 1
    # (admit as soon as a slot frees) on the CPU, where every step runs eagerly anyway.
    admission_batch: int | None = None
    schedule_policy: str = "auto"  # "batch" for batch submissions, "fcfs" otherwise (see scheduler.py)
    schedule_conservativeness: float = 1.0  # scales the decode reserve at admission
    disable_radix_cache: bool = False

    # Overlap schedule (SGLang's name): the host schedules and launches step N+1 while the device
    # runs step N, which hides the host's per-step work. None: on for CUDA; off on the CPU, where
    # the "device" is the host itself, so there is nothing to hide. Requests with penalties,
    # min_new_tokens, a grammar, logprobs or hidden states run their steps in lockstep.
    disable_overlap_schedule: bool | None = None

    # Decode steps run back to back from one schedule when every running request returns only
    # its final result, samples without penalties, min_new_tokens or a grammar (greedy or not),
    # and the step admits nobody (a decode window, vLLM's num_scheduler_steps): the device
    # feeds each step's samples to the next, so the host's per-step work (scheduling, building,
    # committing ~1,000 rows: 1.5-5 ms on the device machines' hosts, more than a 0.5B model's
    # 3.5 ms step on the slow ones) is paid once a window. A row that finishes inside a window
    # has its later samples dropped. A seeded row draws as it would step by step.
    # None: 4 on CUDA with decode CUDA graphs, the overlap schedule and an attention backend
    # that plans on the device (Triton); 1 (every step scheduled) otherwise.
    num_scheduler_steps: int | None = None

    # kernels and runner
    attention_backend: str | None = None  # None: the fastest GPU backend measured here (torch on the CPU)
    disable_cuda_graph: bool = False
    # Decode batches up to this many rows replay CUDA graphs; larger ones run eagerly, which on
    # an H200 took a 512-row decode step from ~2-3 ms to 13 ms (launch-bound). None: as many as
    # the engine runs at once (max_running_requests), so every decode step can replay a graph.
    cuda_graph_max_bs: int | None = None
    # Steps that prefill replay CUDA graphs too (extend_graph.py), where the attention backend
    # supports it (Triton). On an H200 this took the random workload from 6.32 s to 5.42 s
    # (docs/benchmarks.md); True turns it off (eager prefill steps, less start-up and memory).
    disable_extend_cuda_graph: bool = False
    # Cascade attention: decode rows whose prompts share cached prefix pages (the radix cache's)
    # read those pages once per group of rows instead of once per row
    # (kernels/triton/shared_prefix_attention.py; Triton backend, radix cache on; elsewhere it
    # does nothing). On by default since the twelfth session: on an H200 the shared-prefix
    # workload's decode steps take 7-14% less device time with it, and without shared prefixes
    # (random, decode-heavy) its device time and walls were the same in one call, its only cost
    # the host's group finding, hidden behind the device (docs/benchmarks.md).
    enable_cascade_attn: bool = True

    # outputs
    incremental_streaming_output: bool = False
    stream_interval: int = 1
    enable_return_hidden_states: bool = False  # allow generate(return_hidden_states=True)
    # Structured output: json_schema output is compact JSON. True here, unlike SGLang: with free
    # whitespace small models often never close the JSON (see structured.py).
    constrained_json_disable_any_whitespace: bool = True
    random_seed: int | None = None
    log_level: str = "error"
    # Per-step host vs device time breakdown (step_timing.py), read with
    # Engine.step_timing_summary(). Off: the engine loop does no timing work at all.
    enable_step_timing: bool = False

    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_kwargs(cls, model_path: str | None = None, **options: Any) -> "EngineConfig":
        valid = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        for key in options:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise TypeError(f"unknown Engine option {key!r}{hint} (valid options: {', '.join(valid)})")
        cfg = cls(model_path=model_path, **options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.trust_remote_code:
            raise ValueError(
                "trust_remote_code=True is not supported: pipeline-infer runs only its built-in model "
                "implementations (Llama, Mistral, Qwen2, Qwen3) and never executes code shipped with a checkpoint"
            )
        _check_choice("load_format", self.load_format, _LOAD_FORMATS)
        _check_choice("dtype", self.dtype, _DTYPES)
        _check_choice("schedule_policy", self.schedule_policy, _SCHEDULE_POLICIES)
        _check_choice("log_level", self.log_level.lower(), _LOG_LEVELS)
        if self.attention_backend is not None:
            _check_choice("attention_backend", self.attention_backend, _ATTENTION_BACKENDS)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _check_int("page_size", self.page_size, low=1)
        _check_int("stream_interval", self.stream_interval, low=1)
        for name in (
            "chunked_prefill_size", "max_total_tokens", "max_running_requests", "context_length",
            "admission_batch", "cuda_graph_max_bs", "num_scheduler_steps",
        ):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low=1)
        if not (0.0 < self.mem_fraction_static < 1.0):
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if not (self.schedule_conservativeness > 0):
            raise ValueError(f"schedule_conservativeness must be > 0, got {self.schedule_conservativeness}")
        if self.disable_overlap_schedule is not None and not isinstance(self.disable_overlap_schedule, bool):
            raise TypeError(
                f"disable_overlap_schedule must be True, False or None (on for CUDA), got {self.disable_overlap_schedule!r}"
            )
        if self.random_seed is not None:
            _check_int("random_seed", self.random_seed, low=0)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
