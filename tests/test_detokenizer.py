"""Tests for the incremental detokenizer: streamed text matches a full decode, multi-byte characters are
never split, stop strings are caught across tokens and never streamed."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizer, PreTrainedTokenizerFast

from pagedllm.engine import detokenizer as detok_module
from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_token
from pagedllm.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a small test corpus for the detokenizer.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 and more 😀😀 party 🎉!",
    "中文字符测试，你好世界。日本語のテキストも少し。",
    "The quick brown fox jumps over the lazy dog. STOP here; ### end",
    "Numbers 12345 and symbols @#$%^&*() <tags> and\nnew lines\n\n  spaces.",
] * 10
MULTIBYTE_TEXT = "Party 🎉👍🏽 time: 中文字符测试 🇫🇷 and 日本語, then 😀."


# --- tokenizers ---------------------------------------------------------------------------------


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.add_tokens([AddedToken("<tool>", special=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


def _sentencepiece_bpe(llama_decoder: bool) -> PreTrainedTokenizerFast:
    """Metaspace BPE with byte fallback: rare characters (most CJK, emoji) become <0xXX> byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    if llama_decoder:  # Llama-2's decoder chain
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    else:
        steps = [decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps)
    return _wrap(tok)


class _PythonByteTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer: one token per UTF-8 byte, so characters always span tokens."""

    def __init__(self, **kwargs) -> None:
        self._byte_tokens = [f"{b:02X}" for b in range(256)]
        super().__init__(bos_token="<s>", eos_token="</s>", **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self._byte_tokens)} | self.added_tokens_encoder

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [f"{b:02X}" for b in text.encode()]

    def _convert_token_to_id(self, token: str) -> int:
        return int(token, 16)

    def _convert_id_to_token(self, index: int) -> str:
        return self._byte_tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = b"".join(bytes([int(t, 16)]) if len(t) == 2 else t.encode() for t in tokens)
        return data.decode("utf-8", errors="replace")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2: str):
    """The real SmolLM2 tokenizer, from the engine's cached conversion of the bundled GGUF."""
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def small_tokenizers():
    return {
        "byte_level": _byte_level_bpe(),
        "sp_llama": _sentencepiece_bpe(llama_decoder=True),
        "sp_metaspace": _sentencepiece_bpe(llama_decoder=False),
        "python_bytes": _PythonByteTokenizer(),
    }


@pytest.fixture(params=["smollm2_tokenizer", "byte_level", "sp_llama", "sp_metaspace", "python_bytes"])
def tok(request, small_tokenizers):
    if request.param == "smollm2_tokenizer":
        return request.getfixturevalue("smollm2_tokenizer")
    return small_tokenizers[request.param]


@pytest.fixture(params=["decode_stream", "window"], autouse=True)
def scheme(request, monkeypatch):
    """Runs every test with DecodeStream and with the Python prefix/read-offset window scheme."""
    monkeypatch.setattr(detok_module, "USE_DECODE_STREAM", request.param == "decode_stream")
    return request.param


# --- helpers ------------------------------------------------------------------------------------


def _eos(tok) -> int:
    return tok.convert_tokens_to_ids(tok.eos_token)


def _stream(tok, prompt: list[int], output: list[int], params: SamplingParams, stop_terminated: bool = False):
    """Feeds output one token per step as the engine does; returns (delta chunks, stop string, detokenizer).
    The last chunk is the one released at finish."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    chunks, stop = [], None
    for i, token_id in enumerate(output):
        last = i == len(output) - 1
        stop = detok.update([token_id], stop_terminated and last)
        finished = stop is not None or last
        chunks.append(detok.get_next_output_text(finished, delta=True))
        if finished:
            break
    return chunks, stop, detok


def _reference(tok, prompt: list[int], output: list[int], skip: bool) -> str:
    """Text the output adds to the prompt's decode (the prompt gives leading spaces their context)."""
    full = tok.decode(prompt + output, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    head = tok.decode(prompt, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert full.startswith(head)
    return full[len(head) :]


def _random_output(tok, rng: random.Random, vocab: list[int], specials: list[int]) -> list[int]:
    if rng.random() < 0.5:
        text = rng.choice(CORPUS + [MULTIBYTE_TEXT])
        start = rng.randrange(len(text))
        text = text[start : start + rng.randint(1, 40)]
        # Text pieces with special and added tokens between them (at character boundaries: inside a
        # byte-fallback run they would make the run invalid).
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 2)))
        ids = []
        for begin, end in zip([0] + cuts, cuts + [len(text)]):
            if begin > 0:
                ids.append(rng.choice(specials))
            ids += tok.encode(text[begin:end], add_special_tokens=False) if end > begin else []
        return ids
    return [rng.choice(vocab) for _ in range(rng.randint(1, 25))]


