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
    if arch == "qwen2":  # transformers initialises biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
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
