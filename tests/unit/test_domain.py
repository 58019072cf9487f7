"""Validation, default resolution and protobuf conversion of the service's domain types."""

import pytest

from generate.v1 import generate_pb2 as pb
from service import domain, wire
from service.domain import (
    ChatInput, ChoiceDelta, Constraint, FinishReason, GenerateOutput, GenerateRequest, Message, ModelInfo,
    SamplingDefaults, SamplingParams, TextInput, Tool, ToolCall, ToolChoice, Usage,
)
from service.errors import InvalidArgument

INFO = ModelInfo(name="m", engine="test", context_length=100, max_output_tokens=50, vocab_size=1000, created=0)


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (SamplingParams(temperature=2.5), "sampling.temperature"),
        (SamplingParams(top_p=0), "sampling.top_p"),
        (SamplingParams(top_k=-2), "sampling.top_k"),
        (SamplingParams(min_p=1.5), "sampling.min_p"),
        (SamplingParams(frequency_penalty=3), "sampling.frequency_penalty"),
        (SamplingParams(repetition_penalty=0), "sampling.repetition_penalty"),
        (SamplingParams(stop=("",)), "sampling.stop"),
        (SamplingParams(stop_token_ids=(1000,)), "sampling.stop_token_ids"),
        (SamplingParams(logit_bias={5: 101.0}), "sampling.logit_bias"),
        (SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (SamplingParams(max_tokens=3, min_tokens=4), "sampling.min_tokens"),
    ],
)
def test_sampling_ranges(params, field):
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_sampling(params, vocab_size=1000)
    assert caught.value.field == field


def test_request_checks():
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_request(domain.GenerateRequest("r", ChatInput(()), n=1), INFO)
    assert caught.value.field == "input.chat.messages"
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_request(domain.GenerateRequest("r", domain.TextInput("x"), n=17), INFO)
    assert caught.value.field == "n"


def test_resolve_fits_the_context_window():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    resolved = domain.resolve(SamplingParams(), defaults, prompt_tokens=80, info=INFO)
    assert resolved.max_tokens == 20 and resolved.temperature == 0.7 and resolved.top_k == 20
    assert domain.resolve(SamplingParams(temperature=0.0, top_k=-1), defaults, 10, INFO).temperature == 0.0
    with pytest.raises(InvalidArgument) as caught:
        domain.resolve(SamplingParams(max_tokens=30), defaults, prompt_tokens=80, info=INFO)
    assert caught.value.field == "sampling.max_tokens" and "20" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        domain.resolve(SamplingParams(), defaults, prompt_tokens=100, info=INFO)
    assert caught.value.field == "input"


def test_request_from_proto_keeps_unset_apart_from_zero():
    message = pb.GenerateRequest(input=pb.Input(text="hi"), sampling=pb.SamplingParams(temperature=0.0))
    request = wire.request_from_proto(message, "rid")
    assert request.sampling.temperature == 0.0 and request.sampling.top_p is None
    assert request.n == 1 and request.top_logprobs is None and request.sampling.skip_special_tokens
    chat = pb.Input(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="a"), pb.ContentPart(text="b")])]))
    parsed = wire.input_from_proto(chat)
    assert parsed.messages[0].content == "a\nb" and parsed.add_generation_prompt


def test_output_to_proto():
    output = GenerateOutput(
        [ChoiceDelta(index=1, text="x", token_ids=[3], finish_reason=FinishReason.STOP, stop_string="END")],
        Usage(prompt_tokens=4, completion_tokens=2, cached_tokens=1),
    )
    message = wire.output_to_proto(output)
    assert message.choices[0].stop_string == "END" and message.choices[0].finish_reason == pb.FINISH_REASON_STOP
    assert message.usage.cached_tokens == 1


def test_choice_delta_merge():
    a = ChoiceDelta(index=0, text="a", token_ids=[1])
    a.merge(ChoiceDelta(index=0, text="b", token_ids=[2], finish_reason=FinishReason.LENGTH))
    assert (a.text, a.token_ids, a.finish_reason) == ("ab", [1, 2], FinishReason.LENGTH)


# ---------------------------------------------------------------------------------------------- structured output, tools

WEATHER = Tool("get_weather", "weather", '{"type": "object", "properties": {"city": {"type": "string"}}}')


def chat(*messages, **fields) -> ChatInput:
    return ChatInput(messages or (Message("user", "hi"),), **fields)


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", "{not json")), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", "[1, 2]")), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("regex", "")), "constraint.regex"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("ebnf", "x" * 300_000)), "constraint.ebnf"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_object"), sampling=SamplingParams(ignore_eos=True)),
         "sampling.ignore_eos"),
        (GenerateRequest("r", chat(tools=(WEATHER, Tool("bad name!")))), "input.chat.tools[1].name"),
        (GenerateRequest("r", chat(tools=(WEATHER, WEATHER))), "input.chat.tools[1].name"),
        (GenerateRequest("r", chat(tools=(Tool("a"), Tool("b", parameters='{"type": ')))), "input.chat.tools[1].parameters"),
        (GenerateRequest("r", chat(tools=(Tool("a", parameters="true"),))), "input.chat.tools[0].parameters"),
        (GenerateRequest("r", chat(tool_choice=ToolChoice("required"))), "input.chat.tool_choice"),
        (GenerateRequest("r", chat(tools=(WEATHER,), tool_choice=ToolChoice("function", "get_time"))), "input.chat.tool_choice"),
        (GenerateRequest("r", chat(tools=(WEATHER,), tool_choice=ToolChoice("required")), constraint=Constraint("json_object")),
         "constraint.json_object"),
        (GenerateRequest("r", chat(Message("tool", "sunny"))), "input.chat.messages[0].tool_call_id"),
        (GenerateRequest("r", chat(Message("user", "x", tool_calls=(ToolCall("c", "f", "{}"),)))), "input.chat.messages[0].tool_calls"),
        (GenerateRequest("r", chat(Message("user", "x"), Message("assistant", "", tool_calls=(ToolCall("c", "f", "{x"),)))),
         "input.chat.messages[1].tool_calls[0].arguments"),
    ],
)
def test_structured_output_and_tools_are_checked_naming_the_field(request_, field):
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_request(request_, INFO)
    assert caught.value.field == field, caught.value.message


