"""Tool-call parsers (`--tool-call-parser`) and the streams of forced tool choices."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ExtractedToolCallInformation, ToolParser, ToolStream
from pagedllm.entrypoints.openai.tool_parsers.forced import NamedToolStream, RequiredToolStream
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_PARSERS)}; got {name!r}.") from None


__all__ = ["ExtractedToolCallInformation", "ToolParser", "ToolStream", "NamedToolStream", "RequiredToolStream",
           "HermesToolParser", "Llama3JsonToolParser", "TOOL_PARSERS", "get_tool_parser"]