# --- streaming equals decode --------------------------------------------------------------------


def test_streamed_text_equals_full_decode(tok):
    rng = random.Random(1234)
    # Uniformly random ids too. Byte-fallback decoders turn a whole run of byte tokens into U+FFFDs once
    # it holds an invalid sequence, rewriting text already streamed, so they only get non-byte tokens.
    byte_fallback = "<0x41>" in tok.get_vocab()
    vocab = [i for t, i in tok.get_vocab().items() if not (byte_fallback and t.startswith("<0x"))]
    specials = list(tok.added_tokens_decoder)
    for case in range(150):
        skip = rng.random() < 0.5
        prompt_text = rng.choice(CORPUS)[: rng.randint(0, 40)]
        prompt = tok.encode(prompt_text, add_special_tokens=False) if prompt_text else []
        output = _random_output(tok, rng, vocab, specials)
        params = SamplingParams(skip_special_tokens=skip)
        chunks, _, detok = _stream(tok, prompt, output, params)
        expected = _reference(tok, prompt, output, skip)
        assert "".join(chunks) == expected == detok.output_text, (case, prompt, output, chunks)
        if not prompt:
            assert detok.output_text == tok.decode(output, skip_special_tokens=skip)


def test_leading_space_uses_prompt_context(tok):
    prompt = tok.encode("Hello", add_special_tokens=False)
    output = tok.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    chunks, _, _ = _stream(tok, prompt, output, SamplingParams())
    assert "".join(chunks) == " world"


def test_no_replacement_characters_mid_stream(tok):
    output = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    # The test is only meaningful if some character really is split across tokens.
    assert any("\ufffd" in tok.decode([t]) for t in output)
    for prompt in ([], tok.encode("Say:", add_special_tokens=False)):
        detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
        pieces = []
        for token_id in output:
            detok.update([token_id], False)
            pieces.append(detok.get_next_output_text(False, delta=True))
            assert "\ufffd" not in pieces[-1]
        pieces.append(detok.get_next_output_text(True, delta=True))
        assert "".join(pieces).strip() == MULTIBYTE_TEXT


def test_incomplete_character_released_at_finish(tok):
    emoji = tok.encode("🦀", add_special_tokens=False)  # absent from the corpora: split into bytes
    assert len(emoji) > 1
    output = tok.encode("ok ", add_special_tokens=False) + emoji[:-1]
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for token_id in output:
        detok.update([token_id], False)
    assert "\ufffd" not in detok.get_next_output_text(False, delta=False)
    assert detok.get_next_output_text(True, delta=False) == tok.decode(output)


@pytest.mark.parametrize("name", ["sp_llama", "sp_metaspace"])
def test_byte_fallback_rewriting_earlier_text_does_not_break_stream(small_tokenizers, name):
    """A run of byte tokens that turns invalid makes ByteFallback rewrite the whole run as U+FFFDs, so
    the decode is no longer an extension of what was streamed; streaming must carry on regardless."""
    tok = small_tokenizers[name]
    vocab = tok.get_vocab()
    crab = tok.encode(" 🦀", add_special_tokens=False)
    output = tok.encode("ok", add_special_tokens=False) + crab + [vocab["<0xF0>"], vocab["<0x9F>"]]
    output += tok.encode(" done", add_special_tokens=False)
    chunks, _, detok = _stream(tok, [], output, SamplingParams())
    assert "".join(chunks) == detok.output_text
    assert detok.output_text.startswith("ok 🦀") and detok.output_text.endswith(" done")


# --- stop strings -------------------------------------------------------------------------------

STOP_TEXT = "The quick brown fox jumps over the lazy dog. STOP here; ### end"


@pytest.mark.parametrize("stop", ["brown fox", "lazy", "y dog. ST", "###"])
def test_stop_string_across_tokens_never_streamed(tok, stop):
    output = tok.encode(STOP_TEXT, add_special_tokens=False)
    index = STOP_TEXT.index(stop)
    expected = STOP_TEXT[:index]
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop]))
    streamed = ""
    for step, token_id in enumerate(output):
        matched = detok.update([token_id], False)
        streamed += detok.get_next_output_text(matched is not None, delta=True)
        # Every streamed prefix stops short of the stop string.
        assert expected.startswith(streamed), (step, streamed)
        if matched is not None:
            break
    assert matched == stop
    # It matched on the token that completed the stop string, not later.
    assert len(tok.decode(output[: step + 1])) >= index + len(stop) > len(tok.decode(output[:step]))
    assert streamed == detok.output_text == expected


