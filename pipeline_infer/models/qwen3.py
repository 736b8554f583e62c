"""Qwen3 (dense): the Llama layout with per-head RMSNorm on q and k before rotary."""

from pipeline_infer.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qkv_bias = False
    qk_norm = True

    def __init__(self, config):
        # Qwen3 configs may set attention_bias; honour it like HF does.
        self.qkv_bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config)
