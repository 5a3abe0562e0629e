"""Speculative decoding: proposers guess k tokens per request (ngram prompt lookup, a draft model), the target model
verifies them all in one forward (spec_decode/decoder.py says how, and why the output distribution is the target's)."""

from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.decoder import SpecDecoder, SpecDecodeStats

__all__ = ["SpeculativeConfig", "SpecDecoder", "SpecDecodeStats"]