def test_valid_tool_requests_pass_and_none_offers_no_tools():
    history = chat(
        Message("user", "weather in Oslo?"),
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
        Message("tool", "sunny", tool_call_id="call_1"),
        tools=(WEATHER,), tool_choice=ToolChoice("function", "get_weather"),
    )
    domain.validate_request(GenerateRequest("r", history), INFO)
    assert GenerateRequest("r", history).tools == (WEATHER,)
    assert GenerateRequest("r", chat(tools=(WEATHER,), tool_choice=ToolChoice("none"))).tools == ()
    assert GenerateRequest("r", TextInput("x")).tools == ()
    domain.validate_request(GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", "true")), INFO)


def test_constraint_tools_and_tool_calls_from_proto():
    message = pb.GenerateRequest(
        input=pb.Input(chat=pb.Chat(
            messages=[
                pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c1", name="f", arguments="{}")]),
                pb.ChatMessage(role="tool", tool_call_id="c1", content=[pb.ContentPart(text="ok")]),
            ],
            tools=[pb.Tool(name="f", description="d", parameters='{"type": "object"}')],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
            parallel_tool_calls=False,
        )),
        constraint=pb.Constraint(regex="[a-z]+"),
    )
    request = wire.request_from_proto(message, "rid")
    assert request.constraint == Constraint("regex", "[a-z]+")
    chat_input = request.input
    assert chat_input.tools == (Tool("f", "d", '{"type": "object"}'),) and chat_input.tool_choice == ToolChoice("required")
    assert not chat_input.parallel_tool_calls
    assert chat_input.messages[0].tool_calls == (ToolCall("c1", "f", "{}"),) and chat_input.messages[1].tool_call_id == "c1"
    default = wire.request_from_proto(pb.GenerateRequest(input=pb.Input(chat=pb.Chat(messages=[]))), "rid")
    assert default.constraint is None and default.input.tool_choice == ToolChoice("auto") and default.input.parallel_tool_calls
    json_object = pb.GenerateRequest(input=pb.Input(text="x"), constraint=pb.Constraint(json_object=pb.JsonObject()))
    assert wire.request_from_proto(json_object, "rid").constraint == Constraint("json_object", "")
    named = pb.Chat(tool_choice=pb.ToolChoice(function="f"))
    assert wire.input_from_proto(pb.Input(chat=named)).tool_choice == ToolChoice("function", "f")


def test_tool_call_deltas_to_proto_and_merge():
    from service.domain import ToolCallDelta

    a = ChoiceDelta(index=0, tool_calls=[ToolCallDelta(0, id="call_x", name="f"), ToolCallDelta(0, arguments='{"a"')])
    a.merge(ChoiceDelta(index=0, tool_calls=[ToolCallDelta(0, arguments=": 1}"), ToolCallDelta(1, id="call_y", name="g")],
                        finish_reason=FinishReason.TOOL_CALLS))
    assert [(t.index, t.id, t.arguments) for t in a.tool_calls] == [(0, "call_x", ""), (0, None, '{"a": 1}'), (1, "call_y", "")]
    message = wire.output_to_proto(GenerateOutput([a]))
    assert message.choices[0].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert message.choices[0].tool_calls[0] == pb.ToolCallDelta(index=0, id="call_x", name="f")
    assert message.choices[0].tool_calls[1].arguments == '{"a": 1}'


def test_a_prompt_far_beyond_the_context_window_is_refused_before_tokenizing():
    from service.domain import MAX_CHARS_PER_TOKEN, validate_request

    limit = INFO.context_length * MAX_CHARS_PER_TOKEN
    validate_request(GenerateRequest("r", TextInput("x" * limit)), INFO)  # might still fit: the tokenizer decides
    for prompt in (
        TextInput("x" * (limit + 1)),
        ChatInput((Message("system", "s" * limit), Message("user", "hi"))),
        ChatInput((Message("user", "hi"),), tools=(Tool("f", parameters='{"description": "' + "d" * limit + '"}'),)),
    ):
        with pytest.raises(InvalidArgument) as caught:
            validate_request(GenerateRequest("r", prompt), INFO)
        assert caught.value.field == "input" and "context window of 100 tokens" in str(caught.value)


def test_continuing_the_final_message_needs_an_assistant_message_and_no_new_turn():
    from service.domain import ChatInput, GenerateRequest, Message, ModelInfo, validate_request

    info = ModelInfo("m", "e", 2048, 512, 1000, 0)
    turns = (Message("user", "Hi"), Message("assistant", "Hello, I"))
    validate_request(GenerateRequest("r", ChatInput(turns, add_generation_prompt=False, continue_final_message=True)), info)
    for bad in (ChatInput(turns, continue_final_message=True),
                ChatInput(turns[:1], add_generation_prompt=False, continue_final_message=True)):
        with pytest.raises(InvalidArgument) as refused:
            validate_request(GenerateRequest("r", bad), info)
        assert refused.value.field == "input.chat.continue_final_message"
