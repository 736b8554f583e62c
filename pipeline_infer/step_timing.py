"""Opt-in per-step time breakdown: where a step's wall time goes, host work vs device work.

Enabled by `Engine(enable_step_timing=True)`; off by default, and then nothing here runs
(the engine loop and the runner test `timer is not None` and skip it all).

One step of the engine loop, and what each field measures (perf_counter on the host):

    schedule   Scheduler.schedule()                                      host
    build      build_forward_batch + attention plan (+ StepExtras.plan)  host
    forward    launch of forward + sampler until the tokens are on the   host wall; holds device
               host (the step's one existing synchronisation); on a
               CUDA-graph step also the copy into the graph's buffers
    post       Scheduler.commit (append, detokenize, stop checks, free   host
               pages) and the per-request output callbacks
    idle       the device's idle time before the step's work: from the   device
               previous recorded step's end event to this one's start
               (CUDA only; 0 for the first step after a reset and on the
               CPU). With the overlap schedule it is the host work the
               device waited for; summed, what the host cost the run
               between its first and last step.

`device` is the time the device was busy with forward + sample. On CUDA it is a
torch.cuda.Event pair recorded around them and read only after the step's own `tolist()`
sync, so timing adds no synchronisation (a step that does not sync, a prefill chunk that
samples nothing, is read after a later step's sync, or by summary(); its device time can
exceed its own forward, the rest of that work being waited for in the next step's forward,
so only totals, not such a step alone, split exactly). On the CPU the
"device" is the host itself, so device = forward. host = wall - device = schedule + build
+ post + other, where other is launch overhead and waiting not covered by device work.

Caveat: an event pair measures the stream's span from the first to the last kernel, gaps
included. Where the host launches kernels more slowly than the GPU runs them (eager mode,
small batches), the GPU's idle gaps count as device time; with a CUDA-graph replay the span
is close to busy time. A profiler trace is the check when the two may differ.

Steps that fail (the runner raised) or schedule nothing are not recorded, so the number of
records equals the steps EngineCore counted since the last reset. Records are kept in
flat arrays, not per-step Python objects, so a long run adds nothing for the GC to scan.
"""

from __future__ import annotations

import statistics
import time
from array import array

import torch

