"""Qwen2 / Qwen2.5: the Llama layout with a bias on the q, k and v projections."""

from pipeline_infer.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
