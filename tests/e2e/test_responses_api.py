"""OpenAI's Responses API through the real `openai` SDK (and the OpenAI Agents SDK's default model), against the real
stack and model: an app written for it works by changing only its base URL and key. Responses and stream events are
checked against OpenAI's own published schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import OTHER_API_KEY
from tests.helpers.openai_schema import assert_valid

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]},
}
GREEDY = {"temperature": 0}


def test_text_non_streaming_and_streaming_agree(client, model):
    raw = client.responses.with_raw_response.create(model=model, input="Name three colours of the rainbow.",
                                                    instructions="Be brief.", max_output_tokens=30, **GREEDY)
    assert_valid(raw.http_response.json(), "Response")  # the wire JSON, against OpenAI's own schema
    whole = raw.parse()
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == model
    assert whole.status in ("completed", "incomplete") and whole.output_text.strip()
    assert [item.type for item in whole.output] == ["message"]
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 30
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens

    events = list(client.responses.create(model=model, input="Name three colours of the rainbow.",
                                          instructions="Be brief.", max_output_tokens=30, stream=True, **GREEDY))
    for event in events:
        assert_valid(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.completed" if whole.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for needed in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                   "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert needed in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_a_length_cut_response_is_incomplete(client, model):
    cut = client.responses.create(model=model, input="Write a long story about the sea.", max_output_tokens=5, **GREEDY)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5


def test_a_forced_function_call_answered_on_the_next_turn(client, model):
    first = client.responses.create(model=model, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, **GREEDY)
    assert_valid(first.model_dump(mode="json", exclude_unset=True), "Response")
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    second = client.responses.create(
        model=model, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=40, **GREEDY,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}],
    )
    assert second.previous_response_id == first.id and second.output
    # The second turn saw the whole conversation: its prompt holds the first turn's question and call.
    assert second.usage.input_tokens > first.usage.input_tokens
    streamed = list(client.responses.create(model=model, input="What is the weather in Oslo?", tools=[WEATHER],
                                            tool_choice="required", parallel_tool_calls=False, stream=True, **GREEDY))
    kinds = [e.type for e in streamed]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(e for e in streamed if e.type == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])


def test_text_format_json_schema_is_enforced(client, model):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "colour": {"enum": ["red", "green", "blue"]}},
              "required": ["name", "colour"], "additionalProperties": False}
    reply = client.responses.create(model=model, input="Invent a person.", max_output_tokens=120, **GREEDY,
                                    text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert reply.status == "completed", reply.output_text
    jsonschema.validate(json.loads(reply.output_text), schema)
    assert reply.text.format.type == "json_schema"


def test_stored_responses_belong_to_their_key(client, stack, model):
    made = client.responses.create(model=model, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}],
                                   max_output_tokens=8, **GREEDY)
    fetched = client.responses.retrieve(made.id)
    assert fetched.id == made.id and fetched.output_text == made.output_text
    items = client.responses.input_items.list(made.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "Hi!"
    other = openai.OpenAI(base_url=stack.base_url, api_key=OTHER_API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=model, input="Go on.", previous_response_id=made.id, max_output_tokens=4)
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    unstored = client.responses.create(model=model, input="Hi!", max_output_tokens=4, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
         "input[0].content[0].type"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(stack, model, body, param):
    reply = httpx.post(f"{stack.base_url}/responses", headers={"Authorization": f"Bearer {stack.api_key}"},
                       json={"model": model, "input": "Hi", **body}, timeout=60)
    assert reply.status_code in (400, 404), reply.text
    error = reply.json()["error"]
    assert_valid(reply.json(), "ErrorResponse")
    assert error["param"] == param, error


def test_the_agents_sdk_default_runner(stack, model):
    agents = pytest.importorskip("agents")
    from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0),
                              use_for_tracing=False)
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return "Sunny, 21 degrees."

    agent = Agent(name="forecaster", instructions="Answer in one sentence.", model=model, tools=[get_weather],
                  model_settings=agents.ModelSettings(temperature=0, max_tokens=60, tool_choice="required"),
                  tool_use_behavior="stop_on_first_tool")
    result = Runner.run_sync(agent, "What is the weather in Paris?")
    assert calls and result.final_output == "Sunny, 21 degrees."


def test_the_routes_are_described_and_counted(client, stack, model):
    made = client.responses.create(model=model, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    client.responses.input_items.list(made.id)
    document = httpx.get(f"{stack.base_url.removesuffix('/v1')}/openapi.json", timeout=30).json()
    assert {"/v1/responses", "/v1/responses/{response_id}", "/v1/responses/{response_id}/input_items"} <= set(document["paths"])
    metrics = httpx.get(f"{stack.base_url.removesuffix('/v1')}/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines() if line.startswith("chatserve_gateway_requests_total{")]
    for route, status in (("responses", "200"), ("response", "404"), ("response_input_items", "200")):
        assert any(f'route="{route}"' in line and f'status="{status}"' in line for line in counted), route
