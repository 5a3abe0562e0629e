"""Incremental detokenization with stop strings, after vLLM's v1 detokenizer.

Each request turns its generated token ids into text one step at a time. Decoding only the new ids is
wrong for byte-level BPE (a character can span tokens) and for SentencePiece (a token's leading space
depends on what precedes it), so every step decodes a short window of ids and emits the part of its
text past the already-emitted prefix (the prefix_offset / read_offset scheme). Fast tokenizers use the
Rust `DecodeStream`, which does exactly this without Python overhead.

Texts follow the tokenizer's own `decode` (added tokens verbatim, special ones dropped when
skip_special_tokens). `clean_up_tokenization_spaces` is not applied: it needs lookahead and vLLM
does not apply it either.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from pagedllm.sampling_params import SamplingParams

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # the slow scheme still works
    _RustTokenizer = None
    DecodeStream = None

# Tests switch this off to exercise the Python window scheme on fast tokenizers.
USE_DECODE_STREAM = True

# How many prompt tokens give the first generated tokens their context (leading spaces, merges).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
_INVALID_PREFIX = "Invalid prefix"  # DecodeStream's error when the decoder's output is not monotonic


@dataclass
class _TokenizerInfo:
    rust: Any  # the `tokenizers.Tokenizer` behind a fast tokenizer, else None
    special_ids: frozenset[int]  # ids a slow tokenizer's decode drops when skip_special_tokens
    added: dict[int, str]  # added-vocabulary id -> its literal text


_INFO_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKEN_TEXT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _info(tokenizer) -> _TokenizerInfo:
    # all_special_ids / added_tokens_decoder are rebuilt on every access, so read them once per tokenizer.
    info = _INFO_CACHE.get(tokenizer)
    if info is None:
        rust = getattr(tokenizer, "_tokenizer", None)
        if _RustTokenizer is None or not isinstance(rust, _RustTokenizer):
            rust = None
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        info = _TokenizerInfo(rust, frozenset(tokenizer.all_special_ids), added)
        _INFO_CACHE[tokenizer] = info
    return info


def decode_token(tokenizer, token_id: int) -> str:
    """Text of a single token, for logprobs' decoded_token (a partial UTF-8 character reads as U+FFFD)."""
    texts = _TOKEN_TEXT_CACHE.get(tokenizer)
    if texts is None:
        texts = _TOKEN_TEXT_CACHE[tokenizer] = {}
    text = texts.get(token_id)
    if text is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts[token_id] = text
    return text


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._info = _info(tokenizer)
        self._skip_special = params.skip_special_tokens
        # vLLM's meaning of spaces_between_special_tokens=False: an added token right after another one
        # is emitted as its bare text, without any separator the decoder puts in front of it.
        keep_spaces = params.skip_special_tokens or params.spaces_between_special_tokens
        self._raw_added = None if keep_spaces else self._info.added
        self._last_was_added = False

        self._stop: list[str] = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Characters held back while not finished: a stop string may be completed by the next token.
        self._stop_buffer = self._max_stop_len - 1 if self._stop and not self._include_stop else 0

        # ids = context tokens from the prompt, then the generated ones; text covers ids[:read_offset]
        # and decode(ids[prefix_offset:read_offset]) is the already-emitted prefix of the next window.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._tokens: list[str | None] | None = None  # slow tokenizers: token strings, None when skipped
        if self._info.rust is None:
            self._tokens = self._to_tokens(self._ids)

        self._stream = None
        if self._info.rust is not None and USE_DECODE_STREAM and DecodeStream is not None:
            try:
                self._stream = DecodeStream(ids=self._ids, skip_special_tokens=self._skip_special)
            except TypeError:  # a tokenizers release without prefill: use the window scheme
                self._stream = None

        self._text = ""
        self._num_tokens = 0
        self._sent = 0  # characters already handed out by get_next_output_text
        self._stopped = False  # a stop string matched: the text is final

    @property
    def output_text(self) -> str:
        return self._text

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Appends newly generated tokens (usually one per step). If stop_terminated, the last id is an
        EOS/stop token whose text is left out unless include_stop_str_in_output. Returns the stop string if
        one now matches (the text is then truncated at it, or just after it with include_stop_str_in_output)."""
        if self._stopped:
            return None
        self._num_tokens += len(new_token_ids)
        if stop_terminated and not self._include_stop:
            new_token_ids = new_token_ids[:-1]
        old_len = len(self._text)
        for token_id in new_token_ids:
            self._append(token_id)
        if stop_terminated:  # nothing follows: release the bytes of a character that never completed
            self._flush()
        return self._check_stop(old_len)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text for the next output: all of it (delta=False) or only what is new since the last call
        (delta=True). While not finished, the last (longest stop string - 1) characters are held back so a
        stop string split across tokens is never streamed before it is recognised."""
        if finished and not self._stopped:
            old_len = len(self._text)
            self._flush()
            self._check_stop(old_len)
        end = len(self._text) if finished else max(self._sent, len(self._text) - self._stop_buffer)
        start = self._sent if delta else 0
        self._sent = end
        return self._text[start:end]

    # --- decoding ---

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # A window starting inside a character would decode to U+FFFD there and, with byte-fallback
        # decoders, could garble the first generated character too: start at a clean token.
        while context and self._decode_ids(context).startswith(_REPLACEMENT_CHAR):
            context.pop(0)
        return context

    def _to_tokens(self, ids: list[int]) -> list[str | None]:
        skip = self._info.special_ids if self._skip_special else frozenset()
        tokens = self._tokenizer.convert_ids_to_tokens(ids)
        return [None if i in skip else t for i, t in zip(ids, tokens)]

    def _decode_ids(self, ids: list[int]) -> str:
        if self._info.rust is not None:
            return self._info.rust.decode(ids, skip_special_tokens=self._skip_special)
        return self._tokens_text(self._to_tokens(ids))

    def _tokens_text(self, tokens: list[str | None]) -> str:
        kept = [t for t in tokens if t is not None]
        return self._tokenizer.convert_tokens_to_string(kept) if kept else ""

    def _window_text(self, start: int, end: int) -> str:
        if self._tokens is not None:
            return self._tokens_text(self._tokens[start:end])
        return self._info.rust.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _append(self, token_id: int) -> None:
        self._ids.append(token_id)
        if self._tokens is not None:
            self._tokens.extend(self._to_tokens([token_id]))
        chunk = self._stream_step(token_id) if self._stream is not None else self._window_step()
        if self._raw_added is not None:
            chunk = self._strip_added_separator(token_id, chunk)
        if chunk:
            self._text += chunk

    def _stream_step(self, token_id: int) -> str | None:
        try:
            chunk = self._stream.step(self._info.rust, token_id)
        except Exception as exc:
            if not str(exc).startswith(_INVALID_PREFIX):
                raise
            # Decoders like ByteFallback can rewrite earlier text (invalid byte runs); the stream cannot
            # recover, the window scheme just slices past what was emitted.
            self._stream = None
            return self._window_step()
        if chunk is not None:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return chunk

    def _window_step(self) -> str | None:
        prefix = self._window_text(self._prefix_offset, self._read_offset)
        text = self._window_text(self._prefix_offset, len(self._ids))
        # Nothing new (e.g. a skipped special token), or a character still waiting for its other bytes.
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return None
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def _flush(self) -> None:
        """Emits the text of tokens still held for an incomplete character (it stays U+FFFD)."""
        if self._read_offset == len(self._ids):
            return
        prefix = self._window_text(self._prefix_offset, self._read_offset)
        text = self._window_text(self._prefix_offset, len(self._ids))
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._stream = None  # it still holds those tokens; the window scheme carries on from the offsets
        self._text += text[len(prefix) :]

    def _strip_added_separator(self, token_id: int, chunk: str | None) -> str | None:
        content = self._raw_added.get(token_id)
        if content is not None and self._last_was_added and chunk and chunk.endswith(content):
            if chunk[: len(chunk) - len(content)].isspace():
                chunk = content
        self._last_was_added = content is not None
        return chunk

    # --- stop strings ---

    def _check_stop(self, old_len: int) -> str | None:
        """Finds a stop string ending in the text added since old_len; the one that ends first wins
        (as if the text had arrived a character at a time), then the longer one."""
        if not self._stop or self._num_tokens <= self._min_tokens or len(self._text) == old_len:
            return None
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if index != -1 and (best is None or (index + len(stop), index) < best[:2]):
                best = (index + len(stop), index, stop)
        if best is None:
            return None
        end, index, stop = best
        self._text = self._text[: end if self._include_stop else index]
        self._stopped = True
        return stop
