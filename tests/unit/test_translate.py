"""OpenAI bodies → GenerateRequest, and GenerateResponse → OpenAI chunks and responses."""

import json
import math

import pytest

from pydantic import ValidationError

from gateway.errors import BadRequest
from gateway.protocol import ChatCompletionRequest
from gateway.routes import _validation_error
from gateway.translate import ChatAccumulator, ChatChunkEncoder, chat_to_proto
from generate.v1 import generate_pb2 as pb


def body(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_text_parts_and_developer_role():
    request = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    })
    chat = chat_to_proto(request, "rid").request.input.chat
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert [p.text for p in chat.messages[1].content] == ["a", "b"]


def refusal(raw: dict) -> BadRequest:
    """The 400 the gateway answers for a body its request models refuse."""
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(raw)
    return _validation_error(caught.value, raw)


def test_image_parts_are_refused_naming_the_part():
    error = refusal({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    })
    assert error.param == "messages[0].content[0]" and "text only" in error.message


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters", "dictionary"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name", "Missing"),
        ({"tool_choice": "sometimes"}, "tool_choice", "'required'"),
        ({"response_format": {"type": "yaml"}}, "response_format", "does not match"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name", "Missing"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"reasoning_effort": "maximal"}, "reasoning_effort", "Input should be"),
        ({"audio": {"voice": "x"}}, "audio", "text only"),
        ({"modalities": ["text", "audio"]}, "modalities[1]", "text only"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "tool messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing"),
        ({"messages": [{"role": "assistant", "tool_calls": []}]}, "messages[0].content", "Missing"),
    ],
)
def test_unsupported_fields_are_refused_by_the_request_models(fields, param, words):
    error = refusal({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
    assert error.param == param and words in error.message, error.message


def test_unset_sampling_fields_stay_unset_and_zero_is_kept():
    s = chat_to_proto(body(), "rid").request.sampling
    assert not s.HasField("temperature") and not s.HasField("max_tokens") and not s.HasField("seed")
    s = chat_to_proto(body(temperature=0, top_p=0.5, seed=0), "rid").request.sampling
    assert s.HasField("temperature") and s.temperature == 0.0 and s.top_p == 0.5 and s.HasField("seed")


def test_max_completion_tokens_wins_and_errors_name_it():
    translated = chat_to_proto(body(max_tokens=5, max_completion_tokens=9), "rid")
    assert translated.request.sampling.max_tokens == 9
    assert translated.param_alias == {"max_tokens": "max_completion_tokens"}
    with pytest.raises(BadRequest) as caught:
        chat_to_proto(body(max_completion_tokens=-1), "rid")
    assert caught.value.param == "max_completion_tokens"


def test_stop_logit_bias_seed_and_extras():
    s = chat_to_proto(body(stop="END", logit_bias={"42": -100}, seed=-1, top_k=5, min_p=0.1,
                           repetition_penalty=1.1, stop_token_ids=[7], ignore_eos=True, min_tokens=3), "rid").request.sampling
    assert list(s.stop) == ["END"] and dict(s.logit_bias) == {42: -100.0}
    assert s.seed == 2**64 - 1 and s.top_k == 5 and list(s.stop_token_ids) == [7] and s.ignore_eos and s.min_tokens == 3
    assert math.isclose(s.min_p, 0.1, rel_tol=1e-6)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": -1}, "n"),
        ({"n": 0}, "n"),  # OpenAI: at least 1, not "unset"
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
def test_refusals_name_the_field(fields, param):
    with pytest.raises(BadRequest) as caught:
        chat_to_proto(body(**fields), "rid")
    assert caught.value.param == param
    if param.startswith("max_"):
        assert "at least 1" in caught.value.message  # the same bound as the service's, whatever the value


def test_logprobs_request():
    request = chat_to_proto(body(logprobs=True, top_logprobs=3), "rid").request
    assert request.HasField("logprobs") and request.logprobs.top_logprobs == 3
    assert not chat_to_proto(body(), "rid").request.HasField("logprobs")


def response(*choices, usage=None):
    message = pb.GenerateResponse(choices=list(choices))
    if usage:
        message.usage.CopyFrom(usage)
    return message


def test_chunk_encoder_shapes():
    encoder = ChatChunkEncoder("chatcmpl-1", 123, "m", include_usage=True)
    start = [json.loads(c) for c in encoder.start(2)]
    assert [c["choices"][0]["delta"] for c in start] == [{"role": "assistant", "content": ""}] * 2
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in start)
    chunks = [json.loads(c) for c in encoder.encode(response(
        pb.ChoiceDelta(index=1, text="Hé", token_ids=[1]),
        pb.ChoiceDelta(index=0, text="x", finish_reason=pb.FINISH_REASON_LENGTH),
    ))]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        (1, {"content": "Hé"}, None), (0, {"content": "x"}, None), (0, {}, "length"),
    ]
    final = json.loads(encoder.usage(pb.Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2)))
    assert final["choices"] == [] and final["id"] == "chatcmpl-1"
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                              "prompt_tokens_details": {"cached_tokens": 2},
                              "completion_tokens_details": {"reasoning_tokens": 0}}


