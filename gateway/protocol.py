"""The OpenAI request bodies the gateway accepts, as pydantic models free of I/O.

Types and shapes are checked here; value ranges are the service's to check (it serves gRPC clients too), and
its INVALID_ARGUMENT comes back as a 400 naming the same field. That includes whether a JSON schema (in
`response_format` or a tool's `parameters`) can be used for constrained decoding. Fields this API does not know
are ignored and logged once; fields OpenAI defines that this server cannot honour are refused, never silently
dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

Number = StrictFloat | StrictInt


def refused(reason: str, allowed: tuple = (None,)):
    """A field OpenAI defines that this server cannot honour: only `allowed` values pass (the schema says so),
    anything else is a 400 naming the field with `reason`."""

    def check(value):
        if value not in allowed:
            raise ValueError(reason)
        return value

    return BeforeValidator(check)


TEXT_ONLY = "this model reads and writes text only"


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


def _text_parts_only(value):
    if isinstance(value, dict) and value.get("type", "text") != "text":
        raise ValueError(f"content parts of type {value.get('type')!r} are not supported; {TEXT_ONLY}")
    return value


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


ContentPart = Annotated[TextPart, BeforeValidator(_text_parts_only)]


class FunctionCall(_Model):
    name: StrictStr
    # JSON text, as the model wrote it.
    arguments: StrictStr


class ToolCall(_Model):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    # What the validators below enforce, for the OpenAPI document: content, unless an assistant called tools.
    model_config = ConfigDict(
        **_Model.model_config,
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {"required": ["role", "tool_calls"],
                 "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}},
            ]
        },
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # An assistant message that only called tools has none; every other message needs it.
    tool_calls: list[ToolCall] | None = None
    content: StrictStr | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    # An earlier assistant turn's thinking, as this server (and SGLang, vLLM) return it; `reasoning` is vLLM's
    # newer name. Templates that render earlier thinking (Qwen3's) read it.
    reasoning_content: StrictStr | None = None
    reasoning: StrictStr | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_function_role(cls, value):
        if value == "function":
            raise ValueError("the legacy function role is not supported; use tool messages with tool_call_id")
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_tool_calls(cls, value, info: ValidationInfo):
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise PydanticCustomError("missing", "Field required")
        return value


class StreamOptions(_Model):
    include_usage: StrictBool | None = None


class ResponseFormatText(_Model):
    type: Literal["text"]


class ResponseFormatJsonObject(_Model):
    type: Literal["json_object"]


class JsonSchema(_Model):
    name: StrictStr
    description: StrictStr | None = None
    # The output always follows the schema (constrained decoding), strict or not.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormatJsonSchema(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class FunctionDefinition(_Model):
    name: StrictStr
    description: StrictStr | None = None
    # A JSON Schema object; absent means no arguments.
    parameters: dict[str, Any] | None = None
    # The arguments of a call always follow `parameters` (constrained decoding), strict or not.
    strict: StrictBool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: StrictStr


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class SamplingFields(_Model):
    """Fields chat and text completions share."""

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stop: StrictStr | list[Annotated[StrictStr, Field(min_length=1)]] | None = None
    seed: StrictInt | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[Annotated[StrictStr, Field(pattern=r"^[0-9]{1,9}$")], Number] | None = None
    user: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # Extras SGLang and vLLM accept too.
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    # A reasoning model's thinking is closed after this many tokens, so the answer always comes.
    max_reasoning_tokens: StrictInt | None = None
    # Constrained decoding, as SGLang takes it: the output matches this regex or EBNF grammar.
    regex: StrictStr | None = None
    ebnf: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        return [value] if isinstance(value, str) else value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # Accepted and without effect here, as on any single-deployment server:
    store: StrictBool | None = None
    metadata: dict[str, StrictStr] | None = None
    service_tier: StrictStr | None = None
    # Refused unless they ask for what this model does anyway:
    modalities: list[Annotated[Literal["text"], refused(TEXT_ONLY, ("text",))]] | None = None
    audio: Annotated[None, refused(TEXT_ONLY)] = None
    prediction: Annotated[None, refused("predicted outputs are not supported by this server")] = None
    functions: Annotated[None, refused("the legacy functions field is not supported; use tools")] = None
    function_call: Annotated[
        Literal["none"] | None, refused("the legacy function_call field is not supported; use tool_choice", (None, "none"))
    ] = None
    web_search_options: Annotated[None, refused("web search is not supported by this server")] = None
    # "none" switches a reasoning model's thinking off (enable_thinking=false in its chat template); other values
    # are accepted and leave the model's own default.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    # Extra variables for the model's chat template, e.g. {"enable_thinking": false} (as SGLang and vLLM accept).
    chat_template_kwargs: dict[str, Any] | None = None
    # Assistant prefill (as vLLM and SGLang accept): with continue_final_message and add_generation_prompt false, the
    # last (assistant) message is continued rather than closed; the answer is the continuation.
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    suffix: Annotated[None, refused("suffix (fill-in-the-middle) is not supported by this model", (None, ""))] = None
    best_of: StrictInt | None = None
