"""Pure translation between OpenAI bodies and the gRPC API: request → GenerateRequest, GenerateResponse →
OpenAI chunks and responses. No I/O here.

Stream chunks are built from bytes prepared once per request (the id, created time and model never change),
so each token costs one small JSON encode of its delta.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from generate.v1 import generate_pb2 as pb

from gateway import sse
from gateway.errors import ApiError, BadRequest
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.routing import chat_routing_key, text_routing_key

UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
_TOOL_CHOICE_MODES = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO,
                      "required": pb.ToolChoice.MODE_REQUIRED}
_ROLES = {"developer": "system"}


@dataclass(frozen=True)
class Translated:
    # One gRPC call per prompt: a chat is one; a text completion may batch several prompts.
    requests: tuple[pb.GenerateRequest, ...]
    # Choices per prompt.
    n: int = 1
    # Service field name → the OpenAI parameter this client used for it, for error messages.
    param_alias: dict[str, str] = field(default_factory=dict)
    # What identifies the conversation for prefix-aware routing across replicas.
    routing_key: str | None = None

    @property
    def request(self) -> pb.GenerateRequest:
        return self.requests[0]


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _uint(value: int | None, param: str, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if not minimum <= value <= UINT32_MAX:
        raise BadRequest(f"{param} must be an integer of at least {minimum}", param=param)
    return value


def _finite(value: float | None, param: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise BadRequest(f"{param} must be a finite number", param=param)
    return value


def sampling_to_proto(req: SamplingFields, max_tokens: int | None, max_tokens_param: str) -> pb.SamplingParams:
    s = pb.SamplingParams()
    if (value := _uint(max_tokens, max_tokens_param, minimum=1)) is not None:
        s.max_tokens = value
    if (value := _uint(req.min_tokens, "min_tokens")) is not None:
        s.min_tokens = value
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        if (value := _finite(getattr(req, name), name)) is not None:
            setattr(s, name, value)
    if req.top_k is not None:
        if not -1 <= req.top_k <= INT32_MAX:
            raise BadRequest("top_k must be -1, 0 or a positive integer", param="top_k")
        s.top_k = req.top_k
    if req.stop:
        s.stop.extend(req.stop)
    if req.stop_token_ids:
        s.stop_token_ids.extend(_uint(t, "stop_token_ids") for t in req.stop_token_ids)
    if req.ignore_eos is not None:
        s.ignore_eos = req.ignore_eos
    if req.seed is not None:
        # OpenAI takes any 64-bit integer; the service takes its two's-complement bits.
        s.seed = req.seed % 2**64
    if req.logit_bias:
        for token, bias in req.logit_bias.items():
            try:
                token_id = int(token)
            except ValueError:
                raise BadRequest(f"logit_bias keys must be token ids, got {token!r}", param="logit_bias") from None
            s.logit_bias[_uint(token_id, "logit_bias")] = _finite(bias, "logit_bias")
    if req.skip_special_tokens is not None:
        s.skip_special_tokens = req.skip_special_tokens
    if (value := _uint(req.max_reasoning_tokens, "max_reasoning_tokens")) is not None:
        s.max_reasoning_tokens = value
    return s


def constraint_to_proto(req: SamplingFields, response_format=None) -> pb.Constraint | None:
    """The one grammar a request may ask for: response_format, or the regex / ebnf extras. (The service names
    a bad one by its kind, "constraint.regex", which gateway/errors.py maps back to the parameter.)"""
    asked: list[tuple[str, pb.Constraint]] = []
    if response_format is not None and response_format.type == "json_object":
        asked.append(("response_format", pb.Constraint(json_object=pb.JsonObject())))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_
        asked.append(("response_format", pb.Constraint(json_schema=_dumps(schema if schema is not None else {}))))
    if req.regex is not None:
        asked.append(("regex", pb.Constraint(regex=req.regex)))
    if req.ebnf is not None:
        asked.append(("ebnf", pb.Constraint(ebnf=req.ebnf)))
    if len(asked) > 1:
        raise BadRequest(f"{asked[1][0]} cannot be combined with {asked[0][0]}: ask for one format", param=asked[1][0])
    return asked[0][1] if asked else None


def _tools_to_proto(req: ChatCompletionRequest, chat: pb.Chat) -> None:
    for tool in req.tools or ():
        f = tool.function
        chat.tools.add(name=f.name, description=f.description or "",
                       parameters=_dumps(f.parameters) if f.parameters is not None else "")
    choice = req.tool_choice
    if isinstance(choice, str):
        chat.tool_choice.mode = _TOOL_CHOICE_MODES[choice]
    elif choice is not None:
        chat.tool_choice.function = choice.function.name
    if req.parallel_tool_calls is not None:
        chat.parallel_tool_calls = req.parallel_tool_calls


def chat_to_proto(req: ChatCompletionRequest, request_id: str) -> Translated:
    chat = pb.Chat()
    for i, m in enumerate(req.messages):
        message = chat.messages.add(role=_ROLES.get(m.role, m.role), name=m.name or "",
                                    tool_call_id=m.tool_call_id or "",
                                    reasoning_content=m.reasoning_content or m.reasoning or "")
        if isinstance(m.content, str):
            message.content.add(text=m.content)
        elif m.content is not None:
            message.content.extend(pb.ContentPart(text=part.text) for part in m.content)
        for call in m.tool_calls or ():
            message.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    _tools_to_proto(req, chat)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort == "none":
        template_kwargs.setdefault("enable_thinking", False)
    if template_kwargs:
        chat.chat_template_kwargs = json.dumps(template_kwargs, ensure_ascii=False)
    if req.continue_final_message:
        chat.continue_final_message = True
        # Continuing a message means opening no new turn, unless the caller insists (then the service says no).
        chat.add_generation_prompt = bool(req.add_generation_prompt)
    elif req.add_generation_prompt is not None:
        chat.add_generation_prompt = req.add_generation_prompt
    constraint = constraint_to_proto(req, req.response_format)
    alias = {}
    if req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        alias["max_tokens"] = "max_completion_tokens"
    else:
        max_tokens, max_param = req.max_tokens, "max_tokens"
    request = pb.GenerateRequest(
        request_id=request_id,
        model=req.model,
        input=pb.Input(chat=chat),
        sampling=sampling_to_proto(req, max_tokens, max_param),
        n=_uint(req.n, "n", minimum=1) or 0,
    )
    if req.top_logprobs is not None and not req.logprobs:
        raise BadRequest("logprobs must be true when top_logprobs is set", param="top_logprobs")
    if req.logprobs:
        request.logprobs.top_logprobs = _uint(req.top_logprobs, "top_logprobs") or 0
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    key = chat_routing_key((m.role, "".join(part.text for part in m.content)) for m in chat.messages)
    return Translated((request,), request.n or 1, alias, key)


def completion_to_proto(req: CompletionRequest, request_id: str) -> Translated:
    """One GenerateRequest per prompt: a string, a list of strings, a list of token ids, or a list of those."""
    prompts = _prompts(req.prompt)
    n = _uint(req.n, "n", minimum=1) or 1
    if req.best_of is not None and req.best_of != n:
        raise BadRequest("best_of is supported only equal to n; this server returns every choice it generates", param="best_of")
    if req.echo and req.logprobs is not None:
        raise BadRequest("echo with logprobs needs prompt log probabilities, which this server does not compute", param="echo")
    if req.echo and any(not isinstance(p, str) for p in prompts):
        raise BadRequest("echo is supported for text prompts only", param="echo")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise BadRequest("logprobs must be between 0 and 5", param="logprobs")
    sampling = sampling_to_proto(req, req.max_tokens, "max_tokens")
    constraint = constraint_to_proto(req)
    requests = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            input = pb.Input(text=prompt)
        else:
            input = pb.Input(token_ids=pb.TokenIds(ids=[_uint(t, "prompt") for t in prompt]))
        request = pb.GenerateRequest(
            request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
            model=req.model, input=input, sampling=sampling, n=n,
        )
        if req.logprobs is not None:
            request.logprobs.top_logprobs = req.logprobs
        if constraint is not None:
            request.constraint.CopyFrom(constraint)
        requests.append(request)
    first = prompts[0]
    return Translated(tuple(requests), n, routing_key=text_routing_key(first if isinstance(first, str) else str(first)))


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    for p in prompt:
        if not p:
            raise BadRequest("prompt must not hold an empty prompt", param="prompt")
    return list(prompt)


# ---------------------------------------------------------------------------------------------- responses


def logprob_entry(lp: pb.TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token_bytes),
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)} for t in lp.top_logprobs],
    }


def usage_dict(usage: pb.Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def add_usage(total: pb.Usage | None, usage: pb.Usage) -> pb.Usage:
    if total is None:
        return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens)
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.cached_tokens += usage.cached_tokens
    total.reasoning_tokens += usage.reasoning_tokens
    return total


class _ChunkEncoder:
    """The bytes of a stream chunk that never change within a call, prepared once."""

    object = ""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        # No system_fingerprint: OpenAI's schema wants a string or nothing, and no backend fingerprint exists here.
        head = {"id": completion_id, "object": self.object, "created": created, "model": model}
        self._head = _dumps(head)[:-1] + ',"choices":['
        self.include_usage = include_usage
        self._tail = '],"usage":null}' if include_usage else "]}"
        self._usage_head = self._head[: -len('"choices":[')] + '"choices":[],"usage":'

    def _chunk(self, choice: dict) -> str:
        return self._head + _dumps(choice) + self._tail

    def usage(self, usage: pb.Usage) -> str:
        return self._usage_head + _dumps(usage_dict(usage)) + "}"

    # The SSE framing of an OpenAI stream (the Anthropic encoder frames its own events).
    def frame(self, payloads: list[str]) -> bytes:
        return sse.events(payloads)

    def end(self, usage: pb.Usage | None) -> bytes:
        tail = [self.usage(usage)] if usage is not None and self.include_usage else []
        return sse.events(tail) + sse.DONE

    def failed(self, error: ApiError) -> bytes:
        return sse.error_event(error) + sse.DONE


class ChatChunkEncoder(_ChunkEncoder):
    """Turns GenerateResponse messages into `chat.completion.chunk` payloads."""

    object = "chat.completion.chunk"

    def start(self, n: int) -> list[str]:
        """The first chunk of every choice: the assistant role and empty content."""
        return [
            self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            for i in range(n)
        ]

    def encode(self, response: pb.GenerateResponse, offset: int = 0) -> list[str]:
        out = []
        for c in response.choices:
            index = offset + c.index
            if c.reasoning:
                # SGLang's and vLLM's field, and `reasoning`, vLLM's newer name for the same text.
                out.append(self._chunk({"index": index, "delta": {"reasoning_content": c.reasoning,
                                                                  "reasoning": c.reasoning},
                                        "logprobs": None, "finish_reason": None}))
            if c.logprobs:
                logprobs = {"content": [logprob_entry(lp) for lp in c.logprobs], "refusal": None}
                out.append(self._chunk({"index": index, "delta": {"content": c.text}, "logprobs": logprobs,
                                        "finish_reason": None}))
            elif c.text:
                # The common chunk, once per message: only the text needs encoding (json.dumps of one string).
                out.append(f'{self._head}{{"index":{index},"delta":{{"content":{_dumps(c.text)}}},'
                           f'"logprobs":null,"finish_reason":null}}{self._tail}')
            if c.tool_calls:
                # As OpenAI streams them: a call's first delta holds its id, type and name, later ones only
                # further fragments of its arguments.
                # One entry per call in a chunk: a message may hold a call's head and its first argument fragments as
                # separate deltas, and clients that read delta.tool_calls[0] would lose the second.
                by_index: dict[int, dict] = {}
                for t in c.tool_calls:
                    entry = by_index.get(t.index)
                    if entry is None:
                        entry = by_index[t.index] = (
                            {"index": t.index, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": ""}}
                            if t.id else {"index": t.index, "function": {"arguments": ""}}
                        )
                    entry["function"]["arguments"] += t.arguments
                calls = list(by_index.values())
                out.append(self._chunk({"index": index, "delta": {"tool_calls": calls}, "logprobs": None,
                                        "finish_reason": None}))
            if c.finish_reason:
                out.append(self._chunk({"index": index, "delta": {}, "logprobs": None,
                                        "finish_reason": FINISH_REASONS.get(c.finish_reason, "stop")}))
        return out


class ChatAccumulator:
    """Collects GenerateResponse messages into one `chat.completion` response."""

    def __init__(self, choices: int, logprobs: bool) -> None:
        self._text = [[] for _ in range(choices)]
        self._reasoning = [[] for _ in range(choices)]
        self._logprobs = [[] for _ in range(choices)] if logprobs else None
        self._finish: list[str | None] = [None] * choices
        self._calls: list[list[dict]] = [[] for _ in range(choices)]

    def add(self, response: pb.GenerateResponse, offset: int = 0) -> None:
        for c in response.choices:
            index = offset + c.index
            self._text[index].append(c.text)
            self._reasoning[index].append(c.reasoning)
            for t in c.tool_calls:
                calls = self._calls[index]
                if t.id:
                    calls.append({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": ""}})
                if calls:
                    calls[-1]["function"]["arguments"] += t.arguments
            if self._logprobs is not None:
                self._logprobs[index].extend(logprob_entry(lp) for lp in c.logprobs)
            if c.finish_reason:
                self._finish[index] = FINISH_REASONS.get(c.finish_reason, "stop")

    def response(self, completion_id: str, created: int, model: str, usage: pb.Usage | None) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": self._message(i, "".join(parts)),
                    "logprobs": {"content": self._logprobs[i], "refusal": None} if self._logprobs is not None else None,
                    "finish_reason": self._finish[i] or "stop",
                }
                for i, parts in enumerate(self._text)
            ],
            "usage": usage_dict(usage) if usage is not None else None,
        }

    def _message(self, i: int, text: str) -> dict:
        calls = self._calls[i]
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        reasoning = "".join(self._reasoning[i])
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            # As OpenAI answers a turn that only called tools: content null.
            message["content"] = text or None
            message["tool_calls"] = calls
        return message


class _TextLogprobs:
    """The legacy completions logprobs object of one choice: parallel lists plus character offsets."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, lp: pb.TokenLogprob, offset: int) -> None:
        self.tokens.append(lp.token)
        self.token_logprobs.append(lp.logprob)
        self.top_logprobs.append({t.token: t.logprob for t in lp.top_logprobs})
        self.text_offset.append(offset)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def _text_logprobs(c: pb.ChoiceDelta, text_offset: int) -> _TextLogprobs:
    logprobs = _TextLogprobs()
    for lp in c.logprobs:
        logprobs.add(lp, text_offset)
        text_offset += len(lp.token)
    return logprobs


