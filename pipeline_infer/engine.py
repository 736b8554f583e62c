"""Engine: the public offline API (SGLang's Engine), front ends only.

generate / async_generate, each streaming or not, turn user input into validated
Requests, hand them to the EngineCore thread, and assemble its per-token callbacks into
result dicts. No scheduling logic lives here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from pipeline_infer.config import EngineConfig
from pipeline_infer.engine_inputs import split_call
from pipeline_infer.extra_outputs import ExtraOutputs, OutputArgs
from pipeline_infer.request import Request
from pipeline_infer.sampling_params import SamplingParams

logger = logging.getLogger("pipeline_infer")

# Prompts per slice of a large non-streaming generate() call (engine_inputs.split_call): the
# engine starts on the first slice's requests while the others are checked and made (~60 us a
# prompt of ~1,100 ids on a 2-core CPU, so a 1,024-prompt call used to keep a GPU idle ~65 ms).
# 128 prompts are more than one 16,384-token prefill step takes of most workloads.
_SUBMIT_SLICE = 128
# The later slices, each made once the engine thread waits on the device (overlap schedule):
# small, so that one still being made when the device finishes holds the engine back little.
# The wait is short because admission steps can be host-bound (their scheduling outlasting the
# device's step): a 20 ms wait then starved the front end, so mixed steps admitted only +32 or
# +64 requests each (H200, shared-prefix: 5 ms 1.123 s, 20 ms 1.219 s, no wait 1.162 s).
_LATER_SLICE = 32
_SLICE_WAIT_S = 0.005


class Engine:
    """Offline inference engine.

    >>> llm = Engine()                       # the bundled SmolLM2-135M-Instruct on the CPU
    >>> llm.generate("The capital of France is", {"max_new_tokens": 8})["text"]
    """

    def __init__(self, model_path: str | None = None, **options: Any):
        self.config = EngineConfig.from_kwargs(model_path, **options)
        _configure_logging(self.config.log_level)
        from pipeline_infer.engine_setup import build_engine_parts

        parts = build_engine_parts(self.config)
        self.tokenizer = parts.tokenizer
        self.hf_config = parts.hf_config
        self.model_dir = parts.model_dir
        self.device = parts.device
        self.dtype = parts.dtype
        self.context_length = parts.context_length
        self.vocab_size = parts.vocab_size
        self.eos_token_ids = frozenset(parts.eos_token_ids)
        self.attention_backend = parts.attention_backend
        self._runner = parts.runner
        self._scheduler = parts.scheduler
        self._prefix_cache = parts.prefix_cache
        self._core = parts.core
        self._holds_thread_limit = parts.holds_host_thread_limit
        self._holds_gil_switch = parts.holds_gil_switch
        self._closed = False
        self._lock = threading.Lock()
        self._grammars = None  # structured.GrammarCache, made on the first constrained request

    # --- lifecycle -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine thread, abort what is in flight, and free the model and KV cache."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._core.stop()
        # engine_setup froze the heap at start-up (gc.freeze); give it back to the collector
        # so the model's reference cycles, pinning device memory, can go (release collects).
        gc.unfreeze()
        self._runner.release()
        if self._holds_thread_limit:
            from pipeline_infer.engine_setup import release_host_threads

            release_host_threads()
        if self._holds_gil_switch:
            from pipeline_infer.engine_setup import restore_gil_switch_interval

            restore_gil_switch_interval()
        from pipeline_infer.engine_setup import restore_gc_threshold

        restore_gc_threshold()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine has been shut down; create a new Engine to generate again")
        if not self._core.alive:
            raise RuntimeError("the engine thread has stopped; create a new Engine")

    # --- information and cache -----------------------------------------------------------
    def get_server_info(self) -> dict[str, Any]:
        self._check_alive()
        cfg = dataclasses.asdict(self.config)
        cfg.pop("extra", None)

        def stats() -> dict[str, Any]:
            s = self._scheduler
            return {
                "num_waiting": len(s.waiting),
                "num_running": len(s.running),
                "num_free_pages": s.allocator.num_free,
                "num_retractions": s.num_retractions,
                "num_steps": self._core.num_steps,
                "num_generated_tokens": self._core.num_generated_tokens,
                "new_token_ratio": s.new_token_ratio,
            }

        return {
            **cfg,
            "model_dir": self.model_dir,
            "architecture": (self.hf_config.architectures or ["?"])[0],
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention_backend": self.attention_backend,
            "context_length": self.context_length,
            "max_total_tokens": self._runner.capacity_tokens,
            "max_running_requests": self._scheduler.max_running_requests,
            "chunked_prefill_size": self._scheduler.chunked_prefill_size,
            "num_scheduler_steps": self._scheduler.num_scheduler_steps,
            "version": _version(),
            **self._core.call(stats),
        }

    def flush_cache(self) -> None:
        """Empty the prefix cache. Refused (RuntimeError) while requests are in flight."""
        self._check_alive()

        def flush() -> None:
            s = self._scheduler
            if s.waiting or s.running:
                raise RuntimeError(
                    f"flush_cache refused: {len(s.running)} running and {len(s.waiting)} waiting "
                    "requests still use the cache; call it when the engine is idle"
                )
            if self._prefix_cache is not None:
                self._prefix_cache.reset()
                s.prefix_cache_flushed()

        self._core.call(flush)

    def step_timing_summary(self, reset: bool = False, steps: bool = False) -> dict[str, Any]:
        """Per-step host vs device time breakdown since the last reset (step_timing.py).

        Needs Engine(enable_step_timing=True). Totals in seconds, medians in ms, overall and
        under "by_kind" for decode-only, prefill-only and mixed steps. steps=True adds every
        step's own record under "step_records" (StepTimer.records: kind, batch size, tokens,
        times in ms, the device's idle time before it included). reset=True starts a new
        measurement after reading this one.
        """
        self._check_alive()
        timer = self._core.timer
        if timer is None:
            raise RuntimeError("step timing is off; create the Engine with enable_step_timing=True")

        def read() -> dict[str, Any]:  # on the engine thread, between steps
            out = timer.summary()
            if steps:
                out["step_records"] = timer.records()
            if reset:
                timer.reset()
            return out

        return self._core.call(read)

    # --- generation ---------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_hidden_states: bool | list[bool] = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
    ) -> dict | list[dict] | Iterator[dict]:
        """One dict for one prompt, a list for a list, an iterator of chunks with stream=True.

        return_logprob / logprob_start_len / top_logprobs_num / return_hidden_states follow SGLang
        (see extra_outputs.py for the exact meta_info layout); logprobs are of the model's raw
        distribution, before logit_bias, penalties, grammar masks, temperature, top-k/p and min-p.
        """
        self._check_alive()
        _collect_young_before_call()
        outputs = OutputArgs(return_logprob, logprob_start_len, top_logprobs_num, return_hidden_states,
                             return_text_in_logprobs)
        slices = None if stream else split_call(prompt, sampling_params, input_ids, rid, outputs, _LATER_SLICE, _SUBMIT_SLICE)
        if slices is not None:
            # A batch job: its first prompts' requests go to the engine while the rest are made.
            params_made: dict = {}  # the call's SamplingParams by what was asked, across its slices
            core = self._core

            def make(s):
                if s.first_index and core.overlap:
                    # The later slices are made while the engine thread waits on the device,
                    # not beside a step's host work (EngineCore.wait_for_device).
                    core.wait_for_device(_SLICE_WAIT_S)
                return self._make_requests(s.prompt, s.sampling_params, s.input_ids, s.rid, s.outputs, stream=False,
                                           first_index=s.first_index, params_made=params_made)[0]

            made = map(make, slices)
            return _SyncCollector(self, next(made)).wait(False, made)
        reqs, single = self._make_requests(prompt, sampling_params, input_ids, rid, outputs, stream=stream)
        collector = _SyncCollector(self, reqs)
        if stream:
            return collector.stream(single)
        return collector.wait(single)

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        return_hidden_states: bool | list[bool] = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        return_text_in_logprobs: bool = False,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """Awaitable generate; with stream=True it returns an async iterator of chunks."""
        self._check_alive()
        _collect_young_before_call()
        outputs = OutputArgs(return_logprob, logprob_start_len, top_logprobs_num, return_hidden_states,
                             return_text_in_logprobs)
        reqs, single = self._make_requests(prompt, sampling_params, input_ids, rid, outputs, stream=stream)
        collector = _AsyncCollector(self, reqs)
        if stream:
            return collector.stream(single)
        return await collector.wait(single)

    # --- input handling -------------------------------------------------------------------
    def _make_requests(
        self, prompt, sampling_params, input_ids, rid, outputs: OutputArgs | None = None, stream: bool = True,
        first_index: int = 0, params_made: dict | None = None,
    ) -> tuple[list[Request], bool]:
        """stream=False: the caller reads only the final text, so it is decoded once at the end.
        first_index: the call's index of the first prompt given (a slice of the call's: split_call);
        params_made: shared by the slices of one call (normalize_inputs)."""
        from pipeline_infer.engine_inputs import normalize_inputs

        prompts_ids, params, single = normalize_inputs(
            self, prompt, sampling_params, input_ids, first_index, params_made
        )
        rids = _request_ids(rid, len(prompts_ids))
        extra = (outputs or OutputArgs()).resolve(prompts_ids, self)
        for p in params:  # compile every grammar (or fail) before anything is submitted
            self._grammar_state(p)
        reqs: list[Request] = []
        for i, (ids, p) in enumerate(zip(prompts_ids, params)):
            for j in range(p.n):
                seed = p.sampling_seed
                if seed is not None and j > 0:
                    seed = (seed * 1_000_003 + j) % (1 << 62)  # distinct, reproducible samples
                reqs.append(
                    Request(
                        rid=rids[i] if p.n == 1 else f"{rids[i]}-{j}",
                        prompt_ids=ids,
                        params=p,
                        eos_token_ids=self.eos_token_ids,
                        context_length=self.context_length,
                        seed=seed,
                        detokenizer=self._detokenizer(p, incremental=stream),
                        grammar=self._grammar_state(p),
                        extra_outputs=ExtraOutputs(**extra[i]) if extra[i] is not None else None,
                    )
                )
        single = single and len(reqs) == 1
        for req in reqs:  # several requests from one call: a batch job (schedule_policy "auto")
            req.batch_job = not single
        return reqs, single

    def _grammar_state(self, p: SamplingParams):
        """A fresh grammar matcher for structured output (compiled once per spec), or None."""
        if p.json_schema is None and p.regex is None and p.ebnf is None:
            return None
        if self._grammars is None:
            with self._lock:
                if self._grammars is None:
                    if self.tokenizer is None:
                        raise ValueError("structured output needs the model's tokenizer; this engine has none")
                    from pipeline_infer.structured import GrammarCache

                    self._grammars = GrammarCache(
                        self.tokenizer.hf,
                        self.vocab_size,
                        self.eos_token_ids,
                        any_whitespace=not self.config.constrained_json_disable_any_whitespace,
                    )
        return self._grammars.state_for(p)

    def _detokenizer(self, p: SamplingParams, incremental: bool = True):
        if self.tokenizer is None:
            return None
        from pipeline_infer.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens,
            stop=p.stop or [],
            stop_regex=p.stop_regex,
            no_stop_trim=p.no_stop_trim,
            incremental=incremental,
        )


# --- output assembly -------------------------------------------------------------------------


def _meta_info(req: Request, n_out: int, finished: bool, start: int = 0) -> dict[str, Any]:
    """meta_info after n_out output tokens; per-token extras cover outputs [start, n_out)."""
    end = req.finish_time if finished and req.finish_time else time.perf_counter()
    info = {
        "id": req.rid,
        "prompt_tokens": req.prompt_len,
        "completion_tokens": n_out,
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish_reason.to_dict() if finished and req.finish_reason else None,
        "e2e_latency": end - req.arrival_time,
    }
    if req.extra_outputs is not None:
        info.update(req.extra_outputs.meta_info(req.prompt_ids, req.output_ids, start, n_out))
    return info


class _Snapshot:
    """What a request looked like at one callback, taken on the engine thread."""

    __slots__ = ("index", "text", "n_out", "finished")

    def __init__(self, index: int, req: Request, finished: bool):
        self.index = index
        self.text = req.output_text
        self.n_out = len(req.output_ids)
        self.finished = finished


class _CollectorBase:
    def __init__(self, engine: Engine, reqs: list[Request]):
        self.engine = engine
        self.reqs = reqs
        self.incremental = engine.config.incremental_streaming_output
        self.interval = engine.config.stream_interval
        self._sent_text = [0] * len(reqs)
        self._sent_ids = [0] * len(reqs)
        self.done = [False] * len(reqs)

    def _add(self, reqs: list[Request]) -> int:
        """Append requests of the same call (made after the first were submitted); returns the index of the first."""
        start = len(self.reqs)
        self.reqs = self.reqs + reqs
        self._sent_text += [0] * len(reqs)
        self._sent_ids += [0] * len(reqs)
        self.done += [False] * len(reqs)
        return start

    def _route_outputs(self, put: Callable[[_Snapshot], Any], finished_only: bool, start: int = 0) -> None:
        """Send each request's outputs to put; only its final one when finished_only (what
        a non-streaming call returns: one event per request, not one per request per step).
        start: only the requests from that index on (those not yet routed)."""
        for i in range(start, len(self.reqs)):
            req = self.reqs[i]
            req.output_every_step = not finished_only
            if finished_only:  # the engine calls it only at the finish then; the check stays for safety
                req.on_output = lambda r, fin, i=i: fin and put(_Snapshot(i, r, fin))
            else:
                req.on_output = lambda r, fin, i=i: put(_Snapshot(i, r, fin))

    def final(self, i: int) -> dict[str, Any]:
        req = self.reqs[i]
        return {
            "text": req.output_text,
            "output_ids": list(req.output_ids),
            "meta_info": _meta_info(req, len(req.output_ids), True),
        }

    def chunk(self, snap: _Snapshot, with_index: bool) -> dict[str, Any] | None:
        """A stream chunk, or None when stream_interval says to skip this token."""
        i, req = snap.index, self.reqs[snap.index]
        if not snap.finished and snap.n_out % self.interval != 0:
            return None
        start = self._sent_ids[i] if self.incremental else 0
        text = req.output_text if snap.finished else snap.text
        n_out = len(req.output_ids) if snap.finished else snap.n_out
        if self.incremental:
            out = {"text": text[self._sent_text[i] :], "output_ids": req.output_ids[self._sent_ids[i] : n_out]}
        else:
            out = {"text": text, "output_ids": req.output_ids[:n_out]}
        self._sent_text[i], self._sent_ids[i] = len(text), n_out
        out["meta_info"] = _meta_info(req, n_out, snap.finished, start)
        if with_index:
            out["index"] = i
        return out

    def abort_unfinished(self) -> None:
        rids = [r.rid for r, d in zip(self.reqs, self.done) if not d]
        if rids and not self.engine._closed:
            self.engine._core.abort(rids)

    @staticmethod
    def shape(results: list[dict], single: bool) -> dict | list[dict]:
        return results[0] if single else results


class _SyncCollector(_CollectorBase):
    def __init__(self, engine: Engine, reqs: list[Request]):
        super().__init__(engine, reqs)
        self.q: queue.SimpleQueue = queue.SimpleQueue()

    def _events(self) -> Iterator[_Snapshot]:
        remaining = len(self.reqs)
        while remaining:
            snap = self.q.get()
            if snap.finished:
                if self.done[snap.index]:
                    continue
                self.done[snap.index] = True
                remaining -= 1
            yield snap

    def wait(self, single: bool, later: Iterable[list[Request]] = ()) -> dict | list[dict]:
        """The results of self.reqs and then of each list of requests `later` yields (each submitted
        as soon as it is made; an error making one aborts every request submitted, then is raised)."""
        # The results are read from the requests once all have finished, so the engine thread
        # only counts finishes and wakes this thread once, at the last: a wake-up per finished
        # request would take the GIL from the engine thread as often, mid-step.
        all_done = threading.Event()
        lock = threading.Lock()  # the count is shared with the engine thread while requests are added
        state = {"remaining": 0, "all_submitted": False}

        def finished(i: int) -> None:  # on the engine thread
            with lock:
                if self.done[i]:
                    return
                self.done[i] = True
                state["remaining"] -= 1
                if state["remaining"] == 0 and state["all_submitted"]:
                    all_done.set()

        def submit(start: int) -> None:
            with lock:
                state["remaining"] += len(self.reqs) - start
            self._route_outputs(lambda snap: finished(snap.index), finished_only=True, start=start)
            self.engine._core.submit(self.reqs[start:])

        try:
            submit(0)
            for reqs in later:
                with lock:
                    start = self._add(reqs)
                submit(start)
            with lock:
                state["all_submitted"] = True
                if state["remaining"] == 0:
                    all_done.set()
            all_done.wait()
        finally:
            self.abort_unfinished()
        return self.shape([self.final(i) for i in range(len(self.reqs))], single)

    def stream(self, single: bool) -> Iterator[dict]:
        def gen() -> Iterator[dict]:
            self._route_outputs(self.q.put, finished_only=False)
            self.engine._core.submit(self.reqs)
            try:
                for snap in self._events():
                    out = self.chunk(snap, with_index=not single)
                    if out is not None:
                        yield out
            finally:  # the caller stopped iterating: free the requests' pages now
                self.abort_unfinished()

        return gen()


class _AsyncCollector(_CollectorBase):
    def _attach(self, finished_only: bool = False) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._route_outputs(lambda snap: loop.call_soon_threadsafe(q.put_nowait, snap), finished_only)
        self.engine._core.submit(self.reqs)
        return q

    async def _events(self, q: asyncio.Queue) -> AsyncIterator[_Snapshot]:
        remaining = len(self.reqs)
        while remaining:
            snap = await q.get()
            if snap.finished:
                if self.done[snap.index]:
                    continue
                self.done[snap.index] = True
                remaining -= 1
            yield snap

    async def wait(self, single: bool) -> dict | list[dict]:
        q = self._attach(finished_only=True)  # only the final state is returned
        try:
            async for _ in self._events(q):
                pass
        finally:  # also on cancellation: abort and free pages
            self.abort_unfinished()
        return self.shape([self.final(i) for i in range(len(self.reqs))], single)

    def stream(self, single: bool) -> AsyncIterator[dict]:
        async def gen() -> AsyncIterator[dict]:
            q = self._attach()
            try:
                async for snap in self._events(q):
                    out = self.chunk(snap, with_index=not single)
                    if out is not None:
                        yield out
            finally:
                self.abort_unfinished()

        return gen()


# --- helpers ------------------------------------------------------------------------------------


def _collect_young_before_call() -> None:
    """The cyclic GC's young pass before a call's requests exist (engine_setup.raise_gc_threshold)."""
    from pipeline_infer.engine_setup import collect_young_before_call

    collect_young_before_call()


def _request_ids(rid, n: int) -> list[str]:
    if rid is None:
        # 32 random hex digits each, as uuid4().hex, from one read of the OS's random source: a
        # uuid4() per request is a system call each (53 ms of a 1,024-prompt call under cProfile
        # on a GPU host).
        digits = os.urandom(16 * n).hex()
        return [digits[i : i + 32] for i in range(0, 32 * n, 32)]
    rids = [rid] if isinstance(rid, str) else list(rid)
    if len(rids) != n or not all(isinstance(r, str) for r in rids):
        raise ValueError(f"rid must be a str per prompt ({n} prompts), got {rid!r}")
    return rids


def _configure_logging(level: str) -> None:
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pipeline-infer")
    except Exception:
        return "unknown"
