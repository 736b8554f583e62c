"""EngineCore: the thread that owns the scheduler and the model runner.

Front ends (sync, async, streaming) talk to it only through `submit`, `abort` and `call`,
which enqueue messages; the loop drains them between steps, so scheduler state is only
ever touched from this one thread. Outputs go back through each request's `on_output`
callback, called on this thread: callbacks must be quick and thread-safe (they put into
a queue or schedule onto an event loop).

Because the loop runs on its own thread, the sync API needs no event loop at all and
works inside a running asyncio loop (Jupyter) without nest_asyncio.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from concurrent.futures import Future
from typing import Any, Callable

from pipeline_infer.request import FinishReason, Request, RequestStatus
from pipeline_infer.scheduler import Scheduler

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner, timer=None, overlap: bool = False):
        self.scheduler = scheduler
        self.runner = runner
        # step_timing.StepTimer or None (the default: then the loop below does no timing work).
        # The runner gets the same one for the build / device split inside run().
        self.timer = timer
        runner.timer = timer
        # Overlap schedule: schedule and launch step N+1 before collecting step N's tokens, so
        # the host's work for a step runs while the device computes the previous one.
        self.overlap = overlap
        self._sync_reqs: set[Request] = set()  # unfinished requests that need steps in lockstep
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Set while this thread waits on the device for a step's tokens, or for messages with
        # nothing to run: when a front end making requests beside the steps should (wait_for_device).
        self._device_wait = threading.Event()
        self._idle = threading.Event()
        self._wait_lock = threading.Lock()  # orders submit's put against the idle block's inbox check
        self._stopping = False
        self.num_steps = 0
        self.num_generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="pipeline-infer-engine", daemon=True)
        self._thread.start()

    # --- called from any thread --------------------------------------------------------
    def submit(self, reqs: list[Request]) -> None:
        with self._wait_lock:  # against _drain's check of the inbox before it blocks
            self._inbox.put(("add", reqs))
            if self._idle.is_set():
                # It wakes for these: no longer out of the way of a front end (wait_for_device).
                self._device_wait.clear()

    def abort(self, rids: list[str]) -> None:
        self._inbox.put(("abort", rids))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps and return its result (or raise its error)."""
        fut: Future = Future()
        self._inbox.put(("call", (fn, fut)))
        return fut.result()

    def wait_for_device(self, timeout: float) -> None:
        """Return once this thread waits on the device (or is idle), or after timeout seconds.

        For a front end that makes requests while steps run (a large generate call's later
        slices): its Python and this thread's share one GIL, and each torch call here hands the
        GIL over and then waits for it up to the switch interval (0.5 ms), so requests made beside
        a step's host work delay that step's launch (H200, 1,024 shared-prefix prompts: the first
        step launched 56 ms after the call instead of 15 with the requests made before). Made
        while this thread waits for the device they delay nothing. Idle (blocked on an empty
        inbox) counts as waiting; requests just submitted to an idle engine end that (`submit`).
        """
        self._device_wait.wait(timeout)

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        inflight = None  # a launched step not yet committed (overlap schedule only)
        while True:
            # Block for messages only when there is nothing to run.
            block = not self.scheduler.has_work and inflight is None
            if block:
                self.runner.on_idle()
            if not self._drain(block):
                break
            timer = self.timer
            if timer is not None:
                timer.begin()
            batch = None
            if inflight is None or self._may_overlap():
                try:
                    batch = self.scheduler.schedule()
                except Exception as exc:  # a scheduler bug: fail what is queued, keep serving
                    logger.error("scheduling failed: %s", traceback.format_exc())
                    if timer is not None:
                        timer.abandon()
                    if inflight is not None:
                        self._commit(inflight)
                        inflight = None
                    self._fail_all(exc)
                    continue
            launched = None
            if batch is not None:
                if timer is not None:
                    timer.scheduled(batch)
                try:
                    launched = self.runner.launch(batch)
                except Exception as exc:  # a failed step fails its requests, not the engine
                    logger.error("step failed: %s", traceback.format_exc())
                    self._fail(batch, exc)
            if launched is None and timer is not None:
                timer.abandon()  # nothing launched (or it failed): no step to record
            if inflight is not None:  # its tokens arrive while the step just launched runs
                self._commit(inflight)
                inflight = None
            elif launched is not None and self.overlap and timer is not None:
                timer.on_host(synced=False)  # nothing was collected in this iteration
            if launched is not None:
                self.num_steps += 1
                if self.overlap:
                    inflight = launched
                else:
                    self._commit(launched)
                if timer is not None:
                    timer.end()
            elif batch is None and inflight is None and self.scheduler.has_work:
                # Work is queued but none can run (e.g. waiting on pages): wait for a message
                # briefly instead of spinning.
                if not self._drain(True, timeout=0.005):
                    break
        if inflight is not None:
            self._commit(inflight)
        self._shutdown_requests()

    def _may_overlap(self) -> bool:
        """Whether the next step may be scheduled while one is in flight (see Scheduler.overlap_safe)."""
        if not self.overlap:
            return False
        if self._sync_reqs:
            self._sync_reqs = {r for r in self._sync_reqs if not r.is_finished}
            if self._sync_reqs:
                return False
        return self.scheduler.overlap_safe()

    def _commit(self, launched) -> None:
        """Wait for a launched step's tokens and apply them."""
        try:
            self._device_wait.set()
            try:
                tokens = self.runner.collect(launched)
            finally:
                self._device_wait.clear()
        except Exception as exc:  # e.g. a device error surfacing at the sync
            logger.error("step failed: %s", traceback.format_exc())
            self._fail(launched.batch, exc)
            return
        updated = self.scheduler.commit(launched.batch, tokens)
        self.num_generated_tokens += self.scheduler.last_commit_tokens
        finished = RequestStatus.FINISHED
        for req in updated:
            if req.output_every_step or req.status is finished:
                self._emit(req)

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Handle queued messages; False once asked to stop."""
        while True:
            if block:
                # Blocked on the inbox, this thread needs the GIL no more than while it waits on
                # the device: a front end waiting for that (wait_for_device) may go on. Checking
                # `_idle` alone there missed the moment between a call's last results and this
                # point (on_idle runs in it): the front end then waited its whole timeout. Not
                # set with a message already in (it wakes at once), nor left set by one put in
                # now (`submit`, under the same lock): a front end would take it for a device wait.
                with self._wait_lock:
                    self._idle.set()
                    if self._inbox.empty():
                        self._device_wait.set()
            try:
                kind, payload = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            finally:
                if block:
                    self._idle.clear()
                    self._device_wait.clear()
            block = False
            if kind == "add":
                for req in payload:
                    scores_prompt = req.extra_outputs is not None and req.extra_outputs.needs_prefill
                    if req.params.max_new_tokens == 0 and not scores_prompt:  # nothing to do: done at once
                        req.finish(FinishReason("length", None))
                        self._emit(req)
                    else:
                        self.scheduler.add(req)
                        if req.needs_sync:
                            self._sync_reqs.add(req)
            elif kind == "abort":
                for rid in payload:
                    req = self.scheduler.abort(rid)
                    if req is not None:
                        self._emit(req)
            elif kind == "call":
                fn, fut = payload
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
            elif kind == "stop":
                return False

    def _emit(self, req: Request) -> None:
        on_output = req.on_output
        if on_output is not None:
            finished = req.status is RequestStatus.FINISHED  # once per request per step: no property call
            if finished:
                # The callback closes over its call's collector, which holds the call's
                # requests: a reference cycle through every request of the call, which only
                # the cyclic GC could free (and whose every collection walks each request's
                # token list). Dropped at the last output, they go by reference counting.
                req.on_output = None
            try:
                on_output(req, finished)
            except Exception:  # a broken consumer must not take the engine down
                logger.error("output callback failed: %s", traceback.format_exc())

    def _fail(self, batch, exc: Exception) -> None:
        seen = set()
        for chunk in batch.chunks:
            req = chunk.req
            if id(req) in seen or req.is_finished:
                continue
            seen.add(id(req))
            self.scheduler.abort(req.rid)
            req.finish_reason = FinishReason("abort", None, f"engine error: {type(exc).__name__}: {exc}")
            self._emit(req)

    def _fail_all(self, exc: Exception) -> None:
        for req in list(self.scheduler.waiting) + list(self.scheduler.running):
            try:
                self.scheduler.abort(req.rid)
            except Exception:  # the state that broke scheduling may break abort too
                req.finish(FinishReason("abort", None))
            if req in self.scheduler.waiting:
                self.scheduler.waiting.remove(req)
            if req in self.scheduler.running:
                self.scheduler.running.remove(req)
            req.finish_reason = FinishReason("abort", None, f"engine error: {type(exc).__name__}: {exc}")
            self._emit(req)

    def _shutdown_requests(self) -> None:
        for req in list(self.scheduler.waiting) + list(self.scheduler.running):
            self.scheduler.abort(req.rid)
            req.finish_reason = FinishReason("abort", None, "engine shut down")
            self._emit(req)
