"""Grammars for structured output and tool calls, the constrained sampler, and tool rendering in prompts.

The sampler is driven with random logits over the default model's real vocabulary: whatever the logits say, greedy
or sampled, with an end token banned or biased, the text must match the grammar.
"""

from __future__ import annotations

import json
from types import MappingProxyType

import jsonschema
import pytest
import torch
import xgrammar as xgr

from service.domain import (
    ChatInput,
    Constraint,
    GenerateRequest,
    Message,
    ResolvedSampling,
    TextInput,
    Tool,
    ToolCall,
    ToolChoice,
)
from service.engines.default_model import prepared_path
from service.engines.grammar import compile_grammar, grammar_for
from service.engines.tool_calls import HermesFormat
from service.errors import InvalidArgument

HERMES = HermesFormat()
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"]}),
)
TIME = Tool("get_time", "", json.dumps({"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}))
MODEL = prepared_path()
needs_model = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="run `make model` first")


def chat_request(choice=None, parallel=True, constraint=None, tools=(WEATHER, TIME)) -> GenerateRequest:
    return GenerateRequest(
        "r",
        ChatInput((Message("user", "hi"),), tools=tools, tool_choice=choice or ToolChoice(), parallel_tool_calls=parallel),
        constraint=constraint,
    )


# ---------------------------------------------------------------------------------------------- grammars


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"type": "strin"}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"$ref": "#/$defs/missing"}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("regex", "(unclosed")), "constraint.regex"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("ebnf", 'root ::= "a" | undefined_rule')), "constraint.ebnf"),
        (chat_request(tools=(WEATHER, Tool("f", "", '{"properties": 5}'))), "input.chat.tools[1].parameters"),
        (chat_request(constraint=Constraint("regex", "((")), "constraint.regex"),
        # Accepted by XGrammar but not enforced by it: refused rather than answered with invalid output.
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"type": "array", "uniqueItems": true}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"properties": {"a": {"not": {"type": "null"}}}}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"type": "string", "pattern": "^a+$", "maxLength": 3}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"type": "string", "format": "iri"}')), "constraint.json_schema"),
        (GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", '{"allOf": [{"type": "integer"}, {"minimum": 3}]}')), "constraint.json_schema"),
        (chat_request(tools=(Tool("f", "", '{"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": true}}}'),)), "input.chat.tools[0].parameters"),
    ],
)
def test_unusable_grammars_are_invalid_arguments_naming_the_field(request_, field):
    with pytest.raises(InvalidArgument) as caught:
        grammar_for(request_, HERMES)
    assert caught.value.field == field
    assert "/project/cpp" not in caught.value.message and "[" not in caught.value.message[:3]


def test_specs_use_sglangs_sampling_keys():
    assert grammar_for(GenerateRequest("r", TextInput("x")), HERMES) is None
    assert grammar_for(chat_request(choice=ToolChoice("none")), HERMES) is None
    spec = grammar_for(GenerateRequest("r", TextInput("x"), constraint=Constraint("json_object")), HERMES)
    assert (spec.kind, json.loads(spec.text)) == ("json_schema", {"type": "object"})
    spec = grammar_for(GenerateRequest("r", TextInput("x"), constraint=Constraint("regex", "[0-9]+")), HERMES)
    assert (spec.kind, spec.text, spec.field) == ("regex", "[0-9]+", "constraint.regex")
    spec = grammar_for(chat_request(choice=ToolChoice("required")), HERMES)
    assert spec.kind == "ebnf" and xgr.Grammar.from_ebnf(spec.text)


ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
TWO = ONE + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
WRONG_ARGS = '<tool_call>\n{"name": "get_time", "arguments": {"city": "UTC"}}\n</tool_call>'


@needs_model
@pytest.mark.parametrize(
    "request_, accepted, refused",
    [
        (chat_request(choice=ToolChoice("required")), [ONE, TWO, TIME_CALL], [WRONG_ARGS, "Hello", '{"a": 1}', "Hi " + ONE]),
        (chat_request(choice=ToolChoice("required"), parallel=False), [ONE, TIME_CALL], [TWO, "Hello"]),
        # A named function is one call of it, even with parallel calls allowed.
        (chat_request(choice=ToolChoice("function", "get_time")), [TIME_CALL], [ONE, "Hello", TIME_CALL + "\n" + TIME_CALL]),
        (chat_request(), ["Hello there", "Sure. " + ONE, TWO, '{"a": 1}'], [WRONG_ARGS, "Sure. " + WRONG_ARGS]),
        (chat_request(constraint=Constraint("json_object")), ['{"a": 1}', ONE, TWO], ["Hello", "Sure. " + ONE]),
    ],
    ids=["required", "required-one", "named", "auto", "auto-or-json"],
)
def test_tool_grammars_accept_exactly_valid_calls(tokenizer_compiler, request_, accepted, refused):
    compiled = compile_grammar(tokenizer_compiler, grammar_for(request_, HERMES))

    def complete(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        return matcher.accept_string(text) and matcher.is_completed()

    assert [t for t in accepted if not complete(t)] == []
    assert [t for t in refused if complete(t)] == []


# ---------------------------------------------------------------------------------------------- the sampler


@pytest.fixture(scope="module")
def tokenizer():
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip("run `make model` first")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def tokenizer_compiler(tokenizer):
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))


def resolved(**overrides) -> ResolvedSampling:
    values = {"max_tokens": 200, "min_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
              "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "stop": (),
              "stop_token_ids": (), "ignore_eos": False, "seed": None, "logit_bias": MappingProxyType({}),
              "skip_special_tokens": True}
    values.update(overrides)
    return ResolvedSampling(**values)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "integer"}}, "required": ["zip"]},
    },
    "required": ["name", "tags", "address"],
    "additionalProperties": False,
}


