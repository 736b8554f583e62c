"""A CUDA engine runs torch's CPU ops on one thread (engine_setup.limit_host_threads), the
user's OMP_NUM_THREADS wins, and the count comes back when the last engine shuts down. It
also shortens the GIL's switch interval (shorten_gil_switch_interval) on the same terms.
No GPU is needed: both only look at the device's type."""

from __future__ import annotations

import sys

import pytest
import torch

from pipeline_infer.engine_setup import (
    GIL_SWITCH_INTERVAL_S,
    limit_host_threads,
    release_host_threads,
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
