"""Conversion between the public protobuf messages (generate.v1) and the service's domain types: the servicer's
edge, the only place besides it that knows the wire format."""

from __future__ import annotations

from types import MappingProxyType

from generate.v1 import generate_pb2 as pb

from service.domain import (
    ChatInput,
    Constraint,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    Input,
    Message,
    ModelInfo,
    SamplingParams,
    TextInput,
    TokenInput,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
)
from service.errors import InvalidArgument

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}

_TOOL_CHOICE_MODES = {
    pb.ToolChoice.MODE_UNSPECIFIED: "auto",
    pb.ToolChoice.MODE_NONE: "none",
    pb.ToolChoice.MODE_AUTO: "auto",
    pb.ToolChoice.MODE_REQUIRED: "required",
}


def tool_choice_from_proto(choice: pb.ToolChoice) -> ToolChoice:
    kind = choice.WhichOneof("kind")
    if kind == "function":
        return ToolChoice("function", choice.function)
    if kind == "mode":
        if choice.mode not in _TOOL_CHOICE_MODES:
            raise InvalidArgument("input.chat.tool_choice", f"unknown tool_choice mode {choice.mode}")
        return ToolChoice(_TOOL_CHOICE_MODES[choice.mode])
    return ToolChoice()


def input_from_proto(message: pb.Input) -> Input:
    kind = message.WhichOneof("kind")
    if kind == "chat":
        chat = message.chat
        return ChatInput(
            messages=tuple(
                Message(
                    role=m.role,
                    content="\n".join(part.text for part in m.content if part.WhichOneof("kind") == "text"),
                    name=m.name or None,
                    tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                    tool_call_id=m.tool_call_id or None,
                    reasoning_content=m.reasoning_content or None,
                )
                for m in chat.messages
            ),
            add_generation_prompt=chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True,
            continue_final_message=chat.continue_final_message,
            tools=tuple(Tool(t.name, t.description, t.parameters) for t in chat.tools),
            tool_choice=tool_choice_from_proto(chat.tool_choice),
            parallel_tool_calls=chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True,
            template_kwargs=chat.chat_template_kwargs,
        )
    if kind == "text":
        return TextInput(message.text)
    if kind == "token_ids":
        return TokenInput(tuple(message.token_ids.ids))
    raise InvalidArgument("input", "input must hold chat messages, a text prompt or token ids")


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    def opt(name: str):
        return getattr(s, name) if s.HasField(name) else None

    return SamplingParams(
        max_tokens=opt("max_tokens"),
        min_tokens=s.min_tokens,
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        repetition_penalty=opt("repetition_penalty"),
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        seed=opt("seed"),
        logit_bias=MappingProxyType(dict(s.logit_bias)),
        skip_special_tokens=s.skip_special_tokens if s.HasField("skip_special_tokens") else True,
        max_reasoning_tokens=opt("max_reasoning_tokens"),
    )


def constraint_from_proto(c: pb.Constraint) -> Constraint | None:
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    return Constraint(kind, "" if kind == "json_object" else getattr(c, kind))


def request_from_proto(message: pb.GenerateRequest, request_id: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        input=input_from_proto(message.input),
        sampling=sampling_from_proto(message.sampling),
        n=message.n or 1,
        top_logprobs=message.logprobs.top_logprobs if message.HasField("logprobs") else None,
        constraint=constraint_from_proto(message.constraint) if message.HasField("constraint") else None,
    )


def _logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        token_bytes=lp.token_bytes,
        top_logprobs=[
            pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob, token_bytes=t.token_bytes)
            for t in lp.top
        ],
    )


def output_to_proto(output: GenerateOutput) -> pb.GenerateResponse:
    response = pb.GenerateResponse()
    for c in output.choices:
        delta = response.choices.add(index=c.index, text=c.text, token_ids=c.token_ids, reasoning=c.reasoning)
        for call in c.tool_calls:
            delta.tool_calls.add(index=call.index, id=call.id or "", name=call.name or "", arguments=call.arguments)
        if c.logprobs:
            delta.logprobs.extend(_logprob_to_proto(lp) for lp in c.logprobs)
        if c.finish_reason is not None:
            delta.finish_reason = _FINISH_REASONS[c.finish_reason]
            if c.stop_string is not None:
                delta.stop_string = c.stop_string
            elif c.stop_token_id is not None:
                delta.stop_token_id = c.stop_token_id
    if output.usage is not None:
        u = output.usage
        response.usage.CopyFrom(
            pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
                     reasoning_tokens=u.reasoning_tokens)
        )
    return response


def model_info_to_proto(info: ModelInfo) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model=info.name,
        engine=info.engine,
        context_length=info.context_length,
        max_output_tokens=info.max_output_tokens,
        vocab_size=info.vocab_size,
        created=info.created,
    )
