"""vLLM's pooling endpoints on `pagedllm serve` (serving_pooling.py), with random-weight tiny encoders that carry a
WordPiece tokenizer: a BERT cross-encoder (one label), a BERT embedder and an XLM-R classifier (three named labels).
/v1/score equals transformers' sigmoid of the cross-encoder's logit (1 vs many, list vs list; the raw logit without
activation) and the cosine of the embedder's CLS vectors; /rerank orders by it, with top_n and return_documents;
/classify equals transformers' softmax, labelled from id2label; every mismatch of endpoint and model is a 400."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import torch
import transformers

from tests.server_utils import ServerProcess

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            initializer_range=0.3)  # weights large enough that different texts score visibly apart
# Id 1 is never produced: XLM-R (pad_token_id=1) would take it for padding in transformers' position ids.
SPECIAL = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'") + ["the", "capital", "of", "france", "is", "paris", "cats",
                                                             "dogs", "what", "##s", "##ing"]
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "Cats chase dogs.", "the capital", "Dogs sing!"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _save(model_cls: type, config: transformers.PretrainedConfig, path: str) -> str:
    """The model with random weights and a BERT WordPiece tokenizer over a vocabulary of the config's size."""
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    vocab = SPECIAL + WORDS
    vocab += [f"[unused{i}]" for i in range(1, config.vocab_size - len(vocab) + 1)]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(os.path.join(path, "vocab.txt")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pooling-server")
    bert = dict(max_position_embeddings=64, type_vocab_size=2, **TINY)
    return {
        "ce": _save(transformers.BertForSequenceClassification, transformers.BertConfig(num_labels=1, **bert),
                    str(root / "ce")),
        "emb": _save(transformers.BertModel, transformers.BertConfig(**bert), str(root / "emb")),
        "cls": _save(transformers.XLMRobertaForSequenceClassification, transformers.XLMRobertaConfig(
            id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, max_position_embeddings=66, type_vocab_size=1,
            pad_token_id=1, **TINY), str(root / "cls")),
    }


@pytest.fixture(scope="module")
def servers(models: dict[str, str]) -> Iterator[dict[str, ServerProcess]]:
    """One server per model, started at once (each spends most of its start importing)."""
    with ThreadPoolExecutor(len(models)) as pool:
        futures = {name: pool.submit(ServerProcess, [path, "--served-model-name", name])
                   for name, path in models.items()}
        procs = {name: future.result() for name, future in futures.items()}
    yield procs
    for proc in procs.values():
        assert proc.stop() == 0, proc.logs()


def post(server: ServerProcess, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = httpx.post(server.url(path), json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def _cross_encoder(path: str, pairs: list[tuple[str, str]]) -> list[float]:
    """transformers' logit of each pair, as its tokenizer encodes the pair (with segment ids)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return [model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0].item() for a, b in pairs]


def test_score_cross_encoder(servers: dict[str, ServerProcess], models: dict[str, str]) -> None:
    ce = servers["ce"]
    logits = _cross_encoder(models["ce"], [(QUERY, d) for d in DOCS])
    one_vs_many = post(ce, "/v1/score", {"model": "ce", "text_1": QUERY, "text_2": DOCS})
    assert one_vs_many["object"] == "list" and one_vs_many["id"].startswith("score-") and one_vs_many["model"] == "ce"
    assert [d["index"] for d in one_vs_many["data"]] == list(range(len(DOCS)))
    assert all(d["object"] == "score" for d in one_vs_many["data"])
    expected = torch.tensor(logits).sigmoid()
    torch.testing.assert_close(torch.tensor([d["score"] for d in one_vs_many["data"]]), expected, rtol=1e-4, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["ce"])
    tokens = sum(len(tokenizer(QUERY, d).input_ids) for d in DOCS)
    assert one_vs_many["usage"]["prompt_tokens"] == one_vs_many["usage"]["total_tokens"] == tokens
    pairwise = post(ce, "/score", {"text_1": DOCS[:2], "text_2": DOCS[2:]})  # list vs list, at vLLM's other path
    expected = torch.tensor(_cross_encoder(models["ce"], list(zip(DOCS[:2], DOCS[2:])))).sigmoid()
    torch.testing.assert_close(torch.tensor([d["score"] for d in pairwise["data"]]), expected, rtol=1e-4, atol=1e-5)
    raw = post(ce, "/v1/score", {"text_1": QUERY, "text_2": DOCS[:1], "use_activation": False})
    assert raw["data"][0]["score"] == pytest.approx(logits[0], rel=1e-4, abs=1e-5)
    short = post(ce, "/v1/score", {"text_1": QUERY, "text_2": DOCS[0], "truncate_prompt_tokens": 6})
    assert short["usage"]["prompt_tokens"] == 6


def test_rerank_cross_encoder(servers: dict[str, ServerProcess]) -> None:
    ce = servers["ce"]
    scores = [d["score"] for d in post(ce, "/v1/score", {"text_1": QUERY, "text_2": DOCS})["data"]]
    assert len(set(scores)) == len(scores)  # an order to check
    order = sorted(range(len(DOCS)), key=lambda i: -scores[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = post(ce, path, {"model": "ce", "query": QUERY, "documents": DOCS})
        assert body["model"] == "ce" and body["usage"]["total_tokens"] > len(DOCS)
        assert [r["index"] for r in body["results"]] == order
        assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in order]
        assert [r["relevance_score"] for r in body["results"]] == pytest.approx([scores[i] for i in order], rel=1e-5)
    top = post(ce, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False})["results"]
    assert [r["index"] for r in top] == order[:2] and all(r.get("document") is None for r in top)
    assert len(post(ce, "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0})["results"]) == len(DOCS)


def test_score_and_rerank_embedder(servers: dict[str, ServerProcess], models: dict[str, str]) -> None:
    """An embedding model scores the cosine of its (CLS) vectors of the two texts."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["emb"])
    model = transformers.AutoModel.from_pretrained(models["emb"]).eval()
    with torch.inference_mode():
        cls = {t: model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, 0] for t in [QUERY, *DOCS]}
    expected = [torch.cosine_similarity(cls[QUERY], cls[d], dim=0).item() for d in DOCS]
    body = post(servers["emb"], "/v1/score", {"text_1": QUERY, "text_2": DOCS})
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(t).input_ids) for t in [QUERY, *DOCS])  # each once
    pairwise = post(servers["emb"], "/v1/score", {"text_1": DOCS[:2], "text_2": DOCS[2:]})["data"]
    assert [d["score"] for d in pairwise] == pytest.approx(
        [torch.cosine_similarity(cls[a], cls[b], dim=0).item() for a, b in zip(DOCS[:2], DOCS[2:])], rel=1e-4, abs=1e-5)
    ranked = post(servers["emb"], "/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3})["results"]
    assert [r["index"] for r in ranked] == sorted(range(len(DOCS)), key=lambda i: -expected[i])[:3]


def test_classify(servers: dict[str, ServerProcess], models: dict[str, str]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["cls"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()
    with torch.inference_mode():
        logits = torch.stack([model(tokenizer(t, return_tensors="pt").input_ids).logits[0] for t in DOCS])
    for path in ("/classify", "/v1/classify"):
        body = post(servers["cls"], path, {"model": "cls", "input": DOCS})
        assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "cls"
        torch.testing.assert_close(torch.tensor([d["probs"] for d in body["data"]]), logits.softmax(-1), rtol=1e-4,
                                   atol=1e-5)
        assert [d["label"] for d in body["data"]] == [LABELS[int(i)] for i in logits.argmax(-1)]
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["num_classes"] for d in body["data"]} == {3}
        assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(t).input_ids) for t in DOCS)
    ids = tokenizer(DOCS[1]).input_ids
    by_ids = post(servers["cls"], "/classify", {"input": ids, "use_activation": False})["data"]
    assert len(by_ids) == 1 and by_ids[0]["probs"] == pytest.approx(logits[1].tolist(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name, path, body, message", [
    ("ce", "/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "one length"),
    ("ce", "/v1/score", {"text_1": [], "text_2": "a"}, "at least one pair"),
    ("ce", "/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 1000}, "truncate_prompt_tokens"),
    ("ce", "/rerank", {"query": "a", "documents": []}, "documents is empty"),
    ("ce", "/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
    ("cls", "/v1/score", {"text_1": "a", "text_2": "b"}, "cross-encoder"),
    ("cls", "/rerank", {"query": "a", "documents": ["b"]}, "cross-encoder"),
    ("emb", "/classify", {"input": "a"}, "this model embeds"),
    ("ce", "/v1/embeddings", {"input": "a"}, "this model classifies"),
    ("cls", "/v1/embeddings", {"input": "a"}, "this model classifies"),
    ("ce", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "pooling model"),
    ("emb", "/v1/completions", {"prompt": "hi"}, "pooling model"),
])
def test_errors(servers: dict[str, ServerProcess], name: str, path: str, body: dict[str, Any], message: str) -> None:
    error = post(servers[name], path, body, status=400)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_generative_model_is_refused() -> None:
    """/v1/score, /rerank and /classify check the model's task before anything reaches an engine: a generative
    model's 400 needs no engine running."""
    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app

    config = SimpleNamespace(runner="generate", max_model_len=64, hf_config=None)
    engine: Any = SimpleNamespace(config=config, tokenizer=None)
    app = build_app(engine, ServerSettings(model_names=["gen"], dashboard=False))  # a stub engine has no step hook

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gen") as http:
            return [await http.post("/v1/score", json={"text_1": "a", "text_2": "b"}),
                    await http.post("/rerank", json={"query": "a", "documents": ["b"]}),
                    await http.post("/classify", json={"input": "a"})]

    for response in asyncio.run(main()):
        assert response.status_code == 400 and "generates text" in response.json()["error"]["message"]