def test_stop_string_kept_with_include_stop_str_in_output(tok):
    output = tok.encode(STOP_TEXT, add_special_tokens=False)
    params = SamplingParams(stop=["own f"], include_stop_str_in_output=True)
    chunks, stop, detok = _stream(tok, [], output, params)
    assert stop == "own f"
    # Text after the stop string in the same token is cut off.
    assert "".join(chunks) == detok.output_text == "The quick brown f"


def test_earliest_stop_string_wins(tok):
    output = tok.encode(STOP_TEXT, add_special_tokens=False)
    for stops in (["dog", "quick"], ["quick", "dog"]):
        _, stop, detok = _stream(tok, [], output, SamplingParams(stop=stops))
        assert stop == "quick" and detok.output_text == "The "
    # Both in one update: the one completed first wins, as if the text had come a character at a time.
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["jumps over", "fox"]))
    assert detok.update(output, False) == "fox"
    assert detok.get_next_output_text(True, delta=False) == "The quick brown "


def test_stop_buffer_holds_back_then_releases(tok):
    output = tok.encode("The quick brown", add_special_tokens=False)
    params = SamplingParams(stop=["never there"])
    detok = IncrementalDetokenizer(tok, [], params)
    for token_id in output:
        assert detok.update([token_id], False) is None
    held = len("never there") - 1
    assert detok.get_next_output_text(False, delta=False) == "The quick brown"[:-held]
    assert detok.get_next_output_text(True, delta=True) == "The quick brown"[-held:]
    # Cumulative output is the whole text; include_stop_str_in_output needs no buffer.
    assert detok.get_next_output_text(True, delta=False) == "The quick brown"
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["never there"], include_stop_str_in_output=True))
    detok.update(output, False)
    assert detok.get_next_output_text(False, delta=True) == "The quick brown"


def test_min_tokens_defers_stop_strings(tok):
    output = tok.encode("The quick brown fox", add_special_tokens=False)
    early = len(tok.encode("The quick", add_special_tokens=False))
    _, stop, detok = _stream(tok, [], output, SamplingParams(stop=["quick"], min_tokens=early + 1))
    assert stop is None and detok.output_text == "The quick brown fox"


# --- stop tokens and special tokens -------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_stop_terminated_skips_stop_token(tok, skip):
    output = tok.encode("Hello world", add_special_tokens=False) + [_eos(tok)]
    chunks, _, detok = _stream(tok, [], output, SamplingParams(skip_special_tokens=skip), stop_terminated=True)
    assert "".join(chunks) == detok.output_text == "Hello world"
    params = SamplingParams(skip_special_tokens=skip, include_stop_str_in_output=True)
    chunks, _, detok = _stream(tok, [], output, params, stop_terminated=True)
    assert "".join(chunks) == ("Hello world" if skip else "Hello world" + tok.eos_token)


def test_stop_terminated_flushes_incomplete_character(tok):
    emoji = tok.encode("🦀", add_special_tokens=False)  # absent from the corpora: split into bytes
    output = tok.encode("Hi", add_special_tokens=False) + emoji[:1] + [_eos(tok)]
    chunks, _, detok = _stream(tok, [], output, SamplingParams(), stop_terminated=True)
    assert "".join(chunks) == detok.output_text == tok.decode(output[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip):
    hello, world = (tok.encode(t, add_special_tokens=False) for t in ("Hello", " world"))
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    output = [bos] + hello + [_eos(tok), bos] + world
    chunks, _, _ = _stream(tok, [], output, SamplingParams(skip_special_tokens=skip))
    assert "".join(chunks) == tok.decode(output, skip_special_tokens=skip)
    if skip:
        assert "".join(chunks) == tok.decode(hello + world)
    else:
        assert tok.bos_token in "".join(chunks) and tok.eos_token in "".join(chunks)


def test_spaces_between_special_tokens():
    """With a decoder-less tokenizer the decode puts spaces around added tokens; spaces_between_special_tokens
    =False drops those between two adjacent added tokens, as vLLM does."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "Hello": 3, "world": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    output = [3, 1, 2, 4]
    spaced, _, _ = _stream(hf, [], output, SamplingParams(skip_special_tokens=False))
    assert "".join(spaced) == hf.decode(output) == "Hello <s> </s> world"
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    tight, _, _ = _stream(hf, [], output, params)
    assert "".join(tight) == "Hello <s></s> world"


def test_decode_token(tok):
    for token_id in tok.encode("Hello 🎉 中文", add_special_tokens=False) + [_eos(tok)]:
        assert decode_token(tok, token_id) == tok.decode([token_id])
    assert decode_token(tok, _eos(tok)) == tok.eos_token
