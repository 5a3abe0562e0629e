"""Qwen3: the Llama network with an RMSNorm over each head of q and k before the rotary embedding."""

from pagedllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
