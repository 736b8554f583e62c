"""Shared test set-up.

Triton kernels run under the interpreter on machines without CUDA. The variable must be
set before triton is first imported, hence here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run with the device tool: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bundled_engine():
    """One engine on the bundled SmolLM2-135M-Instruct for the whole session (CPU)."""
    from pipeline_infer import Engine

    engine = Engine(random_seed=0)
    yield engine
    engine.shutdown()
