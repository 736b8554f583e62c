"""Small checks and helpers shared by the Triton kernel wrappers.

Triton decides at import time, from TRITON_INTERPRET, whether `@triton.jit` functions (ours
and triton.language's own) are compiled for the GPU or run by its CPU interpreter. So CPU
tensors only work when TRITON_INTERPRET=1 was set before `triton` was first imported; the
wrappers check this up front so the failure names the cause instead of a driver error.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (runs on the CPU)."""
    return not isinstance(kernel, JITFunction)


def check_launchable(kernel: object, *tensors: torch.Tensor | None) -> None:
    """Raise if the tensors (None ones skipped) cannot go to `kernel`: one device; CPU needs the interpreter."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{_name(kernel)}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{_name(kernel)}: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_name(kernel)}: tensors must be on cpu or cuda, got {device}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in on the CPU (interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _name(kernel: object) -> str:
    return getattr(kernel, "__name__", type(kernel).__name__)
