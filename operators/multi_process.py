"""One host, several GPUs, no Ray: a file job as one engine process per GPU.

    run_job(op, "data/", "out/", num_gpus=4)          # pipeline-infer generate --num-gpus 4 ...

The calling process is the coordinator: it checks the arguments, finds the input files and
clears temp files a killed run left (once, before any worker starts), then starts one worker
process per device, each with CUDA_VISIBLE_DEVICES pinned to its GPU (on a machine without GPUs,
N plain CPU processes, their torch threads split between them). Every worker runs the ordinary
file job over the same inputs but writes only the parts it claims: the parts are numbered in the
order a single process would write them (file by file, part by part), and a worker claims part k
when its job reaches it, by creating the file `k` in a claims folder the coordinator made for
this job on the local disk (job.PartClaims; removed when the job ends). The create is atomic, so
each part has exactly one worker, and the shares are disjoint and cover the input: the output is
the one a single process writes, with the same part names, rows, footer keys and row seeds. Parts
an earlier run finished are claimed too, so each is counted as skipped by one worker, and the
summed JobResult is the one a single process reports. Resume is the single-process job's, part by
part: a rerun with any number of workers, one included, skips the parts any earlier run finished.

A worker that fails stops the job: the others are stopped too (their finished parts stay, their
parts in flight are lost, as in a killed single-process job) and the error is raised here. A
worker whose coordinator dies exits by itself. Progress comes back to one bar in the coordinator.

Balance: a worker claims a part only when its runner pulls the part's first batch, so it holds
at most about `window` + 1 claimed parts it has not written; a faster GPU takes more parts, and
the workers run out of work at about the same time. The unit is still the part: use at least a
few parts per worker (`rows_per_part`), small enough that the last ones do not keep one GPU busy
long after the others.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline_infer.operators.job import JobResult

logger = logging.getLogger("pipeline_infer.operators")

# Raised again as themselves in the coordinator (the CLI shows them as usage errors): a worker
# finds the same bad configuration or data a single process would (a missing column, ...).
_USER_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries for its children."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return []
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        ids = [d.strip() for d in pinned.split(",") if d.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def num_workers(num_gpus: int | None) -> tuple[int, list[str]]:
    """(engine processes to run, the GPUs to pin them to; empty on a machine without GPUs).

    num_gpus=None: one per visible GPU, or 1 without GPUs. N on a machine without GPUs: N CPU processes.
    """
    if num_gpus is not None and (not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1):
        raise ValueError(f"num_gpus must be an int >= 1 or None (every visible GPU), got {num_gpus!r}")
    if num_gpus == 1:
        return 1, []  # the plain in-process job: no need to look at devices
    gpus = visible_gpus()
    if num_gpus is None:
        return max(1, len(gpus)), gpus
    if gpus and num_gpus > len(gpus):
        raise ValueError(f"num_gpus={num_gpus} but only {len(gpus)} GPU(s) are visible (CUDA devices {','.join(gpus)})")
    return num_gpus, gpus[:num_gpus]


@dataclass
class MultiJobResult(JobResult):
    """The workers' JobResults summed up, and each of them in `workers` (in worker order)."""

    workers: list[JobResult] = field(default_factory=list)


def run_workers(
    op: Any,
    input: Any,
    output: str,
    job_kwargs: dict[str, Any],
    workers: int,
    gpus: list[str],
    total_rows: int | None,
    progress: bool,
    started: float,
) -> MultiJobResult:
    """Run the job as `workers` processes; called by run_job once it has checked its arguments."""
    from pipeline_infer.operators.progress import JobProgress

    device = str(op.config["engine_options"].get("device", "auto"))
    if device.startswith("cuda:") and device != "cuda:0":
        raise ValueError(f"engine option device={device!r} pins one GPU, but each worker has its own: use 'cuda' or 'auto'")
    # Local disk, fresh per job: claims from another run must not hide parts from this one.
    claims = tempfile.mkdtemp(prefix="pipeline-infer-claims-")
    spec = {"op": op.config, "input": input, "output": output, "kwargs": job_kwargs, "claims": claims}
    procs: list[_Proc] = []
    bar = None
    results: list[Any] = [None] * workers
    failure: tuple[int, dict[str, Any] | None, int] | None = None
    try:
        for i in range(workers):
            procs.append(_start(i, workers, gpus[i] if gpus else None, spec))
        bar = JobProgress(total_rows, enabled=progress)
        failure = _collect(procs, bar, results)
    finally:
        if bar is not None:
            bar.close()
        _stop(procs)  # on failure or interrupt: none may go on writing parts behind our back
        shutil.rmtree(claims, ignore_errors=True)  # after _stop: no worker claims any more
    if failure is not None:
        index, error, code = failure
        where = f"worker {index}" + (f" (GPU {gpus[index]})" if gpus else "")
        if error is not None:
            raise _USER_ERRORS.get(error["type"], RuntimeError)(
                error["message"] if error["type"] in _USER_ERRORS else f"{where} failed: {error['type']}: {error['message']}"
            )
        raise RuntimeError(f"{where} exited with code {code} before finishing; rerun to resume (finished parts are kept)")
    merged = merge_results(output, [JobResult(**r) for r in results])
    merged.seconds = time.perf_counter() - started
    return merged


