"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the same gRPC Generate call.

A Messages request is read into the OpenAI chat request it means (system, turns, tool_use / tool_result blocks,
tools, tool_choice, stop_sequences, sampling), so it goes through the same validation and the same translation to
`GenerateRequest` as chat completions; what comes back is turned into Anthropic's message object or its stream of
typed events. Errors have Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.

Pure functions and classes, no I/O (gateway/routes.py owns the handlers).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from gateway.errors import ApiError, BadRequest
from generate.v1 import generate_pb2 as pb

# HTTP status → Anthropic's error type (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
STOP_REASONS = {
    pb.FINISH_REASON_STOP: "end_turn",
    pb.FINISH_REASON_LENGTH: "max_tokens",
    pb.FINISH_REASON_TOOL_CALLS: "tool_use",
}


def error_body(error: ApiError) -> bytes:
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": error.message}}).encode()


# ---------------------------------------------------------------------------------------------- request


class _Model(BaseModel):
    # Fields Anthropic adds over time are accepted and ignored (as the OpenAI routes do, logged once).
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class TextBlock(_Model):
    type: Literal["text"]
    text: StrictStr


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: dict[str, Any]


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: StrictStr | list[TextBlock] = ""
    is_error: StrictBool | None = None


class ThinkingBlock(_Model):
    """Thinking from an earlier turn: context for the model, not a message of its own."""

    type: Literal["thinking", "redacted_thinking"]


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class InputMessage(_Model):
    role: Literal["user", "assistant"]
    content: StrictStr | list[Block]


class ToolDefinition(_Model):
    name: StrictStr
    description: StrictStr | None = None
    input_schema: dict[str, Any]
    # Anthropic's server tools (web search, code execution, ...) carry another type and no input_schema.
    type: Literal["custom"] | None = None


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: StrictStr | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None


class Metadata(_Model):
    user_id: StrictStr | None = None