class CompletionChunkEncoder(_ChunkEncoder):
    """Turns GenerateResponse messages into `text_completion` stream payloads."""

    object = "text_completion"

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool, choices: int,
                 logprobs: bool, echo: list[str] | None = None) -> None:
        super().__init__(completion_id, created, model, include_usage)
        self._logprobs = logprobs
        self._echo = echo
        # Characters emitted so far per choice, for logprobs' text_offset.
        self._offsets = [0] * choices

    def start(self, n: int) -> list[str]:
        """With echo, each choice's first chunk is its prompt."""
        if not self._echo:
            return []
        out = []
        for p, prompt in enumerate(self._echo):
            for i in range(n):
                self._offsets[p * n + i] = len(prompt)
                out.append(self._chunk({"index": p * n + i, "text": prompt, "logprobs": None, "finish_reason": None}))
        return out

    def encode(self, response: pb.GenerateResponse, offset: int = 0) -> list[str]:
        out = []
        for c in response.choices:
            index = offset + c.index
            logprobs = _text_logprobs(c, self._offsets[index]).as_dict() if self._logprobs else None
            self._offsets[index] += len(c.text)
            finish = FINISH_REASONS.get(c.finish_reason, "stop") if c.finish_reason else None
            out.append(self._chunk({"index": index, "text": c.text, "logprobs": logprobs, "finish_reason": finish}))
        return out


