"""Request fields -> StructuredOutputsParams: vLLM's `structured_outputs`, OpenAI's `response_format`, the older
`guided_*` fields, and the JSON-schema constraint that enforces `tool_choice` required / a named function.

Only the shape is checked here (a 400 naming the field); whether a schema, regex or grammar is valid is the engine's
verdict when the request is added, which comes back as a 400 too, before anything is generated."""

from __future__ import annotations

import json
from typing import Any

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, ChatTool, SamplingRequest
from pagedllm.entrypoints.openai.serving_base import APIError
from pagedllm.sampling_params import StructuredOutputsParams


def _params(param: str, **fields: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as error:
        raise APIError(str(error).replace("structured_outputs", param, 1), 400, param=param) from None


def structured_outputs_of(request: SamplingRequest) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field that gave it (for error messages); (None, None) if unconstrained."""
    given: list[tuple[str, StructuredOutputsParams]] = []
    so = request.structured_outputs
    if so is not None:
        fields = so.model_dump(by_alias=True, exclude_none=True)
        if isinstance(fields.get("structural_tag"), dict):
            fields["structural_tag"] = json.dumps(fields["structural_tag"])
        given.append(("structured_outputs", _params("structured_outputs", **fields)))
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            given.append(("response_format", _params("response_format", json_object=True)))
        elif fmt.type == "json_schema":
            spec = fmt.json_schema or {}
            schema = spec.get("schema", spec.get("schema_"))
            if not isinstance(schema, (dict, bool)):
                raise APIError("response_format.json_schema.schema must be a JSON schema object.", 400, param="response_format")
            given.append(("response_format", _params("response_format", json=schema if isinstance(schema, dict) else {})))
        else:  # structural_tag: the whole object, as vLLM passes it on
            given.append(("response_format", _params("response_format", structural_tag=json.dumps(fmt.model_dump()))))
    guided = {"json": request.guided_json, "regex": request.guided_regex, "choice": request.guided_choice,
              "grammar": request.guided_grammar}
    guided = {k: v for k, v in guided.items() if v is not None}
    if guided:
        if len(guided) > 1:
            raise APIError(f"only one guided_* field may be set; got {', '.join('guided_' + k for k in guided)}.", 400,
                           param="guided_" + next(iter(guided)))
        kind = next(iter(guided))
        given.append((f"guided_{kind}", _params(f"guided_{kind}", **guided)))
    if len(given) > 1:
        raise APIError(f"only one kind of structured output may be set; got {', '.join(p for p, _ in given)}.", 400,
                       param=given[1][0])
    return (given[0][1], given[0][0]) if given else (None, None)


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_choice_mode(request: ChatCompletionRequest) -> str:
    """none | auto | required | named."""
    choice = request.tool_choice
    if choice is None:
        return "auto" if request.tools else "none"
    return choice if isinstance(choice, str) else "named"


def named_tool(request: ChatCompletionRequest) -> ChatTool:
    choice = request.tool_choice
    assert choice is not None and not isinstance(choice, str)
    for tool in request.tools or []:
        if tool.function.name == choice.function.name:
            return tool
    raise APIError(f"tool_choice names the function {choice.function.name!r}, which is not in tools.", 400,
                   param="tool_choice")


def tool_constraint(request: ChatCompletionRequest, mode: str) -> StructuredOutputsParams | None:
    """The JSON-schema constraint that makes a forced tool call always parse: the named function's arguments, or
    (required) an array of {"name", "parameters"} calls, at least one."""
    if mode == "named":
        return _params("tools", json=_parameters(named_tool(request)))
    if mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in request.tools or []]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return _params("tools", json=schema)
