"""EAGLE-1 heads for tests: a writer of SafeAILab's checkpoint layout for a tiny Llama target, random weights, and a
reference of the head's first draft built from transformers' own Llama layer (independent of pagedllm's)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def make_eagle_head(target: str, path: str, fc_bias: bool = True, own_embedding: bool = False, seed: int = 0) -> str:
    """A one-layer head for the Llama at `target`: config.json (the target's, one layer), fc.weight [H, 2H]
    (+ fc.bias), layers.0.* without input_layernorm, embed_tokens.weight only with `own_embedding`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    h, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (h // heads)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    tensors = {"fc.weight": rand(h, 2 * h, scale=(2 * h) ** -0.5),
               "layers.0.self_attn.q_proj.weight": rand(h, h), "layers.0.self_attn.k_proj.weight": rand(kv, h),
               "layers.0.self_attn.v_proj.weight": rand(kv, h), "layers.0.self_attn.o_proj.weight": rand(h, h),
               "layers.0.post_attention_layernorm.weight": 1 + rand(h, scale=0.1),
               "layers.0.mlp.gate_proj.weight": rand(inter, h), "layers.0.mlp.up_proj.weight": rand(inter, h),
               "layers.0.mlp.down_proj.weight": rand(h, inter)}
    if fc_bias:
        tensors["fc.bias"] = rand(h, scale=0.1)
    if own_embedding:
        tensors["embed_tokens.weight"] = rand(config["vocab_size"], h, scale=1.0)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@torch.inference_mode()
def first_draft(target: str, head: str, token_ids: list[int]) -> int:
    """The head's draft after `token_ids` (the last one just sampled): transformers' target gives its final hidden
    states f_0..f_{n-2}; the head runs [embed(x_1..x_{n-1}); f_0..f_{n-2}] through fc and a transformers Llama layer
    (input norm removed) at positions 0..n-2; the target's LM head reads its last output."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaModel

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.tensor([token_ids])
    features = model(ids[:, :-1], output_hidden_states=True).hidden_states[-1]  # after the final norm
    weights = load_file(os.path.join(head, "model.safetensors"))
    embed = weights.get("embed_tokens.weight", model.model.embed_tokens.weight)
    layer_model = LlamaModel(AutoConfig.from_pretrained(head)).eval()
    layer_model.load_state_dict({k: v for k, v in weights.items() if k.startswith("layers.")}, strict=False)
    layer_model.layers[0].input_layernorm = torch.nn.Identity()
    layer_model.norm = torch.nn.Identity()
    fc = torch.nn.functional.linear(torch.cat([embed[ids[:, 1:]], features], dim=-1), weights["fc.weight"],
                                    weights.get("fc.bias"))
    out = layer_model(inputs_embeds=fc, position_ids=torch.arange(len(token_ids) - 1)[None]).last_hidden_state
    return int(model.lm_head(out[0, -1]).argmax())
