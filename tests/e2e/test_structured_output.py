"""Structured output and tool calling on the real model, through the openai SDK and raw HTTP: every constrained
answer parses and validates against its schema, streamed or not, and tool calls come back as OpenAI's tool_calls.

The default model is tiny (135M parameters); left to itself it rarely writes valid JSON or a valid call. These
answers are valid because decoding is constrained, which is what the tests are for. Schemas bound their strings
and arrays (maxLength, maxItems) only so that greedy decoding cannot wander past max_tokens on a slow CPU.
"""

from __future__ import annotations

import json

import grpc
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from generate.v1 import generate_pb2 as pb

SCHEMAS = {
    "required fields": (
        "Describe a person named Ann who is 31 years old.",
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
         "required": ["name", "age"], "additionalProperties": False},
    ),
    "nested objects": (
        "Give the address of the Eiffel Tower as JSON.",
        {"type": "object", "properties": {
            "landmark": {"type": "string", "maxLength": 30},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "country", "zip"], "additionalProperties": False}},
         "required": ["landmark", "address"], "additionalProperties": False},
    ),
    "array of enums": (
        "List three primary colours.",
        {"type": "object", "properties": {"colours": {"type": "array", "minItems": 1, "maxItems": 3,
                                                      "items": {"type": "string", "enum": ["red", "green", "blue", "yellow"]}}},
         "required": ["colours"], "additionalProperties": False},
    ),
    "enum and number": (
        "Classify the sentiment of: 'I love this phone, the battery lasts forever.'",
        {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                          "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
         "required": ["sentiment", "confidence"], "additionalProperties": False},
    ),
    "array of objects with $defs": (
        "Name two planets and their order from the sun.",
        {"type": "object", "$defs": {"planet": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12}, "order": {"type": "integer", "minimum": 1, "maximum": 8}},
            "required": ["name", "order"], "additionalProperties": False}},
         "properties": {"planets": {"type": "array", "items": {"$ref": "#/$defs/planet"}, "minItems": 2, "maxItems": 2}},
         "required": ["planets"], "additionalProperties": False},
    ),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                       "required": ["timezone"], "additionalProperties": False},
    },
}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def raw(stack, body) -> httpx.Response:
    with httpx.Client(timeout=120) as http:
        return http.post(stack.base_url + "/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack.api_key}"})


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def streamed(client, **kwargs):
    """(content, tool calls as {index: {id, name, arguments}}, finish_reason) assembled from a stream's chunks."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or ():
            if call.id:
                assert call.index not in calls and call.function.name, "id and name come first, once"
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


# ---------------------------------------------------------------------------------------------- response_format


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(client, model, name):
    question, schema = SCHEMAS[name]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=80, temperature=0,
        response_format=json_schema_format(schema),
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("name", ["nested objects", "array of enums"])
def test_json_schema_output_validates_when_streamed_and_sampled(client, model, name):
    question, schema = SCHEMAS[name]
    for _ in range(2):  # two samples (unseeded: not every engine honours a seed, see test_openai_compat)
        # Room for the longest object the schema allows even at one character per token (its strings are bounded,
        # the JSON compact): a sampled answer must end by the grammar, never by max_tokens.
        content, calls, finish = streamed(
            client, model=model, messages=[{"role": "user", "content": question}], max_tokens=160, temperature=0.8,
            response_format=json_schema_format(schema),
        )
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(content), schema)


def test_json_object_is_a_json_object(client, model):
    for question in ("What is the capital of France? Answer in JSON.",
                     'Return a JSON object with the key "answer" holding the result of 2+2.'):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=60, temperature=0,
            response_format={"type": "json_object"},
        )
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


class Planet(BaseModel):
    name: str = Field(max_length=12)
    order_from_sun: int = Field(ge=1, le=8)
    has_rings: bool


def test_the_sdk_parse_helper_reads_a_pydantic_model(client, model):
    completion = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe the planet Saturn."}], max_tokens=60, temperature=0,
        response_format=Planet,
    )
    planet = completion.choices[0].message.parsed
    assert isinstance(planet, Planet) and 1 <= planet.order_from_sun <= 8


def test_regex_and_ebnf_extras(client, model):
    date = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "When did the Berlin wall fall?"}], max_tokens=20,
        temperature=0, extra_body={"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"},
    )
    assert len(date.choices[0].message.content) == 10 and date.choices[0].message.content[4] == "-"
    answer = client.completions.create(
        model=model, prompt="Is the sky green? Answer:", max_tokens=5, temperature=0,
        extra_body={"ebnf": 'root ::= " " ("yes" | "no")'},
    )
    assert answer.choices[0].text in (" yes", " no")


# ---------------------------------------------------------------------------------------------- tools


def check_call(name: str, arguments: str) -> dict:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, PARAMETERS[name])
    return parsed


def test_tool_choice_required_gives_a_valid_call(client, model):
    reply = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        max_tokens=60, temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    check_call(call.function.name, call.function.arguments)


def test_a_named_function_is_the_one_called_streamed_as_openai_streams(client, model):
    content, calls, finish = streamed(
        client, model=model, messages=ASK_WEATHER, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60, temperature=0,
        parallel_tool_calls=False,
    )
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_time"
    check_call("get_time", calls[0]["arguments"])


def test_parallel_calls_each_validate(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice="required", max_tokens=120, temperature=0,
    )
    choice = reply.choices[0]
    calls = choice.message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    # A tiny model may keep calling until max_tokens cuts the last call short; every complete call is valid.
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length") and complete
    for call in complete:
        check_call(call.function.name, call.function.arguments)


def test_tool_round_trip_with_results_in_the_history(client, model):
    first = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        max_tokens=60, temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK_WEATHER + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0,
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    auto = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    message = auto.choices[0].message
    # "auto": the model answers or calls again; either way a call it makes is a valid one.
    for again in message.tool_calls or ():
        check_call(again.function.name, again.function.arguments)
    assert (auto.choices[0].finish_reason == "tool_calls") == bool(message.tool_calls)


def test_tools_reach_the_prompt_unless_tool_choice_is_none(client, model):
    def prompt_tokens(**fields) -> int:
        return client.chat.completions.create(model=model, messages=ASK_WEATHER, max_tokens=1, **fields).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=[WEATHER]) > plain + 50
    assert prompt_tokens(tools=[WEATHER], tool_choice="none") == plain


def test_the_sdk_parses_strict_pydantic_tools(client, model):
    class GetWeather(BaseModel):
        city: str = Field(max_length=40)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    completion = client.chat.completions.parse(
        model=model, messages=ASK_WEATHER, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0,
    )
    arguments = completion.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(arguments, GetWeather) and arguments.unit in ("celsius", "fahrenheit")


def test_grpc_clients_get_structured_tool_calls(grpc_stub):
    request = pb.GenerateRequest(
        input=pb.Input(chat=pb.Chat(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="What time is it in Tokyo?")])],
            tools=[pb.Tool(name="get_time", parameters=json.dumps(TIME["function"]["parameters"]))],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED),
            parallel_tool_calls=False,
        )),
        sampling=pb.SamplingParams(max_tokens=40, temperature=0.0),
    )
    responses = list(grpc_stub.Generate(request, timeout=60))
    deltas = [c for r in responses for c in r.choices]
    calls = [t for c in deltas for t in c.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].name == "get_time"
    check_call("get_time", "".join(t.arguments for t in calls))
    assert "".join(c.text for c in deltas) == "" and deltas[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    constrained = pb.GenerateRequest(input=pb.Input(text="The year the Berlin wall fell:"),
                                     sampling=pb.SamplingParams(max_tokens=8, temperature=0.0),
                                     constraint=pb.Constraint(regex=" [0-9]{4}"))
    text = "".join(c.text for r in grpc_stub.Generate(constrained, timeout=60) for c in r.choices)
    assert len(text) == 5 and text[1:].isdigit()
    with pytest.raises(grpc.RpcError) as caught:
        list(grpc_stub.Generate(pb.GenerateRequest(input=pb.Input(text="x"), constraint=pb.Constraint(json_schema="{")), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": json_schema_format({"type": "strin"})}, "response_format.json_schema.schema"),
        ({"response_format": json_schema_format({"properties": {"a": {"$ref": "#/$defs/missing"}}})},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"regex": "(unclosed"}, "regex"),
        ({"ebnf": "root ::= missing_rule"}, "ebnf"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
        ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}]},
         "tools[1].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": ASK_WEATHER + [{"role": "tool", "content": "sunny"}]}, "messages[1].tool_call_id"),
        ({"messages": ASK_WEATHER + [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_bad_schemas_and_tools_are_400_naming_the_field(stack, model, fields, param):
    body = {"model": model, "messages": ASK_WEATHER, "max_tokens": 5, **fields}
    response = raw(stack, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "/project/cpp" not in error["message"]
