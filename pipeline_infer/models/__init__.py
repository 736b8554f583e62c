"""Model registry keyed by `config.architectures`."""

from __future__ import annotations

import importlib
from typing import Any

# architecture name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("pipeline_infer.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pipeline_infer.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("pipeline_infer.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pipeline_infer.models.qwen3", "Qwen3ForCausalLM"),
}

SUPPORTED_ARCHITECTURES = tuple(_REGISTRY)


def model_class(hf_config: Any) -> type:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _REGISTRY:
            module, cls = _REGISTRY[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"unsupported model architecture {archs or '(none in config.json)'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
