"""Engine configuration: plain dataclasses whose fields map one to one onto `LLM(...)` keywords and CLI flags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, or None for the bundled SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to the model directory
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    load_format: str = "auto"  # auto | safetensors | dummy (random weights, for benchmarks)
    # Weight quantization: None = as the checkpoint's config.json says (its quantization_config), else e.g. "fp8"
    # (a 16-bit checkpoint quantized at load). See pagedllm/quantization/.
    quantization: str | None = None
    skip_tokenizer_init: bool = False
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    seed: int = 0
    # KV cache
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: from gpu_memory_utilization (CUDA) or 4 GiB (CPU)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True  # share full KV blocks between requests with the same leading tokens
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | fp8_e4m3: KV stored in float8 with per-tensor scales
    # Bytes of host memory for the prefix cache's second tier (kv_transfer/): full blocks are written through to it,
    # and a prefix that left the GPU pool comes back by copy instead of recompute. 0: off.
    kv_offload_bytes: int = 0
    # KV transfer between engines (disaggregated prefill), as vLLM's JSON: {"kv_connector": "TcpConnector" |
    # "IpcConnector", "kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_ip": ..., "kv_port": ...}
    # (kv_transfer/config.py)
    kv_transfer_config: Any = None
    # Scheduler
    # Defaults: 512 sequences and 16384 tokens per step on CUDA (vLLM's offline defaults are 1024 and 16384 on
    # 80 GB GPUs; 512 measured best on W1 and P1), 256 and 2048 on CPU, where matmuls peak around 2k rows.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None  # at least max_model_len without chunked prefill
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | priority: requests' `priority` (lower first) orders the queue and preemption
    # Worker
    attention_backend: str | None = None
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False  # NCCL for every TP all-reduce (no symmetric-memory one-shot for small ones)
    # Schedule and launch step N+1 while step N runs, then process N's tokens: None = on for CUDA, off for CPU.
    async_scheduling: bool | None = None
    # Parallelism: a world of tensor x pipeline ranks per engine, data-parallel engines behind one server.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # how ranks 1.. start: mp (default, one node) | ray
    enable_expert_parallel: bool = False  # MoE: each TP rank holds whole experts, not a slice of every one
    # Models that think in <think>...</think>: qwen3 | deepseek_r1. Structured outputs apply after the reasoning,
    # and the server returns it as `reasoning_content`.
    reasoning_parser: str | None = None
    # Speculative decoding, as vLLM's dict: {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...}
    # (spec_decode/config.py); a JSON string on the command line. Parsed into a SpeculativeConfig by finalize().
    speculative_config: Any = None
    # Multi-LoRA (pagedllm/lora/): requests may name a PEFT adapter (LoRARequest); at most max_loras adapters per step,
    # of rank <= max_lora_rank, and max_cpu_loras (default: max_loras) kept loaded on the host.
    # generate | pooling (embeddings: LLM.embed, /v1/embeddings) | auto: pooling for a sentence-transformers directory
    # (modules.json); pooler_config overrides the pooling read from it: {"pooling_type": LAST|MEAN|CLS, "normalize": bool}
    runner: str = "auto"
    pooler_config: Any = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Custom logits processors (pagedllm/logits_process/, vLLM v1's interface): classes, or their names as
    # "module:Class" / "module.Class" (one comma-separated string on the command line); built once on the driver.
    logits_processors: list | None = None
    # Multimodal inputs (pagedllm/multimodal/): the most items of each modality per prompt, as vLLM's dict or JSON
    # ({"image": 2}; None: no limit); file:// media only from inside allowed_local_media_path (None: none); http(s)
    # media only from the hosts in allowed_media_domains (a list, or one comma-separated string; None: any public host).
    limit_mm_per_prompt: Any = None
    # The image processor's settings over the checkpoint's, as vLLM's dict or JSON ({"max_pixels": 802816}); a
    # request may add its own (its prompt's or chat body's "mm_processor_kwargs").
    mm_processor_kwargs: Any = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: Any = None
    # Filled in when the engine starts.
    hf_config: Any = field(default=None, repr=False)
    model_path: str | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"Unknown engine argument(s): {', '.join(unknown)}.")
        return cls(**kwargs)

    def finalize(self) -> None:
        """Resolves the model, the device, the dtype and the defaults that depend on them."""
        from transformers import AutoConfig

        from pagedllm.models.gguf import resolve_model

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_path = resolve_model(self.model)
        from pagedllm.models.vision_language import flatten_text_config

        self.hf_config = flatten_text_config(AutoConfig.from_pretrained(self.model_path))
        self._check_quantization()
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}.")
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        if self.is_encoder:
            model_max = self._encoder_defaults(model_max)
        if self.max_model_len is None:
            self.max_model_len = model_max
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}.")
        if self.max_num_seqs is None:
            self.max_num_seqs = 512 if self.device.startswith("cuda") else 256
        if self.max_num_batched_tokens is None:
            budget = 16384 if self.device.startswith("cuda") else 2048
            self.max_num_batched_tokens = budget if self.enable_chunked_prefill else max(budget, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off, or prompts could never be scheduled."
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}.")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1.")
        self._check_parallel()
        from pagedllm.core.queues import POLICIES

        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}; got {self.scheduling_policy!r}.")
        from pagedllm.spec_decode.config import SpeculativeConfig

        if not isinstance(self.speculative_config, SpeculativeConfig):
            self.speculative_config = SpeculativeConfig.from_user(self.speculative_config)
        if self.enable_lora:
            self._check_lora()
        from pagedllm.kv_transfer.config import KVTransferConfig

        self.kv_transfer_config = KVTransferConfig.from_user(self.kv_transfer_config)
        name = None if self.kv_transfer_config is None else self.kv_transfer_config.kv_connector
        if name in ("TcpConnector", "IpcConnector") and (self.world_size > 1 or not self.enable_prefix_caching):
            # IPC under TP would have each rank map its peer rank's pool, and pair ranks over the control channel.
            raise ValueError(f"the {name} runs on one rank with prefix caching on (its transfers are keyed by block "
                             "hashes); tensor / pipeline parallelism is not supported with it yet.")
        if self.runner == "auto":
            st_files = os.path.isfile(os.path.join(self.model_path, "modules.json"))
            self.runner = "pooling" if st_files or self.is_encoder else "generate"
        if self.runner not in ("generate", "pooling"):
            raise ValueError(f"runner must be auto, generate or pooling; got {self.runner!r}.")
        if self.is_encoder and self.runner != "pooling":
            raise ValueError(f"{self.hf_config.architectures} is an encoder: it runs as a pooling model only "
                             "(runner='pooling': embed, score, classify).")
        from pagedllm.logits_process.state import resolve_logits_processors

        self.logits_processors = resolve_logits_processors(self.logits_processors)  # a bad name fails now
        if self.logits_processors and self.runner == "pooling":
            raise ValueError("logits_processors: a pooling model samples nothing, so it takes no logits processors.")
        if isinstance(self.pooler_config, str):
            self.pooler_config = json.loads(self.pooler_config)
        from pagedllm.multimodal.policy import check_media_options

        check_media_options(self)  # a bad limit, directory or domain list fails now
        if self.reasoning_parser is not None:
            from pagedllm.entrypoints.openai.reasoning import get_reasoning_parser

            get_reasoning_parser(self.reasoning_parser)  # an unknown name fails now

    def _encoder_defaults(self, model_max: int) -> int:
        """An encoder's prompts run whole (bidirectional attention: no chunks, no prefix cache) and eagerly; its
        context is its position table (less RoBERTa's offset), or sentence-transformers' max_seq_length."""
        from pagedllm.models.registry import get_model_class

        self.enable_chunked_prefill = False
        self.enable_prefix_caching = False
        self.enforce_eager = True
        model_max -= get_model_class(self.hf_config).position_offset_for(self.hf_config)
        st_config = os.path.join(self.model_path or "", "sentence_bert_config.json")
        if os.path.isfile(st_config):
            with open(st_config) as f:
                model_max = min(model_max, int(json.load(f).get("max_seq_length") or model_max))
        return model_max

    @property
    def is_encoder(self) -> bool:
        from pagedllm.models.registry import is_encoder

        return self.hf_config is not None and is_encoder(self.hf_config)

    def _check_lora(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1.")
        self.max_cpu_loras = self.max_cpu_loras or self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}).")

    def _check_quantization(self) -> None:
        """Resolves the method now, so that an unsupported one fails before any rank starts."""
        from pagedllm.quantization import get_quant_method

        get_quant_method(self)

    def _check_parallel(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got {self.distributed_executor_backend!r}.")
        from pagedllm.layers.linear import tp_layout_error

        hf = self.hf_config
        hf.enable_expert_parallel = self.enable_expert_parallel  # read by the MoE layers (pagedllm/layers/moe.py)
        experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
        if self.enable_expert_parallel and experts:
            from pagedllm.layers.moe import expert_parallel_error

            if error := expert_parallel_error(experts, self.tensor_parallel_size):
                raise ValueError(error)
        heads = hf.num_attention_heads
        error = tp_layout_error(self.tensor_parallel_size, heads, getattr(hf, "num_key_value_heads", None) or heads, hf.intermediate_size)
        if error:
            raise ValueError(error)
        if self.pipeline_parallel_size > hf.num_hidden_layers:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} exceeds the model's {hf.num_hidden_layers} layers.")
        if self.device.startswith("cuda") and self.world_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} needs as many GPUs; {torch.cuda.device_count()} visible.")

    @property
    def world_size(self) -> int:
        """Ranks of one engine: tensor x pipeline (data-parallel replicas each have their own world)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def steps_in_flight(self) -> int:
        """Launched steps whose tokens an async engine leaves unprocessed between calls: one (the next step
        overlaps its processing), or one per pipeline stage so that every stage has a micro-batch to run."""
        return max(1, self.pipeline_parallel_size)

    @property
    def symm_all_reduce_dtype(self) -> torch.dtype | None:
        """The dtype of the one-shot small all-reduces (None: NCCL for all)."""
        return None if self.disable_custom_all_reduce else self.torch_dtype

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None
        return -(-self.max_model_len // self.block_size)
