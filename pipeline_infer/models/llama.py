"""Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM), the base of Qwen2 and Qwen3 too.

Follow one step: LlamaForCausalLM.forward(batch) embeds batch.input_ids, runs each decoder
layer (norm -> fused qkv -> PagedAttention (rotary, paged KV via the backend) -> o_proj,
then norm -> fused gate_up -> SiLU-and-mul -> down), and returns the final-normed hidden
states [T, hidden]. The runner picks the rows that sample and calls compute_logits on them.

Weights use HF names; q/k/v and gate/up are stacked into one matmul each at load time.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pipeline_infer.forward_batch import ForwardBatch
from pipeline_infer.layers.activation import SiluAndMul
from pipeline_infer.layers.attention import PagedAttention
from pipeline_infer.layers.norm import RMSNorm
from pipeline_infer.layers.rotary import RotaryEmbedding, rope_parameters

# HF weight name part -> (our fused parameter, shard id)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        eps = config.rms_norm_eps
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.input_layernorm = RMSNorm(hidden, eps)
        self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=qkv_bias)
        self.attn = PagedAttention(
            layer_id, self.num_heads, self.num_kv_heads, self.head_dim, rotary, qk_norm_eps=eps if qk_norm else None
        )
        self.o_proj = nn.Linear(q_size, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.o_proj(self.attn(self.qkv_proj(h), batch))
        h, residual = self.post_attention_layernorm(h, residual)
        h = self.down_proj(self.act(self.gate_up_proj(h)))
        return h, residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        rotary_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        self.rotary = RotaryEmbedding(head_dim, rotary_dim, config.max_position_embeddings, rope_parameters(config))
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rotary, self.qkv_bias, self.qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight)

    # --- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (fused) parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = _our_name(name)
            if target is None:
                continue
            if self.tie_word_embeddings and target == "lm_head.weight":
                continue  # tied: the embedding serves as the output projection
            key, shard = _stacked(target)
            if key not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            dest = params[key].data
            if shard is not None:
                dest = self._shard_view(dest, key, shard)
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{key}#{shard}" if shard is not None else key)
        missing = [n for n in self._expected_loads(params) if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _shard_view(self, dest: torch.Tensor, key: str, shard: Any) -> torch.Tensor:
        layer = self.layers[0]
        if "qkv_proj" in key:
            q, kv = layer.num_heads * layer.head_dim, layer.num_kv_heads * layer.head_dim
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard]
        else:
            size = dest.shape[0] // 2
            start = shard * size
        return dest.narrow(0, start, size)

    def _expected_loads(self, params: dict[str, nn.Parameter]) -> list[str]:
        out = []
        for name in params:
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                out += [f"{name}#{s}" for s in ("q", "k", "v")]
            elif name.endswith("gate_up_proj.weight"):
                out += [f"{name}#{s}" for s in (0, 1)]
            else:
                out.append(name)
        return out


def _our_name(hf_name: str) -> str | None:
    """HF parameter name -> ours (None for tensors we do not use)."""
    if "rotary_emb.inv_freq" in hf_name:
        return None
    name = hf_name.removeprefix("model.")
    name = name.replace(".self_attn.", ".").replace(".mlp.", ".")
    # q_norm / k_norm live inside our attention module
    name = name.replace(".q_norm.", ".attn.q_norm.").replace(".k_norm.", ".attn.k_norm.")
    return name


def _stacked(name: str) -> tuple[str, Any]:
    for part, (fused, shard) in _STACKED.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None
