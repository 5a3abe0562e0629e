"""Qwen2: the Llama network with biases on the q/k/v projections (none on o_proj)."""

from pagedllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
