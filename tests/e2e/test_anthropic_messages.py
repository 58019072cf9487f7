"""Anthropic's Messages API through the real `anthropic` SDK, against the real stack: an app written for it works
by changing only its base URL and key."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # the current SDK no longer has a temperature argument; older clients send it


@pytest.fixture(scope="module")
def claude(stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key=stack.api_key, max_retries=0)


def test_text_non_streaming_and_streaming_agree(claude, model):
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = claude.messages.create(model=model, max_tokens=30, messages=messages, system="Be brief.",
                                   extra_body=GREEDY)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == model
    assert whole.id.startswith("msg_")
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text.strip()
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 30
    with claude.messages.stream(model=model, max_tokens=30, messages=messages, system="Be brief.",
                                extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_forced_tool_use_then_its_result(claude, model):
    reply = claude.messages.create(model=model, max_tokens=60, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert reply.stop_reason == "tool_use"
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])
    follow_up = claude.messages.create(
        model=model, max_tokens=30, tools=[WEATHER], extra_body=GREEDY,
        messages=[*ASK, {"role": "assistant", "content": reply.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                "content": "Sunny, 21 degrees."}]}],
    )
    assert follow_up.content and follow_up.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_a_streamed_tool_use_arrives_as_input_json_deltas(claude, model):
    with claude.messages.stream(model=model, max_tokens=60, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "input_json" in kinds or "content_block_delta" in kinds
    (call,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert final.stop_reason == "tool_use"


def test_stop_sequences_and_token_counting(claude, model):
    free = claude.messages.create(model=model, max_tokens=30, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "List five fruits, one per line."}])
    text = free.content[0].text
    assert "\n" in text, text
    stopped = claude.messages.create(model=model, max_tokens=30, stop_sequences=["\n"], extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "List five fruits, one per line."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "\n"
    # The first line, without the stop sequence. (Not compared with the free answer's first line character for
    # character: in bfloat16, a prompt served from the prefix cache can tip a greedy choice on SGLang's engine.)
    assert stopped.content[0].text.strip() and "\n" not in stopped.content[0].text
    counted = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "List five fruits, one per line."}])
    assert counted.input_tokens == free.usage.input_tokens + (free.usage.cache_read_input_tokens or 0)


def test_errors_have_anthropics_shape_and_the_server_keeps_serving(stack, claude, model):
    wrong = anthropic.Anthropic(base_url=stack.base_url.removesuffix("/v1"), api_key="sk-wrong-" + "w" * 20,
                                max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=model, max_tokens=5, messages=ASK)
    assert caught.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="claude-no-such-model", max_tokens=5, messages=ASK)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    url = stack.base_url + "/messages"
    with httpx.Client(timeout=60) as http:
        for body in ({"model": model, "messages": ASK},  # max_tokens is required, as Anthropic requires it
                     {"model": model, "max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
                     {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}):
            response = http.post(url, json=body, headers={"x-api-key": stack.api_key, "anthropic-version": "2023-06-01"})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["type"] == "invalid_request_error"
    assert claude.messages.create(model=model, max_tokens=3, messages=ASK).content
