"""Tiny random-weight HF checkpoints of each supported family, written to disk.

They are the independent reference for parity tests: HF transformers runs them with its
own code, our engine loads the same safetensors through our loader and models.
"""

from __future__ import annotations

import os

import torch
import transformers

VOCAB = 384

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),
}


def make_tiny_model(directory: str, family: str, seed: int = 0, **overrides) -> tuple[str, torch.nn.Module]:
    """Write a tiny checkpoint of `family` to directory; return (dir, the HF model in eval mode).

    `overrides` replace config fields (e.g. head_dim=64 for kernels that need a real head size)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Larger-than-default weights make logits spread out, so greedy paths have no near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate, one prompt at a time (no padding), greedy; returns the new ids."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def mixed_admission_workload(seed: int) -> tuple[list[list[int]], list[dict]]:
    """Ten greedy prompts (every third starts with the same 21 tokens, for the radix cache) of
    3-24 new tokens each: with 4 running requests and a small pool, admissions while others
    decode, a shared prefix and retractions."""
    import random

    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB) for _ in range(21)]
    prompts = [([] if i % 3 else shared) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))]
               for i in range(10)]
    params = [{"temperature": 0, "max_new_tokens": rng.randint(3, 24), "ignore_eos": True} for _ in prompts]
    return prompts, params
