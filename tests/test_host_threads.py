"""A CUDA engine runs torch's CPU ops on one thread (engine_setup.limit_host_threads), the
user's OMP_NUM_THREADS wins, and the count comes back when the last engine shuts down.
No GPU is needed: the limit only looks at the device's type."""

from __future__ import annotations

import pytest
import torch

from pipeline_infer.engine_setup import limit_host_threads, release_host_threads
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
