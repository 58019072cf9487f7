"""Responses as OpenAI's own published schemas define them (openai/openai-openapi, tests/schemas/openai.json), not
only as our own models say: chat completions and their stream chunks (text, logprobs, tool calls, usage), text
completions, the model list and error bodies, read raw off the wire from the running stack."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers.openai_schema import assert_valid

QUESTION = [{"role": "user", "content": "Name two colours."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}


def call(stack, method: str, path: str, body: dict | None = None, key: str | None = None) -> httpx.Response:
    with httpx.Client(timeout=120) as http:
        return http.request(method, stack.base_url + path, json=body,
                            headers={"Authorization": f"Bearer {key or stack.api_key}"})


def chunks(response: httpx.Response) -> list[dict]:
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": True, "top_logprobs": 2, "n": 2},
    {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
], ids=["text", "logprobs-n2", "tool-call"])
def test_chat_completion_and_its_chunks(stack, model, extra):
    body = {"model": model, "messages": QUESTION, "max_tokens": 24, "temperature": 0, **extra}
    whole = call(stack, "POST", "/chat/completions", body)
    assert whole.status_code == 200
    assert_valid(whole.json(), "CreateChatCompletionResponse")
    streamed = call(stack, "POST", "/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200
    for chunk in chunks(streamed):
        assert_valid(chunk, "CreateChatCompletionStreamResponse")


def test_text_completion(stack, model):
    body = {"model": model, "prompt": ["Once upon a time", "The sky is"], "max_tokens": 8, "temperature": 0,
            "logprobs": 2}
    response = call(stack, "POST", "/completions", body)
    assert response.status_code == 200
    assert_valid(response.json(), "CreateCompletionResponse")


def test_models(stack, model):
    listed = call(stack, "GET", "/models")
    assert_valid(listed.json(), "ListModelsResponse")
    assert_valid(call(stack, "GET", f"/models/{model}").json(), "Model")


@pytest.mark.parametrize("case", ["bad field", "wrong key", "unknown model", "unknown route"])
def test_errors(stack, model, case):
    response = {
        "bad field": lambda: call(stack, "POST", "/chat/completions", {"model": model, "messages": QUESTION, "n": 0}),
        "wrong key": lambda: call(stack, "GET", "/models", key="sk-wrong-" + "w" * 20),
        "unknown model": lambda: call(stack, "GET", "/models/gpt-9"),
        "unknown route": lambda: call(stack, "GET", "/nope"),
    }[case]()
    assert 400 <= response.status_code < 500
    assert_valid(response.json(), "ErrorResponse")
