"""A CUDA engine runs torch's CPU ops on one thread (engine_setup.limit_host_threads), the
user's OMP_NUM_THREADS wins, and the count comes back when the last engine shuts down. It
also shortens the GIL's switch interval (shorten_gil_switch_interval) on the same terms.
No GPU is needed: both only look at the device's type. Every engine (any device) raises the
cyclic GC's young-generation threshold (raise_gc_threshold), on the same terms again."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from pipeline_infer.engine_setup import (
    GC_CALL_COLLECT_MIN,
    GC_YOUNG_THRESHOLD,
    GIL_SWITCH_INTERVAL_S,
    collect_young_before_call,
    limit_host_threads,
    raise_gc_threshold,
    release_host_threads,
    restore_gc_threshold,
    restore_gil_switch_interval,
    shorten_gil_switch_interval,
)
from pipeline_infer.operators.multi_process import _worker_env

CUDA = torch.device("cuda")


@pytest.fixture
def pool_of_two(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_cuda_engines_share_one_limit_and_the_last_restores(pool_of_two):
    assert limit_host_threads(CUDA) is True
    assert torch.get_num_threads() == 1
    assert limit_host_threads(CUDA) is True  # a second engine in the same process
    release_host_threads()
    assert torch.get_num_threads() == 1  # the first one still runs
    release_host_threads()
    assert torch.get_num_threads() == 2


def test_cpu_engine_keeps_the_pool(pool_of_two):
    assert limit_host_threads(torch.device("cpu")) is False
    assert torch.get_num_threads() == 2


def test_users_omp_num_threads_wins(pool_of_two, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert limit_host_threads(CUDA) is False
    assert torch.get_num_threads() == 2


def test_a_count_changed_meanwhile_is_left_alone(pool_of_two):
    assert limit_host_threads(CUDA) is True
    torch.set_num_threads(3)  # the user's own choice while the engine ran
    release_host_threads()
    assert torch.get_num_threads() == 3


def test_worker_env_caps_threads_for_cpu_workers_only(monkeypatch):
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cpu = _worker_env(None, 2)
    assert cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "CUDA_VISIBLE_DEVICES" not in cpu or cpu["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = _worker_env("1", 2)
    assert gpu["CUDA_VISIBLE_DEVICES"] == "1"
    assert "OMP_NUM_THREADS" not in gpu  # the engine sets one torch thread itself
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert _worker_env("1", 2)["OMP_NUM_THREADS"] == "4"


@pytest.fixture
def python_default_switch():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def test_cuda_engines_shorten_the_gil_switch_and_the_last_restores(python_default_switch):
    assert shorten_gil_switch_interval(CUDA) is True
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    assert shorten_gil_switch_interval(CUDA) is True  # a second engine
    restore_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)  # the first still runs
    restore_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_cpu_engine_keeps_the_gil_switch(python_default_switch):
    assert shorten_gil_switch_interval(torch.device("cpu")) is False
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_users_own_switch_interval_is_left_alone(python_default_switch):
    sys.setswitchinterval(0.002)  # set before the engine started
    assert shorten_gil_switch_interval(CUDA) is True
    assert sys.getswitchinterval() == pytest.approx(0.002)
    restore_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.002)
    # ... and one changed while the engine ran is not undone at shutdown
    sys.setswitchinterval(0.005)
    assert shorten_gil_switch_interval(CUDA) is True
    sys.setswitchinterval(0.001)
    restore_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.001)


@pytest.fixture
def python_default_gc(monkeypatch):
    """Python's default young threshold, and the shared setting as if no engine held it (engines
    of other tests, alive in this process, hold the real one)."""
    from pipeline_infer import engine_setup

    held = engine_setup._GC_YOUNG
    fresh = engine_setup._SharedSetting(held.get, held.set, held.wanted, held.take_over)
    monkeypatch.setattr(engine_setup, "_GC_YOUNG", fresh)
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    yield
    gc.set_threshold(*before)


def test_engines_raise_the_gc_young_threshold_and_the_last_restores(python_default_gc):
    older = gc.get_threshold()[1:]
    raise_gc_threshold()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)  # only the young generation's
    raise_gc_threshold()  # a second engine
    restore_gc_threshold()
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD  # the first still runs
    restore_gc_threshold()
    assert gc.get_threshold() == (700, *older)


def test_a_users_own_gc_threshold_is_left_alone(python_default_gc):
    gc.set_threshold(5000)  # set before the engine started
    raise_gc_threshold()
    assert gc.get_threshold()[0] == 5000
    restore_gc_threshold()
    assert gc.get_threshold()[0] == 5000
    # ... and one changed while the engine ran is not undone at shutdown
    gc.set_threshold(700)
    raise_gc_threshold()
    gc.set_threshold(1000)
    restore_gc_threshold()
    assert gc.get_threshold()[0] == 1000


def test_an_engine_holds_the_gc_threshold_until_shutdown(tmp_path, python_default_gc):
    from tiny_models import make_tiny_model

    from pipeline_infer import Engine

    directory, _ = make_tiny_model(str(tmp_path), "llama", head_dim=16)
    llm = Engine(directory, attention_backend="torch", dtype="float32")
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    llm.shutdown()
    assert gc.get_threshold()[0] == 700


def test_a_call_starts_with_a_young_collection_only_under_the_raised_threshold(python_default_gc, monkeypatch):
    collections = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation) or 0)
    monkeypatch.setattr(gc, "get_count", lambda: (GC_CALL_COLLECT_MIN, 0, 0))
    collect_young_before_call()
    assert collections == []  # no engine holds the threshold: Python's own schedule stands
    raise_gc_threshold()
    try:
        collect_young_before_call()
        assert collections == [0]  # the young generation only
        monkeypatch.setattr(gc, "get_count", lambda: (GC_CALL_COLLECT_MIN - 1, 0, 0))
        collect_young_before_call()
        assert collections == [0]  # too few pending to be worth a pass
    finally:
        restore_gc_threshold()
    gc.set_threshold(5000)  # a user's own threshold: the user's schedule stands too
    raise_gc_threshold()
    try:
        monkeypatch.setattr(gc, "get_count", lambda: (GC_CALL_COLLECT_MIN, 0, 0))
        collect_young_before_call()
        assert collections == [0]
    finally:
        restore_gc_threshold()