def merge_results(output: str, results: list[JobResult]) -> MultiJobResult:
    """The workers' results as one: part lists joined and sorted, counts summed. Each part was
    claimed by one worker, which alone counted it, so this is what a single process reports."""
    merged = MultiJobResult(output=output, workers=list(results))
    for f in fields(JobResult):
        values = [getattr(r, f.name) for r in merged.workers]
        if f.name in ("output", "seconds") or not values:
            continue
        if all(isinstance(v, list) for v in values):  # part names: sorted, as one process lists them
            setattr(merged, f.name, sorted(name for v in values for name in v))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):  # counts
            setattr(merged, f.name, sum(values))
    return merged


# The worker's entry point. It drops the working directory from sys.path first, as the console
# script does: run from a checkout, the repository's top-level `kernels` folder would otherwise
# shadow the Hugging Face package of that name.
_WORKER_BOOT = (
    "import sys; del sys.path[0]; from pipeline_infer.operators.multi_process import _worker_main; "
    "sys.exit(_worker_main(int(sys.argv[1]), int(sys.argv[2])))"
)


@dataclass
class _Proc:
    index: int
    popen: subprocess.Popen
    channel: Any  # the read end of the worker's message pipe
    buffer: bytes = b""


def _worker_env(gpu: str | None, count: int) -> dict[str, str]:
    """The environment of one of `count` workers, pinned to `gpu` (None: a CPU worker)."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # CPU workers share the cores: without a cap each would start a thread per core (torch's
    # intra-op pool), and N pools of spinning threads slow them all. A GPU worker's engine
    # runs torch on one host thread by itself (engine_setup.limit_host_threads).
    if gpu is None:
        threads = str(max(1, (os.cpu_count() or 1) // count))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _start(index: int, count: int, gpu: str | None, spec: dict[str, Any]) -> _Proc:
    env = _worker_env(gpu, count)
    read_fd, write_fd = os.pipe()
    payload = pickle.dumps({**spec, "shard": (index, count)})
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(write_fd), str(os.getpid())],
            stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,),
        )
    finally:
        os.close(write_fd)
    try:
        popen.stdin.write(payload)
        popen.stdin.close()
    except BrokenPipeError:  # it died at once; its exit code tells the rest
        pass
    return _Proc(index, popen, os.fdopen(read_fd, "rb", buffering=0))


def _collect(procs: list[_Proc], bar: Any, results: list[Any]) -> tuple[int, dict[str, Any] | None, int] | None:
    """Feed the bar until every worker is done; the first failure as (worker, error, exit code)."""
    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.channel, selectors.EVENT_READ, p)
    errors: dict[int, dict[str, Any]] = {}
    open_channels = len(procs)
    while open_channels:
        for key, _ in sel.select(timeout=1.0):
            p: _Proc = key.data
            chunk = p.channel.read(65536)
            if not chunk:  # the worker closed its end: it finished or died
                sel.unregister(p.channel)
                p.channel.close()
                open_channels -= 1
                code = p.popen.wait()
                if code != 0 or results[p.index] is None:
                    return p.index, errors.get(p.index), code
                continue
            p.buffer += chunk
            *lines, p.buffer = p.buffer.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "done" in msg:
                    bar.done(*msg["done"])
                elif "skip" in msg:
                    bar.skip(msg["skip"])
                elif "result" in msg:
                    results[p.index] = msg["result"]
                elif "error" in msg:
                    errors[p.index] = msg["error"]
    return None


def _stop(procs: list[_Proc], grace: float = 10.0) -> None:
    running = [p for p in procs if p.popen.poll() is None]
    for p in running:
        p.popen.terminate()
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
    for p in procs:
        if not p.channel.closed:
            p.channel.close()


# --- the worker side -----------------------------------------------------------------------------------


class _Reporter:
    """The worker's stand-in for the progress bar: one JSON line per event to the coordinator."""

    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "wb", buffering=0)
        self.lock = threading.Lock()  # not needed by the job today; cheap insurance

    def send(self, msg: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps(msg, default=str).encode() + b"\n")

    def skip(self, rows: int) -> None:
        self.send({"skip": rows})

    def done(self, rows: int, tokens: int, errors: int) -> None:
        self.send({"done": [rows, tokens, errors]})

    def close(self) -> None:
        pass  # the job closes its bar; the channel stays open for the result


def _die_with(parent: int) -> None:
    """Exit when the coordinator does, even if it was SIGKILLed and could not stop us."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    threading.Thread(target=watch, name="pipeline-infer-parent-watch", daemon=True).start()


def _worker_main(fd: int, parent: int) -> int:
    _die_with(parent)
    reporter = _Reporter(fd)
    spec = pickle.loads(sys.stdin.buffer.read())
    from dataclasses import asdict

    from pipeline_infer.operators.generate_op import GenerateOp
    from pipeline_infer.operators.job import run_job

    try:
        op = GenerateOp(**spec["op"])
        result = run_job(op, spec["input"], spec["output"], progress=reporter, shard=tuple(spec["shard"]),
                         claims=spec["claims"], **spec["kwargs"])
    except BaseException as e:
        reporter.send({"error": {"type": type(e).__name__, "message": str(e)}})
        if type(e).__name__ in _USER_ERRORS:
            return 2  # the coordinator raises it with its message; no traceback per worker
        raise
    reporter.send({"result": asdict(result)})
    return 0
