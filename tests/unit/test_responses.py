"""The Responses API's pure parts (gateway/responses.py): requests read into chat requests, and the response object
and stream events built from GenerateResponse messages, checked against OpenAI's own published schemas."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest, Upstream
from gateway.responses import CreateResponse, ResponseBuilder, ResponseStreamEncoder, input_items, items_to_messages, to_chat
from generate.v1 import generate_pb2 as pb
from tests.helpers.openai_schema import assert_valid


def request(**fields) -> CreateResponse:
    return CreateResponse.model_validate({"model": "m", "input": "Hi", **fields})


def text(t: str, finish: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(choices=[pb.ChoiceDelta(index=0, text=t, token_ids=[1] * len(t), finish_reason=finish)])


def call(call_id: str | None, name: str, arguments: str, finish: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(choices=[pb.ChoiceDelta(
        index=0, token_ids=[1], finish_reason=finish,
        tool_calls=[pb.ToolCallDelta(index=0, id=call_id or "", name=name if call_id else "", arguments=arguments)])])


USAGE = pb.Usage(prompt_tokens=12, completion_tokens=7, cached_tokens=4)


def build(req: CreateResponse, messages: list[pb.GenerateResponse], usage=USAGE) -> tuple[dict, list[dict]]:
    builder = ResponseBuilder("resp_1", req)
    events = builder.start()
    for m in messages:
        events += builder.add(m)
    events += builder.finish(usage)
    return builder.final, events


@pytest.mark.parametrize(
    "messages, status",
    [
        ([text("Hello"), text(" there", pb.FINISH_REASON_STOP)], "completed"),
        ([text("Cut sho", pb.FINISH_REASON_LENGTH)], "incomplete"),
        ([call("call_1", "get_weather", '{"city": '), call(None, "", '"Paris"}', pb.FINISH_REASON_TOOL_CALLS)], "completed"),
        ([text("Let me check."), call("call_1", "f", "{}"), call("call_2", "g", '{"a": 1}', pb.FINISH_REASON_TOOL_CALLS)],
         "completed"),
    ],
)
def test_responses_and_their_events_follow_openais_schemas(messages, status):
    req = request(instructions="Be brief.", tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
                  metadata={"k": "v"}, max_output_tokens=50)
    final, events = build(req, messages)
    assert_valid(final, "Response")
    assert final["status"] == status
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 4, "cache_write_tokens": 8}
    for event in events:
        assert_valid(event, "ResponseStreamEvent")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"] == final
    # Every item is added, then done, and the done items are the final output.
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == list(range(len(final["output"])))


def test_text_and_tool_call_deltas_add_up_to_the_items():
    final, events = build(request(), [text("Let me check."), call("call_1", "f", '{"a"'), call(None, "", ": 1}")])
    message, function_call = final["output"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == message["content"][0]["text"]
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == function_call["arguments"] == '{"a": 1}' and function_call["call_id"] == "call_1"


def test_a_failure_mid_stream_is_a_failed_response():
    builder = ResponseBuilder("resp_1", request())
    encoder = ResponseStreamEncoder(builder)
    encoder.start(1)
    encoder.encode(text("Hel"))
    framed = encoder.failed(Upstream(500, "the generation service failed", code="internal_error")).decode()
    assert framed.startswith("event: response.failed\ndata: ")
    assert builder.final["status"] == "failed" and builder.final["error"]["message"] == "the generation service failed"
    assert_valid(builder.final, "Response")


def test_input_items_become_the_chat_they_mean():
    req = request(
        instructions="You are terse.",
        input=[
            {"role": "developer", "content": "Use metric units."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                            {"type": "input_text", "text": "Paris?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
    )
    items = input_items(req)
    assert [i["type"] for i in items] == ["message", "message", "function_call", "function_call", "function_call_output",
                                          "function_call_output"]
    assert all(i["id"] for i in items)
    body = to_chat(req, items, history=[{"role": "user", "content": "Earlier"}, {"role": "assistant", "content": "Yes"}])
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "system", "user", "assistant", "tool", "tool"]
    assert body["messages"][4]["content"] == "Weather in Paris?"
    assert [c["id"] for c in body["messages"][5]["tool_calls"]] == ["c1", "c2"]
    assert body["messages"][7] == {"role": "tool", "tool_call_id": "c2", "content": "noon"}


def test_tools_tool_choice_and_text_format_map_to_chat():
    req = request(
        tools=[{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False, max_output_tokens=9,
        text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}},
    )
    body = to_chat(req, input_items(req), [])
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                               "description": "d", "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False and body["max_tokens"] == 9
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                              "strict": True}}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": ["not an item"]}, "input[0]"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"input": []}, "input"),
    ],
)
def test_what_cannot_be_honoured_names_its_field(fields, param):
    req = request(**fields)
    with pytest.raises(BadRequest) as refused:
        to_chat(req, input_items(req), [])
    assert refused.value.param == param


def test_the_output_continues_as_chat_messages():
    builder = ResponseBuilder("resp_1", request())
    builder.add(text("Checking."))
    builder.add(call("call_9", "f", "{}", pb.FINISH_REASON_TOOL_CALLS))
    builder.finish(USAGE)
    assert builder.output_messages() == [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert items_to_messages([]) == []


def test_reasoning_is_an_output_item_of_its_own():
    thinking = pb.GenerateResponse(choices=[pb.ChoiceDelta(index=0, reasoning="Two and two.", token_ids=[1, 2])])
    final, events = build(request(), [thinking, text("Four.", pb.FINISH_REASON_STOP)],
                          usage=pb.Usage(prompt_tokens=5, completion_tokens=4, reasoning_tokens=2))
    assert_valid(final, "Response")
    for event in events:
        assert_valid(event, "ResponseStreamEvent")
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "Two and two."
    assert message["content"][0]["text"] == "Four."
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    assert "response.reasoning_text.delta" in [e["type"] for e in events]


def test_reasoning_effort_reaches_the_chat_request():
    req = request(reasoning={"effort": "none", "summary": None})
    assert to_chat(req, input_items(req), [])["reasoning_effort"] == "none"
    bad = request(reasoning={"effort": "extreme"})
    with pytest.raises(BadRequest) as refused:
        to_chat(bad, input_items(bad), [])
    assert refused.value.param == "reasoning.effort"


def test_the_reasoning_effort_is_echoed_within_openais_schema():
    final, _ = build(request(reasoning={"effort": "none"}), [text("Hi", pb.FINISH_REASON_STOP)])
    assert final["reasoning"]["effort"] == "none"
    assert_valid(final, "Response")
