"""Pydantic models of the OpenAI API (plus vLLM's sampling extensions) that the server speaks.

Requests validate ranges here, so a bad field comes back as a 400 whose `param` names it; checks that
depend on the model (context length, vocabulary) happen in the engine. Unknown fields are ignored, as
OpenAI clients send some (`user`, `best_of`, ...) that do not matter here.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StrictInt, ValidationInfo, field_validator, model_serializer,
)

from pagedllm.entrypoints.chat_utils import template_message

LOGPROBS_CAP = 20  # OpenAI's limit on logprobs / top_logprobs
# Token ids must be real integers: lax mode would read true/false or "7" as ids.
TokenIds = list[StrictInt]
PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # NaN/inf in a request (Python's json accepts them) must fail like any out-of-range number.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ---- errors ---------------------------------------------------------------------------------
class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- shared request fields ----------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ResponseFormat(OpenAIModel):
    """OpenAI's response_format: text | json_object | json_schema ({"name", "schema", "strict"}) | structural_tag."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # structural_tag carries its own fields
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's `structured_outputs` body field: one of json, regex, choice, grammar, json_object, structural_tag."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class StructuredFields(OpenAIModel):
    """Constrained-decoding fields of completions and chat: vLLM's `structured_outputs`, OpenAI's `response_format`
    and the older `guided_*` fields that many clients still send."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; xgrammar is the only backend
    guided_whitespace_pattern: str | None = None


class SamplingRequest(StructuredFields):
    """Fields common to completions and chat completions."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)  # None: 1.0, OpenAI's default
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: TokenIds | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1)  # only requests with the same salt share prefix-cache blocks
    priority: int = 0  # --scheduling-policy priority: lower runs first
    # Disaggregated prefill (kv_transfer/config.py), as vLLM's P/D: {"do_remote_decode": true} asks a producer for a
    # prefill whose KV a consumer pulls; the producer's answer ({"do_remote_prefill": true, "remote_host", ...}) is
    # what a consumer gets. The engine sees it as SamplingParams.extra_args["kv_transfer_params"].
    kv_transfer_params: dict[str, Any] | None = None
    # vLLM's logits-processing extensions: only these tokens may be sampled; words never to generate; and arguments
    # for custom logits processors (--logits-processors), which the engine sees as SamplingParams.extra_args.
    allowed_token_ids: TokenIds | None = None
    bad_words: list[str] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None  # declared after `stream`, so its validator sees it

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As vLLM and OpenAI: a 400 naming stream_options, not options silently ignored by a non-streamed reply.
        # `stream` is absent from info.data when it failed itself; that error is the one to report.
        if value is not None and "stream" in info.data and not info.data["stream"]:
            raise ValueError("stream_options can only be set when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---- /v1/completions ----------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(16, ge=1)  # None: up to the context length
    logprobs: int | None = Field(None, ge=0, le=LOGPROBS_CAP)
    echo: bool = False
    use_beam_search: bool = False  # vLLM's extension: the n best of n beams, as choices 0 (best) .. n-1
    length_penalty: float = 1.0  # beam search: hypotheses rank by cum_logprob / num_tokens ** length_penalty


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class KVTransferResponse(OpenAIModel):
    """A producer's answer to a do_remote_decode request carries `kv_transfer_params` (where a consumer pulls the
    prompt's KV from); every other answer omits the field (pydantic < 2.12 has no Field(exclude_if=...))."""

    @model_serializer(mode="wrap")
    def _omit_empty_transfer(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("kv_transfer_params", 0) is None:
            del data["kv_transfer_params"]
        return data


class CompletionResponse(KVTransferResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    kv_transfer_params: dict[str, Any] | None = None


# ---- /v1/chat/completions -----------------------------------------------------------------
class ImageURL(OpenAIModel):
    url: str  # data:image/...;base64,..., http(s)://..., or file://... (--allowed-local-media-path)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides the resolution


class ContentPart(OpenAIModel):
    type: str  # text | image_url (anything else: a 400 naming it)
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(OpenAIModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # tool fields pass through to the template
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string, or, with images, a list of
        text and {"type": "image"} parts (entrypoints/chat_utils.py)."""
        return template_message(self.model_dump(exclude_none=True))[0]

    def image_urls(self) -> list[str]:
        """The URLs of the message's image parts, in order."""
        return template_message(self.model_dump(exclude_none=True))[1]


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    mm_processor_kwargs: dict[str, Any] | None = None  # image processor settings for this request's images
    tools: list[ChatTool] | None = None
    # None: "auto" when tools are given, else "none" (OpenAI's defaults).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. {"enable_thinking": false}
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=LOGPROBS_CAP)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # assistant prefill: the reply continues the last message


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatLogprobToken] | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(OpenAIModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OpenAIModel):
    """A streamed piece of a tool call: the first names it (id, type, function name), the rest add arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # what a thinking model wrote in <think>...</think> (--reasoning-parser)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(KVTransferResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None


class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer, version -------------------------------------------------------------
class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered with the chat template, like a chat request
    mm_processor_kwargs: dict[str, Any] | None = None  # the images' processor settings, as in a chat request
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(OpenAIModel):
    prompt: str


class VersionResponse(OpenAIModel):
    version: str


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class EmbeddingData(OpenAIModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"
    index: int


DataT = TypeVar("DataT")


class ListResponse(OpenAIModel, Generic[DataT]):
    """The list answer of the pooling endpoints (embeddings, score, classify): their items in `data`."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[DataT]
    usage: UsageInfo


class EmbeddingResponse(ListResponse[EmbeddingData]):
    pass


# ---- /v1/score, /rerank, /classify (vLLM's pooling endpoints) ----------------------------------
# -1: truncate to max_model_len (vLLM's meaning); None: no truncation, a pair longer than the context is a 400.
TruncatePromptTokens = Annotated[int | None, Field(ge=-1)]


class ScoreRequest(OpenAIModel):
    model: str | None = None
    text_1: str | list[str]  # one text against every text_2, or a list paired with text_2 index by index
    text_2: str | list[str]
    truncate_prompt_tokens: TruncatePromptTokens = None
    use_activation: bool | None = None  # a cross-encoder's sigmoid; False: its raw logit


class ScoreData(OpenAIModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(ListResponse[ScoreData]):
    pass


class RerankRequest(OpenAIModel):
    """Jina's and Cohere's rerank body, as vLLM serves it at /rerank, /v1/rerank and /v2/rerank."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=0)  # None or 0: every document
    return_documents: bool = True
    truncate_prompt_tokens: TruncatePromptTokens = None
    use_activation: bool | None = None


class RerankDocument(OpenAIModel):
    text: str


class RerankResult(OpenAIModel):
    index: int  # the document's position in the request
    document: RerankDocument | None = None  # None unless return_documents
    relevance_score: float


class RerankUsage(OpenAIModel):
    total_tokens: int


class RerankResponse(OpenAIModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]  # by relevance_score, highest first


class ClassificationRequest(OpenAIModel):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    use_activation: bool | None = None  # softmax over the labels (sigmoid for one); False: the raw logits
    user: str | None = None


class ClassificationData(OpenAIModel):
    index: int
    label: str  # the config's id2label name of the most probable class
    probs: list[float]
    num_classes: int


class ClassificationResponse(ListResponse[ClassificationData]):
    pass
