"""Choosing the attention backend: the CPU falls back to torch; FlashInfer's absence is a clear error;
on a GPU the default is the fastest measured GPU backend (torch only where none runs), remembered
in the user cache."""

import json
import sys

import pytest
import torch

from pipeline_infer.kernels.attention import select


def test_cpu_only_offers_torch():
    assert select.available_backends(torch.device("cpu")) == ["torch"]
    assert select.fastest_backend(torch.device("cpu"), 4, 2, 64, 16, torch.float32) == "torch"


def test_missing_flashinfer_is_a_clear_error(monkeypatch):
    from pipeline_infer.kernels.attention.flashinfer_backend import import_flashinfer

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` fail
    with pytest.raises(ImportError, match=r"pip install 'pipeline-infer\[flashinfer\]'"):
        import_flashinfer()


def test_unknown_backend_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'torch', 'triton' or 'flashinfer'"):
        select.make_backend("cudnn", None, 4, 2, 64)


@pytest.mark.gpu
def test_gpu_default_is_the_fastest_measured(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("PIPELINE_INFER_CACHE", str(tmp_path))
    dev = torch.device("cuda")
    names = select.available_backends(dev)
    assert "triton" in names and "torch" in names
    times = {n: select.time_backend(n, dev, 14, 2, 64, 16, torch.bfloat16, reps=5) for n in names}
    assert all(t > 0 for t in times.values())
    choice = select.fastest_backend(dev, 14, 2, 64, 16, torch.bfloat16)
    assert choice in names and choice != "torch"  # the reference is only the fallback
    saved = json.loads((tmp_path / "attention_backend_choice.json").read_text())
    (entry,) = saved.values()
    assert entry["choice"] == choice == min(entry["ms"], key=entry["ms"].get)
    print("attention backend timings (ms, one layer):", entry["ms"], "->", choice)


def _fake_gpu(monkeypatch, tmp_path, names, times):
    """fastest_backend on a pretend CUDA device offering `names`, each layer timed as `times` says
    (a missing name raises, as a backend that cannot run the shape does)."""
    monkeypatch.setenv("PIPELINE_INFER_CACHE", str(tmp_path))
    monkeypatch.setattr(select, "available_backends", lambda device: list(names))
    monkeypatch.setattr(select, "_key", lambda device, *a: "fake-gpu|" + ",".join(a[-1]))
    timed = []

    def time_backend(name, *args, **kwargs):
        timed.append(name)
        if name not in times:
            raise RuntimeError(f"{name} cannot run this shape")
        return times[name]

    monkeypatch.setattr(select, "time_backend", time_backend)
    return timed


def test_torch_is_not_chosen_on_a_gpu_even_when_its_layer_times_fastest(tmp_path, monkeypatch):
    # The H200 case: torch's one layer timed 0.37 ms, Triton's 0.45, yet a run with torch is
    # ten times slower. Only the GPU backends are timed; the faster of them wins.
    timed = _fake_gpu(monkeypatch, tmp_path, ["torch", "triton", "flashinfer"],
                      {"torch": 0.37, "triton": 0.45, "flashinfer": 0.50})
    dev = torch.device("cuda")
    assert select.fastest_backend(dev, 14, 2, 64, 16, torch.bfloat16) == "triton"
    assert timed == ["triton", "flashinfer"]
    saved = json.loads((tmp_path / "attention_backend_choice.json").read_text())
    (entry,) = saved.values()
    assert entry == {"choice": "triton", "ms": {"triton": 0.45, "flashinfer": 0.50}}
    # Remembered: a second engine start times nothing.
    assert select.fastest_backend(dev, 14, 2, 64, 16, torch.bfloat16) == "triton"
    assert timed == ["triton", "flashinfer"]


def test_torch_is_the_gpu_fallback_when_no_gpu_backend_runs(tmp_path, monkeypatch):
    timed = _fake_gpu(monkeypatch, tmp_path, ["torch", "triton"], {"torch": 0.3})
    assert select.fastest_backend(torch.device("cuda"), 14, 2, 64, 16, torch.bfloat16) == "torch"
    assert timed == ["triton"]
    _fake_gpu(monkeypatch, tmp_path / "no-triton", ["torch"], {"torch": 0.3})
    assert select.fastest_backend(torch.device("cuda"), 14, 2, 64, 16, torch.bfloat16) == "torch"


def test_a_choice_remembered_from_torch_timed_in_is_not_reused(tmp_path, monkeypatch):
    _fake_gpu(monkeypatch, tmp_path, ["torch", "triton"], {"triton": 0.45})
    # What an earlier version wrote: its key listed every available backend, torch included.
    (tmp_path / "attention_backend_choice.json").write_text(
        json.dumps({"fake-gpu|torch,triton": {"choice": "torch", "ms": {"torch": 0.37, "triton": 0.45}}})
    )
    assert select.fastest_backend(torch.device("cuda"), 14, 2, 64, 16, torch.bfloat16) == "triton"
