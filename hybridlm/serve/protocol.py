"""OpenAI request bodies as pydantic models, and the API's error shape.

Types are strict (a string where a number belongs is a 400, as at OpenAI). Fields OpenAI defines that
this server cannot honour are accepted by the schema and refused with a 400 that names them
(`unsupported_fields`), never silently ignored; fields nobody defines are refused by the schema.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error the client caused or must handle, in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any]


class ToolCallMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # extra fields allowed: SDKs echo back their response objects (refusal, annotations, audio: null)
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Strict):
    """Fields shared by both endpoints. None means "the server's default"."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted and without effect on generation
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI fields this server cannot honour: refused by name (see unsupported_fields)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None
    verbosity: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


def unsupported_fields(request: ChatCompletionRequest | CompletionRequest) -> list[tuple[str, str]]:
    """(field, why) for every field set to something this server cannot do."""
    problems = []
    if isinstance(request, ChatCompletionRequest):
        for name in ("audio", "prediction", "functions", "function_call", "web_search_options", "verbosity"):
            if getattr(request, name) is not None:
                hint = " (use tools / tool_choice)" if name.startswith("function") else ""
                problems.append((name, f"'{name}' is not supported by this server{hint}"))
        if request.modalities is not None and request.modalities != ["text"]:
            problems.append(("modalities", "only the 'text' modality is supported"))
        if request.response_format is not None and request.response_format.type != "text":
            problems.append(("response_format", f"response_format '{request.response_format.type}' is not supported "
                                                 "(no constrained decoding); ask for JSON in the prompt instead"))
        if request.top_logprobs and not request.logprobs:
            problems.append(("top_logprobs", "top_logprobs needs logprobs: true"))
    else:
        if request.suffix:
            problems.append(("suffix", "'suffix' (fill-in-the-middle) is not supported"))
        if request.best_of is not None and request.best_of != (request.n or 1):
            problems.append(("best_of", "best_of other than n is not supported"))
        if request.echo and request.logprobs is not None:
            problems.append(("echo", "echo with logprobs (prompt logprobs) is not supported"))
    return problems
