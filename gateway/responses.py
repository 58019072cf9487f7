"""OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`, `.../input_items`) over the same
gRPC Generate call as chat completions.

A Responses request is read into the chat request it means (instructions, the stored conversation of
`previous_response_id`, input items: messages, function calls and their outputs; function tools, tool_choice,
text.format), so it goes through the same validation and translation to `GenerateRequest` as chat completions.
What comes back becomes the response object's output items (`message` with `output_text`, `function_call`) or the
typed stream events OpenAI sends, numbered by `sequence_number`. `ResponseBuilder` is the one place that turns
generated text and tool calls into items and events; the non-streamed response is what the events describe.

Pure functions and classes, no I/O (gateway/routes.py owns the handlers, gateway/store.py the stored responses).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from gateway.errors import ApiError, BadRequest
from generate.v1 import generate_pb2 as pb

# Tools OpenAI runs on its side: nothing here can run them, so a request naming one is refused.
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                  "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")


# The service's field names → the Responses API parameter a client sent, for error messages.
PARAM_ALIAS = {
    "max_tokens": "max_output_tokens",
    "input": "input",
    "input.chat": "input",
    "input.chat.messages": "input",
    "constraint": "text.format",
    "constraint.json_object": "text.format",
    "constraint.json_schema": "text.format.schema",
}


def responses_param(chat_param: str | None) -> str | None:
    """A chat request's parameter, as the Responses API names it (for errors found checking the chat request)."""
    if chat_param is None:
        return None
    for chat, ours in (("max_tokens", "max_output_tokens"), ("max_completion_tokens", "max_output_tokens"),
                       ("messages", "input"), ("response_format.json_schema.schema", "text.format.schema"),
                       ("response_format", "text.format")):
        if chat_param == chat or chat_param.startswith((chat + ".", chat + "[")):
            return ours
    if chat_param.startswith("tools[") and ".function." in chat_param:
        return chat_param.replace(".function.", ".")
    return chat_param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------- request


class _Model(BaseModel):
    # Fields OpenAI adds over time are accepted and ignored (as the chat route does, logged once).
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class CreateResponse(_Model):
    model: StrictStr
    input: StrictStr | list[Any]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    stream: StrictBool | None = None
    store: StrictBool | None = None
    background: StrictBool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: StrictInt | None = None
    include: list[StrictStr] | None = None
    conversation: Any = None
    prompt: Any = None


class _InputText(_Model):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class _Refusal(_Model):
    type: Literal["refusal"]
    refusal: StrictStr


class _Message(_Model):
    type: Literal["message"] = "message"
    id: StrictStr | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[dict[str, Any]]


class _FunctionCall(_Model):
    type: Literal["function_call"]
    id: StrictStr | None = None
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class _FunctionCallOutput(_Model):
    type: Literal["function_call_output"]
    id: StrictStr | None = None
    call_id: StrictStr
    output: StrictStr | list[dict[str, Any]]


class _FunctionTool(_Model):
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