class CompletionAccumulator:
    """Collects GenerateResponse messages into one `text_completion` response."""

    def __init__(self, choices: int, logprobs: bool, echo: list[str] | None = None, n: int = 1) -> None:
        self._text = [[] for _ in range(choices)]
        if echo:
            for i in range(choices):
                self._text[i].append(echo[i // n])
        self._logprobs = [_TextLogprobs() for _ in range(choices)] if logprobs else None
        self._length = [len(parts[0]) if parts else 0 for parts in self._text]
        self._finish: list[str | None] = [None] * choices

    def add(self, response: pb.GenerateResponse, offset: int = 0) -> None:
        for c in response.choices:
            index = offset + c.index
            if self._logprobs is not None:
                position = self._length[index]
                for lp in c.logprobs:
                    self._logprobs[index].add(lp, position)
                    position += len(lp.token)
            self._text[index].append(c.text)
            self._length[index] += len(c.text)
            if c.finish_reason:
                self._finish[index] = FINISH_REASONS.get(c.finish_reason, "stop")

    def response(self, completion_id: str, created: int, model: str, usage: pb.Usage | None) -> dict:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": "".join(parts),
                    "logprobs": self._logprobs[i].as_dict() if self._logprobs is not None else None,
                    "finish_reason": self._finish[i] or "stop",
                }
                for i, parts in enumerate(self._text)
            ],
            "usage": usage_dict(usage) if usage is not None else None,
        }
