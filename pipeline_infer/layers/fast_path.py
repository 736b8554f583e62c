"""Whether a tensor can take our Triton kernels (CUDA and Triton present) or the torch path."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def use_triton(x: torch.Tensor) -> bool:
    # On the CPU the torch path is both the reference and the faster one (the Triton
    # interpreter is for tests only).
    return x.is_cuda and _triton_available()