def test_chunk_without_include_usage_has_no_usage_key():
    chunk = json.loads(ChatChunkEncoder("c", 1, "m", include_usage=False).start(1)[0])
    assert "usage" not in chunk


def test_accumulator_builds_a_completion_with_logprobs():
    accumulator = ChatAccumulator(1, logprobs=True)
    lp = pb.TokenLogprob(token_id=5, token="A", logprob=-0.5, token_bytes=b"A",
                         top_logprobs=[pb.TopLogprob(token_id=5, token="A", logprob=-0.5, token_bytes=b"A")])
    accumulator.add(response(pb.ChoiceDelta(index=0, text="A", token_ids=[5], logprobs=[lp])))
    accumulator.add(response(pb.ChoiceDelta(index=0, finish_reason=pb.FINISH_REASON_STOP)))
    result = accumulator.response("c", 1, "m", pb.Usage(prompt_tokens=2, completion_tokens=2))
    choice = result["choices"][0]
    assert choice["message"]["content"] == "A" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["content"] == [{"token": "A", "logprob": -0.5, "bytes": [65],
                                              "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}]}]
    assert result["usage"]["total_tokens"] == 4


# ---------------------------------------------------------------------------------------------- structured output, tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_response_format_and_grammar_extras_become_one_constraint():
    assert not chat_to_proto(body(), "rid").request.HasField("constraint")
    assert not chat_to_proto(body(response_format={"type": "text"}), "rid").request.HasField("constraint")
    c = chat_to_proto(body(response_format={"type": "json_object"}), "rid").request.constraint
    assert c.WhichOneof("kind") == "json_object"
    schema = {"type": "object", "properties": {"é": {"type": "integer"}}}
    c = chat_to_proto(body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}), "rid").request.constraint
    assert json.loads(c.json_schema) == schema
    assert chat_to_proto(body(regex="[0-9]+"), "rid").request.constraint.regex == "[0-9]+"
    assert chat_to_proto(body(ebnf='root ::= "a"'), "rid").request.constraint.ebnf == 'root ::= "a"'
    with pytest.raises(BadRequest) as caught:
        chat_to_proto(body(response_format={"type": "json_object"}, regex="a"), "rid")
    assert caught.value.param == "regex"