_perf = time.perf_counter
KINDS = ("decode", "prefill", "mixed")
_TIMES = ("start", "wall", "schedule", "build", "forward", "device", "post", "idle")


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.kind = array("b")  # index into KINDS
        self.batch_size = array("l")
        self.tokens = array("l")
        self.times = {name: array("d") for name in _TIMES}  # seconds
        self._pending: list[tuple[int, object, object, object]] = []  # (step, start, end, last step's end) unread
        self._events: list = []
        self._last_end = None  # the last recorded step's end event (for the next step's idle time)
        self._synced = True

    # --- hooks, in the order one step calls them (engine thread only) -------------------
    def begin(self) -> None:
        self._t0 = self._t = _perf()

    def scheduled(self, batch) -> None:
        now = _perf()
        n_prefill = 0 if batch.decode_reqs is not None else sum(1 for c in batch.chunks if c.prefill)
        self._kind = 0 if n_prefill == 0 else 1 if n_prefill == batch.size else 2
        self._bs, self._tokens = batch.size, batch.num_tokens
        self._schedule, self._t = now - self._t, now

    def built(self) -> None:
        """Host set-up done; the device work (forward + sample) is launched next."""
        now = _perf()
        self._build, self._t = now - self._t, now
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True)]
            self._events[0].record()

    def launched(self) -> None:
        """Forward + sample are launched (on CUDA not necessarily finished)."""
        if self.cuda:
            self._events.append(torch.cuda.Event(enable_timing=True))
            self._events[1].record()

    def on_host(self, synced: bool = True) -> None:
        """The step's results are on the host; synced=False when the step did not synchronise."""
        now = _perf()
        self._forward, self._t = now - self._t, now
        self._synced = synced

    def end(self) -> None:
        now = _perf()
        idx = len(self.kind)
        self.kind.append(self._kind)
        self.batch_size.append(self._bs)
        self.tokens.append(self._tokens)
        t = self.times
        t["start"].append(self._t0)
        t["wall"].append(now - self._t0)
        t["schedule"].append(self._schedule)
        t["build"].append(self._build)
        t["forward"].append(self._forward)
        t["post"].append(now - self._t)
        t["idle"].append(0.0)  # filled in from the events below (CUDA)
        if not self.cuda:
            t["device"].append(self._forward)
            return
        t["device"].append(0.0)  # filled in from the events below
        if len(self._events) == 2:
            self._pending.append((idx, *self._events, self._last_end))
            self._last_end = self._events[1]
        self._events = []
        if self._synced:  # this step synced after recording every pending event: none waits
            self._read_pending(wait=False)

    def abandon(self) -> None:
        """The step failed or scheduled nothing: record nothing."""
        self._events = []

    def _read_pending(self, wait: bool) -> None:
        """Device times of the recorded steps; wait=False reads only those already finished (with
        the overlap schedule a step's sync is for the step before it)."""
        dev, idle = self.times["device"], self.times["idle"]
        left = []
        for item in self._pending:
            idx, start, end, last_end = item
            if wait:
                end.synchronize()
            elif not end.query():
                left.append(item)
                continue
            dev[idx] = start.elapsed_time(end) / 1e3
            if last_end is not None:  # done before start, which is done: the stream runs in order
                idle[idx] = max(0.0, last_end.elapsed_time(start) / 1e3)
        self._pending = left

    # --- results ---------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.kind)

    def records(self) -> list[dict]:
        """Every recorded step: its kind, batch size, tokens, and its times in ms (start: the
        host clock's, for order and spacing)."""
        self._read_pending(wait=True)
        t = self.times
        return [
            {"kind": KINDS[self.kind[i]], "batch_size": self.batch_size[i], "tokens": self.tokens[i],
             **{f"{f}_ms": round(t[f][i] * 1e3, 4) for f in _TIMES}}
            for i in range(len(self.kind))
        ]

    def summary(self) -> dict:
        """Totals (s), shares of the summed step wall time, medians (ms), overall and per step kind."""
        self._read_pending(wait=True)  # off the hot path: called between steps
        n = len(self.kind)
        out = self._aggregate(range(n))
        t = self.times
        # First step's start to last step's end: wall_s plus the engine loop's time between steps.
        out["span_s"] = round(t["start"][-1] + t["wall"][-1] - t["start"][0], 6) if n else 0.0
        out["by_kind"] = {
            name: self._aggregate([i for i in range(n) if self.kind[i] == k]) for k, name in enumerate(KINDS)
        }
        return out

    def _aggregate(self, idx) -> dict:
        t = self.times
        n = len(idx)
        tot = {f: sum(t[f][i] for i in idx) for f in _TIMES[1:]}
        wall, host = tot["wall"], tot["wall"] - tot["device"]
        out = {
            "steps": n,
            "tokens": sum(self.tokens[i] for i in idx),
            "mean_batch_size": round(sum(self.batch_size[i] for i in idx) / n, 2) if n else 0.0,
            **{f"{f}_s": round(v, 6) for f, v in tot.items()},
            "host_s": round(host, 6),
            "other_host_s": round(host - tot["schedule"] - tot["build"] - tot["post"], 6),
            "device_pct": round(100 * tot["device"] / wall, 1) if wall else 0.0,
            "host_pct": round(100 * host / wall, 1) if wall else 0.0,
        }
        if n:
            out["median_step_ms"] = round(1e3 * statistics.median(t["wall"][i] for i in idx), 3)
            out["median_device_ms"] = round(1e3 * statistics.median(t["device"][i] for i in idx), 3)
            out["median_host_ms"] = round(1e3 * statistics.median(t["wall"][i] - t["device"][i] for i in idx), 3)
        return out
