"""Tiny random-weight checkpoints of each supported architecture, written by transformers itself,
and transformers' greedy `generate` as the oracle our engine must match token for token."""

from __future__ import annotations

import os
from typing import Any

import torch

# Small but not degenerate: GQA, several layers, logits peaked enough that argmax is stable.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # Block-wise fp8 (128x128 blocks) needs whole blocks at TP=2: q 256 rows, k/v 128, MLP 512.
    "llama-block": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # MoE: 8 experts of 32, top-2; a dense layer among the sparse ones (mlp_only_layers), Qwen2-MoE's shared expert
    "qwen3_moe": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "mixtral": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=32,
        num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # Dense families (tests/test_model_families.py): windows of 16-32 tokens, shorter than most test prompts.
    "mistral-sw": dict(
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=16,
    ),
    # Alternating local/global layers; caps small enough to bite at these weights' score sizes.
    "gemma2": dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
    ),
    # 2 local : 1 global, the global layers' rotary linearly scaled (as Gemma 3 4B+).
    "gemma3": dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
        max_position_embeddings=1024, rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
    ),
    # Fused qkv/gate_up checkpoint tensors, a window on every layer, LongRoPE (short factors below 512 tokens).
    "phi3": dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, original_max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=32, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 512,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                         "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]},
    ),
}


def make_tiny_model(arch: str, path: str, seed: int = 0) -> str:
    """Saves a random `arch` model (transformers' own classes and weight names) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec, bos_token_id=1, eos_token_id=2, initializer_range=0.25)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if arch in ("qwen2", "qwen2_moe"):  # transformers initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    if arch.startswith("gemma"):  # Gemma's norms start at zero (a scale of 1): make them matter; and shrink the
        with torch.no_grad():  # embeddings by the sqrt(hidden) Gemma multiplies them by, else they drown every layer
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
            model.get_input_embeddings().weight.mul_(TINY_CONFIGS[arch]["hidden_size"] ** -0.5)
    model.save_pretrained(path)
    return path


class HFOracle:
    """transformers' greedy generate, one prompt at a time (no padding), in float32 on CPU."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos: bool = False) -> list[int]:
        out = self.model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=0 if eos else max_new_tokens,
            do_sample=False, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), pad_token_id=0,
        )
        return out[0, len(prompt_ids) :].tolist()

    @torch.inference_mode()
    def beam_search(self, prompt_ids: list[int], width: int, max_new_tokens: int, length_penalty: float = 1.0) -> list[tuple[list[int], float]]:
        """generate(num_beams=width, do_sample=False): the `width` hypotheses, best first, as (generated ids, score),
        EOS from the model's generation_config (None: never). Width 1 runs as greedy search, scored here alike:
        sum of logprobs / len ** length_penalty."""
        out = self.model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), num_beams=width,
            do_sample=False, num_return_sequences=width, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
            pad_token_id=0, output_scores=True, return_dict_in_generate=True,
        )
        generated = out.sequences[:, len(prompt_ids) :]
        if width == 1:  # no padding; scores are the step logits
            ids = generated[0].tolist()
            logprob = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.scores, ids))
            return [(ids, logprob / len(ids) ** length_penalty)]
        lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # -1 marks the padding after a hypothesis ends
        return [(generated[i, :n].tolist(), out.sequences_scores[i].item()) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log_softmax over the vocabulary at every position of `token_ids`: [len, vocab]."""
        logits = self.model(torch.tensor([token_ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)
