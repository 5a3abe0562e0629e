"""Constrained decoding (JSON schema, regex, choice, grammar, structural tags) with xgrammar: see manager.py."""

from pagedllm.structured_output.bitmask import GrammarBitmask
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.structured_output.request import StructuredOutputRequest

__all__ = ["GrammarBitmask", "StructuredOutputManager", "StructuredOutputRequest"]
