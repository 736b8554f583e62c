"""Choosing the attention backend: the CPU falls back to torch; FlashInfer's absence is a clear error;
on a GPU the default is the fastest measured one, remembered in the user cache."""

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
    assert choice in names
    saved = json.loads((tmp_path / "attention_backend_choice.json").read_text())
    (entry,) = saved.values()
    assert entry["choice"] == choice == min(entry["ms"], key=entry["ms"].get)
    print("attention backend timings (ms, one layer):", entry["ms"], "->", choice)