def test_tools_tool_choice_and_tool_messages_become_proto():
    request = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [WEATHER, {"type": "function", "function": {"name": "noop"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    })
    chat = chat_to_proto(request, "rid").request.input.chat
    assert [(t.name, t.description) for t in chat.tools] == [("get_weather", "The weather in a city"), ("noop", "")]
    assert json.loads(chat.tools[0].parameters) == WEATHER["function"]["parameters"] and chat.tools[1].parameters == ""
    assert chat.tool_choice.function == "get_weather" and chat.HasField("parallel_tool_calls") and not chat.parallel_tool_calls
    assistant, tool = chat.messages[1], chat.messages[2]
    assert list(assistant.content) == [] and assistant.tool_calls[0] == pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.content[0].text == "sunny"
    for mode, value in (("none", pb.ToolChoice.MODE_NONE), ("auto", pb.ToolChoice.MODE_AUTO), ("required", pb.ToolChoice.MODE_REQUIRED)):
        assert chat_to_proto(body(tools=[WEATHER], tool_choice=mode), "rid").request.input.chat.tool_choice.mode == value
    assert not chat_to_proto(body(tools=[WEATHER]), "rid").request.input.chat.HasField("tool_choice")


def call_delta(index, id="", name="", arguments=""):
    return pb.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


def test_tool_call_chunks_stream_as_openai_streams_them():
    encoder = ChatChunkEncoder("c", 1, "m", include_usage=False)
    chunks = [json.loads(c) for c in encoder.encode(response(
        pb.ChoiceDelta(index=0, tool_calls=[call_delta(0, "call_a", "get_weather"), call_delta(0, arguments='{"ci')]),
    )) + encoder.encode(response(
        pb.ChoiceDelta(index=0, tool_calls=[call_delta(0, arguments='ty": "Oslo"}')], finish_reason=pb.FINISH_REASON_TOOL_CALLS),
    ))]
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        # One entry per index in a chunk: the head and the first fragment of the arguments together.
        ({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"ci'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}, None),
        ({}, "tool_calls"),
    ]


def test_accumulator_answers_tool_calls_with_null_content():
    accumulator = ChatAccumulator(2, logprobs=False)
    accumulator.add(response(
        pb.ChoiceDelta(index=0, tool_calls=[call_delta(0, "call_a", "f"), call_delta(0, arguments="{}"),
                                            call_delta(1, "call_b", "g"), call_delta(1, arguments='{"x": 1}')],
                       finish_reason=pb.FINISH_REASON_TOOL_CALLS),
        pb.ChoiceDelta(index=1, text="plain", finish_reason=pb.FINISH_REASON_STOP),
    ))
    first, second = accumulator.response("c", 1, "m", None)["choices"]
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
    assert first["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    assert second["message"] == {"role": "assistant", "content": "plain", "refusal": None}


def test_chat_responses_carry_what_openais_schema_requires():
    """choices[].logprobs needs `refusal` beside `content`; system_fingerprint is a string or absent, never null."""
    accumulator = ChatAccumulator(1, logprobs=True)
    lp = pb.TokenLogprob(token="a", logprob=-0.5)
    accumulator.add(response(pb.ChoiceDelta(index=0, text="a", logprobs=[lp], finish_reason=pb.FINISH_REASON_STOP)))
    whole = accumulator.response("c", 1, "m", None)
    assert "system_fingerprint" not in whole
    assert whole["choices"][0]["logprobs"]["refusal"] is None and whole["choices"][0]["logprobs"]["content"]
    encoder = ChatChunkEncoder("c", 1, "m", include_usage=False)
    (chunk,) = [json.loads(c) for c in encoder.encode(response(pb.ChoiceDelta(index=0, text="a", logprobs=[lp])))]
    assert "system_fingerprint" not in chunk and chunk["choices"][0]["logprobs"]["refusal"] is None


def test_reasoning_effort_none_and_template_kwargs_reach_the_chat_template():
    def chat(**fields):
        req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
        return chat_to_proto(req, "r").request.input.chat

    assert chat().chat_template_kwargs == ""
    assert json.loads(chat(reasoning_effort="none").chat_template_kwargs) == {"enable_thinking": False}
    assert chat(reasoning_effort="high").chat_template_kwargs == ""
    both = chat(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True, "x": [1]})
    assert json.loads(both.chat_template_kwargs) == {"enable_thinking": True, "x": [1]}  # the explicit variable wins
    history = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "4", "reasoning_content": "2+2"},
        {"role": "user", "content": "and?"}]})
    assert chat_to_proto(history, "r").request.input.chat.messages[1].reasoning_content == "2+2"


def test_reasoning_streams_and_returns_apart_from_the_content():
    deltas = [pb.ChoiceDelta(index=0, reasoning="Let me think.", token_ids=[1, 2]),
              pb.ChoiceDelta(index=0, text="4", token_ids=[3], finish_reason=pb.FINISH_REASON_STOP)]
    usage = pb.Usage(prompt_tokens=5, completion_tokens=3, reasoning_tokens=2)
    encoder = ChatChunkEncoder("c", 1, "m", include_usage=True)
    chunks = [json.loads(p) for d in deltas for p in encoder.encode(pb.GenerateResponse(choices=[d]))]
    assert chunks[0]["choices"][0]["delta"] == {"reasoning_content": "Let me think.", "reasoning": "Let me think."}
    assert chunks[1]["choices"][0]["delta"] == {"content": "4"}
    assert json.loads(encoder.usage(usage))["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    accumulator = ChatAccumulator(1, logprobs=False)
    for d in deltas:
        accumulator.add(pb.GenerateResponse(choices=[d]))
    message = accumulator.response("c", 1, "m", usage)["choices"][0]["message"]
    assert message["content"] == "4" and message["reasoning_content"] == message["reasoning"] == "Let me think."