@needs_model
@pytest.mark.parametrize(
    "sampling",
    [resolved(temperature=0.0), resolved(seed=1), resolved(seed=2, top_k=5, top_p=0.9),
     resolved(seed=3, min_tokens=150), resolved(seed=4, logit_bias=MappingProxyType({2: -100.0}))],
    ids=["greedy", "sampled", "top-k-top-p", "min_tokens-past-the-end", "end-banned"],
)
def test_constrained_rows_only_write_what_the_grammar_accepts(tokenizer, tokenizer_compiler, sampling):
    from service.engines.sampling import RequestSampler, SamplingPlan

    compiled = compile_grammar(tokenizer_compiler, grammar_for(
        GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", json.dumps(SCHEMA))), HERMES))
    eos = tokenizer.eos_token_id
    plan = SamplingPlan.build(sampling, [eos], [1, 2, 3], None, sampling.seed, compiled)
    assert not plan.plain
    random_logits = torch.Generator().manual_seed(sampling.seed or 0)
    generated: list[int] = []
    while len(generated) < sampling.max_tokens:
        # Random logits, but with EOS likely whenever allowed, so the test ends the way a model would.
        logits = torch.randn(len(tokenizer), generator=random_logits) * 3
        logits[eos] = 8.0
        token = RequestSampler._pick(plan, logits, generated)
        if token == eos:
            break
        generated.append(token)
    jsonschema.validate(json.loads(tokenizer.decode(generated)), SCHEMA)
    assert plan.matcher.is_terminated()


@needs_model
def test_unconstrained_rows_stay_plain():
    from service.engines.sampling import SamplingPlan

    assert SamplingPlan.build(resolved(temperature=0.0), [2], [1], None, None).plain


# ---------------------------------------------------------------------------------------------- prompts


@needs_model
def test_a_template_without_tools_gets_hermes_text(tokenizer):
    from service.engines.prompt import PromptRenderer

    renderer = PromptRenderer(tokenizer, HERMES)
    assert not renderer.template_knows_tools
    history = ChatInput(
        (
            Message("system", "Be brief."),
            Message("user", "Weather in Oslo and the time there?"),
            Message("assistant", "Checking.", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Oslo", "unit": "c"}'),
                                                           ToolCall("call_2", "get_time", '{"tz": "Europe/Oslo"}'))),
            Message("tool", "-3 C, snow", tool_call_id="call_1"),
            Message("tool", "14:05", tool_call_id="call_2"),
        ),
        tools=(WEATHER, TIME),
    )
    prompt = renderer.render_chat(history)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                         "parameters": json.loads(WEATHER.parameters)}}) in prompt
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time"') in prompt
    # Both results in one user turn, as Qwen2.5's template writes them.
    assert ("<|im_start|>user\n<tool_response>\n-3 C, snow\n</tool_response>\n<tool_response>\n14:05\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in prompt
    without = renderer.render_chat(ChatInput(history.messages, tools=history.tools, tool_choice=ToolChoice("none")))
    assert "# Tools" not in without and "<tool_response>" in without
    no_system = renderer.render_chat(ChatInput((Message("user", "hi"),), tools=(TIME,)))
    assert no_system.startswith("<|im_start|>system\n# Tools\n")


# A tool-aware template in the style of Qwen2.5's (written for this test).
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}
{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>tool {{ m.tool_call_id }}
{{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@needs_model
def test_a_tool_aware_template_renders_tools_itself(tokenizer):
    import copy

    from service.engines.prompt import PromptRenderer

    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    renderer = PromptRenderer(tokenizer, HERMES)
    assert renderer.template_knows_tools
    prompt = renderer.render_chat(ChatInput(
        (Message("user", "hi"), Message("assistant", "", tool_calls=(ToolCall("call_1", "get_time", '{"tz": "UTC"}'),)),
         Message("tool", "12:00", tool_call_id="call_1")),
        tools=(WEATHER, TIME),
    ))
    assert prompt.startswith("<|im_start|>system\nTOOLS:get_weather;get_time;")
    # Arguments reach the template as a mapping, as Qwen's `arguments | tojson` expects.
    assert 'CALL call_1 get_time {"tz": "UTC"}' in prompt and "<|im_start|>tool call_1\n12:00" in prompt
    assert "<tool_call>" not in prompt


@needs_model
def test_a_schema_compiles_once(tokenizer):
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    spec = grammar_for(GenerateRequest("r", TextInput("x"), constraint=Constraint("json_schema", json.dumps(SCHEMA))), HERMES)
    compile_grammar(compiler, spec)
    cached = compiler.get_cache_size_bytes()
    assert cached > 0
    compile_grammar(compiler, spec)
    assert compiler.get_cache_size_bytes() == cached


@needs_model
def test_rendering_checks_the_tools_it_reads(tokenizer):
    from service.engines.prompt import PromptRenderer

    renderer = PromptRenderer(tokenizer, HERMES)
    with pytest.raises(InvalidArgument) as caught:
        renderer.token_ids(ChatInput((Message("user", "hi"),), tools=(Tool("f", "", "{broken"),)))
    assert caught.value.field == "input.chat.tools[0].parameters"
    with pytest.raises(InvalidArgument) as caught:
        renderer.token_ids(ChatInput((Message("assistant", "", tool_calls=(ToolCall("c", "f", "nope"),)),)))
    assert caught.value.field == "input.chat.messages[0].tool_calls[0].arguments"
