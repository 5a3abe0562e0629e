"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.models.bert import (
    BertForSequenceClassification, BertModel, XLMRobertaForSequenceClassification, XLMRobertaModel,
)
from pagedllm.models.eagle import Eagle3LlamaForCausalLM, EagleLlamaForCausalLM
from pagedllm.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from pagedllm.models.gemma3_mm import Gemma3ForConditionalGeneration
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.llava import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from pagedllm.models.mixtral import MixtralForCausalLM
from pagedllm.models.phi3 import Phi3ForCausalLM
from pagedllm.models.qwen2 import Qwen2ForCausalLM
from pagedllm.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from pagedllm.models.qwen3 import Qwen3ForCausalLM
from pagedllm.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "EagleLlamaForCausalLM": EagleLlamaForCausalLM,  # speculative-decoding heads (spec_decode/eagle.py)
    "Eagle3LlamaForCausalLM": Eagle3LlamaForCausalLM,
    # Vision-language models (images through multimodal/)
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    # Encoders (pooling models only): embedders and cross-encoders
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaModel": XLMRobertaModel,
    "RobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    "XLMRobertaModel": XLMRobertaModel,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(
        f"Model architectures {getattr(hf_config, 'architectures', None)} are not supported; "
        f"supported: {', '.join(MODELS)}."
    )


def is_encoder(hf_config: Any) -> bool:
    """Whether the model is a bidirectional encoder: its prompts run whole, with no KV cache and no prefix cache."""
    archs = getattr(hf_config, "architectures", None) or []
    return any(getattr(MODELS.get(arch), "is_encoder", False) for arch in archs)
