"""EAGLE-1 heads for tests: a writer of SafeAILab's checkpoint layout for a tiny Llama target, random weights, and a
reference of the head's first draft built from transformers' own Llama layer (independent of pagedllm's)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def _save(path: str, config: dict, tensors: dict[str, torch.Tensor], own_embedding: bool, g: torch.Generator) -> str:
    """The head's safetensors (with its own embedding, random, if asked) and config.json."""
    if own_embedding:
        tensors["embed_tokens.weight"] = torch.randn(config["vocab_size"], config["hidden_size"], generator=g)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


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
    return _save(path, config, tensors, own_embedding, g)


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


def make_eagle3_head(target: str, path: str, draft_vocab: int = 200, own_embedding: bool = False, seed: int = 0) -> str:
    """An EAGLE-3 head for the Llama at `target` (random weights): fc [H, 3H], midlayer.* with q/k/v over 2H, norm,
    lm_head over `draft_vocab` ids and d2t / t2d mapping them to the target's (every other target id, say)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=1, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab)
    h, inter, heads, vocab = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], config["vocab_size"]
    hd = h // heads
    kv = config.get("num_key_value_heads", heads) * hd
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    targets = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values  # the target ids the draft vocab covers
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    tensors = {"fc.weight": rand(h, 3 * h, scale=(3 * h) ** -0.5), "norm.weight": 1 + rand(h, scale=0.1),
               "midlayer.input_layernorm.weight": 1 + rand(h, scale=0.1), "midlayer.hidden_norm.weight": 1 + rand(h, scale=0.1),
               "midlayer.self_attn.q_proj.weight": rand(heads * hd, 2 * h), "midlayer.self_attn.k_proj.weight": rand(kv, 2 * h),
               "midlayer.self_attn.v_proj.weight": rand(kv, 2 * h), "midlayer.self_attn.o_proj.weight": rand(h, heads * hd),
               "midlayer.post_attention_layernorm.weight": 1 + rand(h, scale=0.1),
               "midlayer.mlp.gate_proj.weight": rand(inter, h), "midlayer.mlp.up_proj.weight": rand(inter, h),
               "midlayer.mlp.down_proj.weight": rand(h, inter), "lm_head.weight": rand(draft_vocab, h, scale=1.0),
               "d2t": targets - torch.arange(draft_vocab), "t2d": t2d}
    return _save(path, config, tensors, own_embedding, g)


@torch.inference_mode()
def first_draft_eagle3(target: str, head: str, token_ids: list[int]) -> int:
    """EAGLE-3's first draft after `token_ids`, in plain torch: the target's residual stream entering layers
    sorted((2, L // 2, L - 3)) at positions 0..n-2 (transformers' hidden_states), fc, then the midlayer over
    [input_layernorm(embed(x_1..x_{n-1})); hidden_norm(feature)], causal attention with rotary, the MLP, norm,
    lm_head, d2t."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(target)
    layers = sorted((2, config.num_hidden_layers // 2, config.num_hidden_layers - 3))
    ids = torch.tensor([token_ids])
    states = model(ids[:, :-1], output_hidden_states=True).hidden_states  # states[i]: what enters layer i
    w = load_file(os.path.join(head, "model.safetensors"))
    eps, heads, kv_heads = config.rms_norm_eps, config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // heads

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    feature = torch.cat([states[i][0] for i in layers], dim=-1) @ w["fc.weight"].T
    embed = w.get("embed_tokens.weight", model.model.embed_tokens.weight)[ids[0, 1:]]
    x = torch.cat([norm(embed, w["midlayer.input_layernorm.weight"]), norm(feature, w["midlayer.hidden_norm.weight"])], -1)
    n = x.shape[0]
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, heads, hd).transpose(0, 1)[None]
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, kv_heads, hd).transpose(0, 1)[None]
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, kv_heads, hd).transpose(0, 1)[None]
    cos, sin = LlamaRotaryEmbedding(config)(v, torch.arange(n)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1).reshape(n, -1)
    x = attn @ w["midlayer.self_attn.o_proj.weight"].T + feature
    y = norm(x, w["midlayer.post_attention_layernorm.weight"])
    y = (torch.nn.functional.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) * (y @ w["midlayer.mlp.up_proj.weight"].T))
    x = y @ w["midlayer.mlp.down_proj.weight"].T + x
    best = int((norm(x[-1], w["norm.weight"]) @ w["lm_head.weight"].T).argmax())
    return best + int(w["d2t"][best])