def _parse(model: type[_Model], value: Any, at: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join([at, *(str(p) for p in first["loc"])])
        raise BadRequest(f"{where}: {first['msg']}", param=where) from None


def _content_text(content: str | list[dict[str, Any]], at: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{at}[{j}]"
        if kind in ("input_text", "output_text"):
            parts.append(_parse(_InputText, part, where).text)
        elif kind == "refusal":
            parts.append(_parse(_Refusal, part, where).refusal)
        elif kind in ("input_image", "input_file", "input_audio"):
            raise BadRequest(f"{where}: {kind} content is not supported by this server; send text", param=f"{where}.type")
        else:
            raise BadRequest(f"{where}: unknown content part type {kind!r}", param=f"{where}.type")
    return "".join(parts)


def input_items(req: CreateResponse) -> list[dict[str, Any]]:
    """The request's input as a list of items with ids, as `GET .../input_items` lists them."""
    raw = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    items = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}]: an input item must be an object", param=f"input[{i}]")
        kind = item.get("type", "message")
        at = f"input[{i}]"
        if kind == "message":
            m = _parse(_Message, item, at)
            text = _content_text(m.content, f"{at}.content")
            part = "output_text" if m.role == "assistant" else "input_text"
            items.append({"type": "message", "id": m.id or new_id("msg"), "role": m.role, "status": "completed",
                          "content": [{"type": part, "text": text, **({"annotations": []} if part == "output_text" else {})}]})
        elif kind == "function_call":
            c = _parse(_FunctionCall, item, at)
            items.append({"type": "function_call", "id": c.id or new_id("fc"), "call_id": c.call_id, "name": c.name,
                          "arguments": c.arguments, "status": "completed"})
        elif kind == "function_call_output":
            o = _parse(_FunctionCallOutput, item, at)
            output = _content_text(o.output, f"{at}.output")
            items.append({"type": "function_call_output", "id": o.id or new_id("fco"), "call_id": o.call_id,
                          "output": output, "status": "completed"})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: this model has none to continue
        elif kind == "item_reference":
            raise BadRequest(f"{at}: item references are not supported; send the item itself", param=f"{at}.type")
        else:
            raise BadRequest(f"{at}: input items of type {kind!r} are not supported by this server", param=f"{at}.type")
    return items


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for input or output items: consecutive function calls become one assistant turn."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": "".join(p["text"] for p in item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and last.get("content") is not None:
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def to_chat(req: CreateResponse, items: list[dict[str, Any]], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request a Responses request means: instructions, then the stored conversation, then the input.
    BadRequest for what this server cannot honour, naming the field."""
    if req.background:
        raise BadRequest("background responses are not supported by this server", param="background")
    if req.conversation is not None:
        raise BadRequest("conversations are not supported by this server; use previous_response_id", param="conversation")
    if req.prompt is not None:
        raise BadRequest("stored prompts are not supported by this server; send instructions and input", param="prompt")
    if req.top_logprobs:
        raise BadRequest("top_logprobs is not supported on /v1/responses; use /v1/chat/completions", param="top_logprobs")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    messages += items_to_messages(items)
    if not messages:
        raise BadRequest("input must not be empty", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    effort = (req.reasoning or {}).get("effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):
            raise BadRequest(f"reasoning.effort: unknown value {effort!r}", param="reasoning.effort")
        body["reasoning_effort"] = effort  # "none" switches a reasoning model's thinking off
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                where = f"tools[{i}].type"
                what = f"the built-in tool {kind!r}" if kind in BUILT_IN_TOOLS else f"tools of type {kind!r}"
                raise BadRequest(f"{where}: {what} is not available on this server; only function tools are", param=where)
            t = _parse(_FunctionTool, tool, f"tools[{i}]")
            function: dict[str, Any] = {"name": t.name, "parameters": t.parameters or {"type": "object", "properties": {}}}
            if t.description:
                function["description"] = t.description
            if t.strict is not None:
                function["strict"] = t.strict
            tools.append({"type": "function", "function": function})
        body["tools"] = tools
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise BadRequest("text.format.schema is required with type json_schema", param="text.format.schema")
        schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema_}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def _tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise BadRequest(f"tool_choice: unknown value {choice!r}; use auto, none, required or a function",
                             param="tool_choice")
        return choice
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice.name: the function to call is required", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"tool_choice of type {kind!r} is not supported by this server; use auto, none, required or "
                     "a function", param="tool_choice")


# ---------------------------------------------------------------------------------------------- response


class ResponseBuilder:
    """Turns GenerateResponse messages into the response's output items and the stream events that build them.

    `add` returns the events a message causes (`response.output_item.added`, `.content_part.added`,
    `.output_text.delta`, `.function_call_arguments.delta`, and the `.done` events of an item it closes); the
    non-streamed path ignores them and reads `response()` at the end."""

    include_usage = True

    def __init__(self, response_id: str, req: CreateResponse, created_at: float | None = None) -> None:
        self.id = response_id
        self._req = req
        self.created_at = int(created_at or time.time())
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being written
        self._incomplete = False
        self._tokens = 0
        self._sequence = 0
        self.status = "in_progress"
        self.error: dict[str, str] | None = None
        self.final: dict[str, Any] | None = None  # the response object once finished or failed

    # -- events

    def _event(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response(None)
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def add(self, message: pb.GenerateResponse, offset: int = 0) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for c in message.choices:
            self._tokens += len(c.token_ids)
            if c.reasoning:
                if self._open is None or self._open["type"] != "reasoning":
                    events += self._close()
                    events += self._open_item({"type": "reasoning", "id": new_id("rs"), "summary": [],
                                               "content": [{"type": "reasoning_text", "text": ""}]})
                self._open["content"][0]["text"] += c.reasoning
                events.append(self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                          output_index=len(self.output) - 1, content_index=0, delta=c.reasoning))
            if c.text:
                if self._open is None or self._open["type"] != "message":
                    events += self._close()
                    events += self._open_item({"type": "message", "id": new_id("msg"), "status": "in_progress",
                                               "role": "assistant", "content": []})
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    self._open["content"].append(part)
                    events.append(self._event("response.content_part.added", item_id=self._open["id"],
                                              output_index=len(self.output) - 1, content_index=0, part=dict(part)))
                self._open["content"][0]["text"] += c.text
                events.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                          output_index=len(self.output) - 1, content_index=0, delta=c.text, logprobs=[]))
            for t in c.tool_calls:
                if t.id:
                    events += self._close()
                    events += self._open_item({"type": "function_call", "id": new_id("fc"), "call_id": t.id,
                                               "name": t.name, "arguments": "", "status": "in_progress"})
                if t.arguments and self._open is not None and self._open["type"] == "function_call":
                    self._open["arguments"] += t.arguments
                    events.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                              output_index=len(self.output) - 1, delta=t.arguments))
            if c.finish_reason == pb.FINISH_REASON_LENGTH:
                self._incomplete = True
        return events

    def _open_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=_copy(item))]

    def _close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.output) - 1
        events = []
        if item["type"] == "reasoning":
            events.append(self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=item["content"][0]["text"]))
            events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
            return events
        item["status"] = "incomplete" if self._incomplete else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=part["text"], logprobs=[]))
            events.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                      content_index=0, part=_copy(part)))
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))
        events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        return events

    def finish(self, usage: pb.Usage | None) -> list[dict[str, Any]]:
        """The closing events: the open item's .done events, then response.completed or .incomplete."""
        events = self._close()
        self.status = "incomplete" if self._incomplete else "completed"
        kind = "response.incomplete" if self._incomplete else "response.completed"
        self.final = self.response(usage)
        return [*events, self._event(kind, response=self.final)]

    def fail(self, error: ApiError) -> list[dict[str, Any]]:
        self._close()
        self.status = "failed"
        self.error = {"code": "server_error" if error.status >= 500 else "invalid_prompt", "message": error.message}
        self.final = self.response(None)
        return [self._event("response.failed", response=self.final)]

    # -- the object

    def response(self, usage: pb.Usage | None) -> dict[str, Any]:
        req = self._req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": req.model,
            "output": [_copy(item) for item in self.output],
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "service_tier": "default",
            "store": req.store is not False,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": _echo_tools(req.tools),
            "top_logprobs": 0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": req.truncation or "disabled",
            "metadata": req.metadata or {},
        }
        if req.user is not None:
            body["user"] = req.user
        if usage is not None or self.status in ("completed", "incomplete"):
            prompt = usage.prompt_tokens if usage is not None else 0
            output = usage.completion_tokens if usage is not None else self._tokens
            body["usage"] = {
                "input_tokens": prompt,
                "input_tokens_details": {
                    "cached_tokens": usage.cached_tokens if usage is not None else 0,
                    # What the prefix cache took in: every prompt token it did not already hold.
                    "cache_write_tokens": prompt - (usage.cached_tokens if usage is not None else 0),
                },
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens if usage is not None else 0},
                "total_tokens": prompt + output,
            }
        return body

    def output_messages(self) -> list[dict[str, Any]]:
        """The output as chat messages, for the conversation a later previous_response_id continues."""
        messages = items_to_messages([
            {**item, "content": [{"text": p["text"]} for p in item.get("content", [])]} if item["type"] == "message" else item
            for item in self.output
        ])
        reasoning = "".join(item["content"][0]["text"] for item in self.output if item["type"] == "reasoning")
        if reasoning and messages:  # the thinking goes with the turn, for templates that render it
            messages[0]["reasoning_content"] = reasoning
        elif reasoning:
            messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning})
        return messages


def _echo_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The function tools as the response object lists them (every field OpenAI's schema requires)."""
    out = []
    for tool in tools or []:
        t = _FunctionTool.model_validate(tool)
        out.append({"type": "function", "name": t.name, "description": t.description,
                    "parameters": t.parameters or {"type": "object", "properties": {}},
                    # The arguments always follow the schema here (constrained decoding), as strict mode promises.
                    "strict": True if t.strict is None else t.strict})
    return out


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


class ResponseStreamEncoder:
    """The builder's events as server-sent events (`event: <type>` and `data: <json>`), for routes._stream."""

    include_usage = True

    def __init__(self, builder: ResponseBuilder) -> None:
        self.builder = builder

    def start(self, n: int) -> list[dict[str, Any]]:
        return self.builder.start()

    def encode(self, message: pb.GenerateResponse, offset: int = 0) -> list[dict[str, Any]]:
        return self.builder.add(message, offset)

    def frame(self, events: list[dict[str, Any]]) -> bytes:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events).encode()

    def end(self, usage: pb.Usage | None) -> bytes:
        return self.frame(self.builder.finish(usage))

    def failed(self, error: ApiError) -> bytes:
        return self.frame(self.builder.fail(error))