class CountTokensRequest(_Model):
    model: StrictStr
    messages: list[InputMessage] = Field(min_length=1)
    system: StrictStr | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: StrictInt
    stop_sequences: list[StrictStr] | None = None
    stream: StrictBool | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    top_k: StrictInt | None = None
    metadata: Metadata | None = None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def to_chat(req: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat request body a Messages request means (validated by the caller as chat requests are);
    BadRequest for what this server cannot honour."""
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        text, calls, thoughts = [], [], []
        for block in m.content:
            if isinstance(block, ToolResultBlock):
                if m.role != "user":
                    raise BadRequest(f"messages[{i}]: tool_result blocks belong in user turns", param=f"messages[{i}]")
                result = _text(block.content)
                messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                 "content": f"Error: {result}" if block.is_error else result})
            elif isinstance(block, ToolUseBlock):
                if m.role != "assistant":
                    raise BadRequest(f"messages[{i}]: tool_use blocks belong in assistant turns", param=f"messages[{i}]")
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
            elif isinstance(block, TextBlock):
                text.append(block.text)
            elif isinstance(block, ThinkingBlock) and isinstance((block.model_extra or {}).get("thinking"), str):
                thoughts.append(block.model_extra["thinking"])
        if text or calls or m.role == "assistant":
            message: dict[str, Any] = {"role": m.role, "content": "".join(text) if text or not calls else None}
            if calls:
                message["tool_calls"] = calls
            if thoughts and m.role == "assistant":  # for templates that render earlier thinking
                message["reasoning_content"] = "".join(thoughts)
            messages.append(message)
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.messages[-1].role == "assistant" and messages and messages[-1]["role"] == "assistant":
        # Anthropic's prefill: a last assistant turn is the start of the answer, which continues it.
        body["continue_final_message"] = True
    if req.tools:
        for t in req.tools:
            if t.type not in (None, "custom"):
                raise BadRequest(f"the server tool {t.type!r} is not available on this server", param="tools")
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}), "parameters": t.input_schema}}
            for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise BadRequest("tool_choice.name is required with type 'tool'", param="tool_choice.name")
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use and req.tools:
            body["parallel_tool_calls"] = False
    if req.thinking is not None and req.thinking.type == "disabled":
        body["chat_template_kwargs"] = {"enable_thinking": False}
    elif req.thinking is not None and req.thinking.budget_tokens is not None:
        body["max_reasoning_tokens"] = req.thinking.budget_tokens
    if isinstance(req, MessagesRequest):
        if req.max_tokens < 1:
            raise BadRequest("max_tokens: must be at least 1", param="max_tokens")
        body["max_tokens"] = req.max_tokens
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
        if req.metadata and req.metadata.user_id:
            body["user"] = req.metadata.user_id
    return body


# ---------------------------------------------------------------------------------------------- response


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def usage_dict(usage: pb.Usage | None, output_tokens: int) -> dict[str, int]:
    prompt = usage.prompt_tokens if usage is not None else 0
    cached = usage.cached_tokens if usage is not None else 0
    return {
        # Anthropic counts cache reads apart from the other input tokens.
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.completion_tokens if usage is not None else output_tokens,
    }


def _stop(choice: pb.ChoiceDelta) -> tuple[str, str | None]:
    if choice.HasField("stop_string"):
        return "stop_sequence", choice.stop_string
    return STOP_REASONS.get(choice.finish_reason, "end_turn"), None


class MessageAccumulator:
    """Collects GenerateResponse messages into one Anthropic `message` object."""

    def __init__(self) -> None:
        self._blocks: list[dict[str, Any]] = []
        self._arguments: dict[int, list[str]] = {}
        self._stop: tuple[str, str | None] = ("end_turn", None)
        self._tokens = 0

    def add(self, response: pb.GenerateResponse, offset: int = 0) -> None:
        for c in response.choices:
            self._tokens += len(c.token_ids)
            if c.reasoning:
                if self._blocks and self._blocks[-1]["type"] == "thinking":
                    self._blocks[-1]["thinking"] += c.reasoning
                else:
                    self._blocks.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
            if c.text:
                if self._blocks and self._blocks[-1]["type"] == "text":
                    self._blocks[-1]["text"] += c.text
                else:
                    self._blocks.append({"type": "text", "text": c.text})
            for t in c.tool_calls:
                if t.id:
                    self._blocks.append({"type": "tool_use", "id": t.id, "name": t.name, "input": {}})
                    self._arguments[len(self._blocks) - 1] = []
                self._arguments[max(self._arguments)].append(t.arguments)
            if c.finish_reason:
                self._stop = _stop(c)

    def response(self, message: str, model: str, usage: pb.Usage | None) -> dict[str, Any]:
        for index, parts in self._arguments.items():
            self._blocks[index]["input"] = _arguments(parts)
        stop_reason, stop_sequence = self._stop
        return {
            "id": message, "type": "message", "role": "assistant", "model": model, "content": self._blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage_dict(usage, self._tokens),
        }


def _arguments(parts: list[str]) -> dict[str, Any]:
    try:
        value = json.loads("".join(parts) or "{}")
    except ValueError:  # cut short by max_tokens: the stop reason says so
        return {}
    return value if isinstance(value, dict) else {}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class MessageStreamEncoder:
    """Turns GenerateResponse messages into Anthropic's stream events: message_start, ping, a content block per text
    run or tool call (content_block_start, text_delta / input_json_delta, content_block_stop), message_delta with the
    stop reason and usage, message_stop."""

    include_usage = True

    def __init__(self, message: str, model: str) -> None:
        self._message = message
        self._model = model
        self._open: str | None = None  # the type of the content block being written
        self._index = -1
        self._stop: tuple[str, str | None] = ("end_turn", None)
        self._tokens = 0

    def start(self, n: int) -> list[str]:
        message = {"id": self._message, "type": "message", "role": "assistant", "model": self._model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage_dict(None, 0)}
        return [_event("message_start", {"message": message}), _event("ping", {})]

    def _block(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self._close()
        self._index += 1
        self._open = kind
        return [*events, _event("content_block_start", {"index": self._index, "content_block": block})]

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", {"index": self._index})]

    def encode(self, response: pb.GenerateResponse, offset: int = 0) -> list[str]:
        events: list[str] = []
        for c in response.choices:
            self._tokens += len(c.token_ids)
            if c.reasoning:
                if self._open != "thinking":
                    events += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                events.append(_event("content_block_delta", {"index": self._index,
                                                             "delta": {"type": "thinking_delta", "thinking": c.reasoning}}))
            if c.text:
                if self._open != "text":
                    events += self._block("text", {"type": "text", "text": ""})
                events.append(_event("content_block_delta", {"index": self._index,
                                                             "delta": {"type": "text_delta", "text": c.text}}))
            for t in c.tool_calls:
                if t.id:
                    events += self._block("tool_use", {"type": "tool_use", "id": t.id, "name": t.name, "input": {}})
                if t.arguments:
                    events.append(_event("content_block_delta", {
                        "index": self._index, "delta": {"type": "input_json_delta", "partial_json": t.arguments}}))
            if c.finish_reason:
                self._stop = _stop(c)
        return events

    def frame(self, payloads: list[str]) -> bytes:
        return "".join(payloads).encode()

    def end(self, usage: pb.Usage | None) -> bytes:
        stop_reason, stop_sequence = self._stop
        return "".join([
            *self._close(),
            _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                     "usage": usage_dict(usage, self._tokens)}),
            _event("message_stop", {}),
        ]).encode()

    def failed(self, error: ApiError) -> bytes:
        return b"event: error\ndata: " + error_body(error) + b"\n\n"
