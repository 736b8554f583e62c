"""A tiny sampling profiler for one Python thread: where does the engine thread spend its time?

cProfile sees only the thread that starts it and slows every call; this samples the target
thread's stack from another thread every `interval` seconds (sys._current_frames), so the
engine runs at its own speed, and counts each sample's innermost frames of our code. Used by
benchmarks/job_rate_over_time.py --breakdown to compare a young engine with an aged one.

Bias: the sampler needs the GIL to read a stack, so it mostly samples the target while that
thread has released the GIL (host-to-device copies, CUDA syncs, sleeps) or at a forced switch;
pure-Python stretches such as the scheduler are underweighted. Use it to point, and the
engine's step timing (Engine(enable_step_timing=True)) to measure.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

_OURS = ("pipeline_infer", "operators")


def _where(frame, depth: int) -> str:
    """The innermost `depth` frames in our packages (file:function), innermost first."""
    names = []
    while frame is not None and len(names) < depth:
        path = frame.f_code.co_filename
        if any(f"{os.sep}{p}{os.sep}" in path for p in _OURS):
            names.append(f"{os.path.basename(path)}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(names) or "(outside our code)"


class ThreadSampler:
    def __init__(self, thread_name: str, interval: float = 0.002, depth: int = 3):
        self.thread_name, self.interval, self.depth = thread_name, interval, depth
        self.counts: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ThreadSampler":
        self.counts.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> collections.Counter[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.counts

    def _run(self) -> None:
        while not self._stop.is_set():
            ident = next((t.ident for t in threading.enumerate() if t.name == self.thread_name), None)
            frame = sys._current_frames().get(ident) if ident else None
            if frame is not None:
                self.counts[_where(frame, self.depth)] += 1
            del frame
            time.sleep(self.interval)

    def report(self, top: int = 15) -> str:
        total = sum(self.counts.values()) or 1
        lines = [f"  {100 * n / total:5.1f}%  {where}" for where, n in self.counts.most_common(top)]
        return f"  {total} samples of thread {self.thread_name!r}:\n" + "\n".join(lines)
