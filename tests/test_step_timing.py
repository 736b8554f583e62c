"""Engine(enable_step_timing=True): the per-step host vs device breakdown (step_timing.py), on the CPU."""

from __future__ import annotations

import random
import time

import pytest
import torch

from pipeline_infer import Engine
from tiny_models import VOCAB, make_tiny_model

GREEDY = {"temperature": 0, "max_new_tokens": 12}
TOL_S = 1e-3  # rounding of the summary's figures plus the timer's own clock reads


def _prompts(seed: int, n: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2")[0]


def _check_parts(s: dict) -> None:
    parts = ("schedule_s", "build_s", "forward_s", "device_s", "post_s")
    assert all(s[p] >= 0 for p in parts), s
    # forward holds the device time; the host parts and forward tile the step.
    assert s["schedule_s"] + s["build_s"] + s["forward_s"] + s["post_s"] <= s["wall_s"] + TOL_S, s
    assert s["device_s"] + s["schedule_s"] + s["build_s"] + s["post_s"] <= s["wall_s"] + TOL_S, s
    assert s["host_s"] == pytest.approx(s["wall_s"] - s["device_s"], abs=TOL_S)
    assert s["other_host_s"] >= -TOL_S
    if s["steps"]:
        assert s["device_pct"] + s["host_pct"] == pytest.approx(100, abs=0.2)


def test_summary_matches_engine_steps_and_outputs_unchanged(checkpoint):
    prompts = _prompts(1, 12)
    # A small prefill chunk so the workload has prefill-only, mixed and decode-only steps.
    opts = dict(page_size=1, chunked_prefill_size=48, disable_radix_cache=True)
    with Engine(checkpoint, **opts) as llm:
        plain = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=GREEDY)]
    with Engine(checkpoint, enable_step_timing=True, **opts) as llm:
        timed = [o["output_ids"] for o in llm.generate(input_ids=prompts, sampling_params=GREEDY)]
        s = llm.step_timing_summary()
        steps = llm.get_server_info()["num_steps"]
    assert timed == plain
    assert s["steps"] == steps > 0
    assert s["tokens"] == sum(map(len, prompts)) + len(prompts) * (GREEDY["max_new_tokens"] - 1)
    _check_parts(s)
    assert s["span_s"] >= s["wall_s"] - TOL_S
    kinds = s["by_kind"]
    assert sum(k["steps"] for k in kinds.values()) == steps
    assert kinds["prefill"]["steps"] > 0 and kinds["mixed"]["steps"] > 0 and kinds["decode"]["steps"] > 0
    for k in kinds.values():
        _check_parts(k)
    assert s["forward_s"] == pytest.approx(s["device_s"], abs=TOL_S)  # CPU: the device is the host


def test_kinds_of_a_known_workload_and_reset(checkpoint):
    with Engine(checkpoint, enable_step_timing=True, page_size=1, chunked_prefill_size=16) as llm:
        # One 40-token prompt in chunks of 16: two prefill steps that sample nothing (no sync),
        # a third that samples the first token, then 4 decode steps of one request.
        llm.generate(input_ids=_prompts(2, 1, 40, 40), sampling_params={"temperature": 0, "max_new_tokens": 5})
        s = llm.step_timing_summary(reset=True)
        assert (s["steps"], s["by_kind"]["prefill"]["steps"], s["by_kind"]["decode"]["steps"]) == (7, 3, 4)
        assert s["by_kind"]["mixed"]["steps"] == 0
        assert s["by_kind"]["prefill"]["tokens"] == 40 and s["by_kind"]["decode"]["tokens"] == 4
        assert s["by_kind"]["decode"]["mean_batch_size"] == 1
        _check_parts(s)

        # After the reset only new steps count: 8 two-token prompts, prefilled together in one
        # 16-token chunk, then decoded.
        before = llm.get_server_info()["num_steps"]
        llm.generate(input_ids=_prompts(3, 8, 2, 2), sampling_params={"temperature": 0, "max_new_tokens": 6})
        s = llm.step_timing_summary(steps=True)
        assert s["steps"] == llm.get_server_info()["num_steps"] - before == 6
        assert s["by_kind"]["prefill"]["steps"] == 1 and s["by_kind"]["decode"]["steps"] == 5
        assert s["by_kind"]["decode"]["mean_batch_size"] == 8
        assert s["median_step_ms"] > 0 and s["median_device_ms"] > 0
        # The step records agree with the totals; on the CPU the device is the host: never idle.
        recs = s["step_records"]
        assert [(r["kind"], r["batch_size"], r["tokens"]) for r in recs] == [("prefill", 8, 16)] + [("decode", 8, 8)] * 5
        assert sum(r["wall_ms"] for r in recs) / 1e3 == pytest.approx(s["wall_s"], abs=TOL_S)
        assert s["idle_s"] == 0 and all(r["idle_ms"] == 0 for r in recs)


def test_off_by_default(checkpoint):
    with Engine(checkpoint, page_size=1) as llm:
        assert llm._core.timer is None and llm._runner.timer is None
        with pytest.raises(RuntimeError, match="enable_step_timing"):
            llm.step_timing_summary()


class _HostEvent:
    """Stands in for torch.cuda.Event on the CPU: a host clock read at record()."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    recorded: list["_HostEvent"] = []  # every record(), in order

    def record(self):
        self.t = time.perf_counter()
        _HostEvent.recorded.append(self)

    def synchronize(self):
        pass

    def query(self) -> bool:  # done at once: the CPU ran the step before record() returned
        return True

    def elapsed_time(self, end: "_HostEvent") -> float:  # ms, like CUDA's
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1e3


def test_cuda_event_bookkeeping(checkpoint, monkeypatch):
    """The CUDA path's logic (events per step, steps without a sync read later) with host events."""
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    with Engine(checkpoint, enable_step_timing=True, page_size=1, chunked_prefill_size=16) as llm:
        timer = llm._core.timer
        timer.cuda = True

        def dev_and_fwd():
            return list(timer.times["device"]), list(timer.times["forward"]), list(timer._pending)

        # Two non-sampling prefill chunks (no sync: their events wait), then a sampling one.
        _HostEvent.recorded.clear()
        llm.generate(input_ids=_prompts(4, 1, 40, 40), sampling_params={"temperature": 0, "max_new_tokens": 3})
        device, forward, pending = llm._core.call(dev_and_fwd)
        assert len(device) == 5 and not pending  # the last step synced: everything read
        assert all(0 < d <= f for d, f in zip(device, forward))
        s = llm.step_timing_summary(steps=True)
        assert s["steps"] == 5 and 0 < s["device_s"] <= s["forward_s"]
        _check_parts(s)
        # Idle time: from each step's end event to the next one's start event (the host clock
        # here), none before the first step after a reset; each step's record carries it.
        recs = s["step_records"]
        assert len(recs) == 5 and recs[0]["idle_ms"] == 0
        assert all(r["idle_ms"] > 0 for r in recs[1:]), recs
        assert sum(r["idle_ms"] for r in recs) / 1e3 == pytest.approx(s["idle_s"], abs=TOL_S)
        # Each step records its start event, then its end event: idle is the time between the
        # last step's end and this one's start.
        ev = _HostEvent.recorded
        assert len(ev) == 10
        for i in range(1, 5):
            assert recs[i]["idle_ms"] == pytest.approx((ev[2 * i].t - ev[2 * i - 1].t) * 1e3, abs=1e-3)
        assert [r["kind"] for r in recs] == ["prefill"] * 3 + ["decode"] * 2
