"""The XML tool-call syntax of Qwen3-Coder / Qwen3.5+ (service/engines/qwen3_coder.py): recorded outputs cut at every
point still parse into the same calls with schema-typed JSON arguments; the grammar for forced calls writes exactly
what the parser reads."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from service.domain import ChatInput, ChoiceDelta, FinishReason, GenerateRequest, Message, Tool, ToolChoice
from service.engines.grammar import grammar_for
from service.engines.qwen3_coder import Qwen3CoderFormat, typed
from service.engines.tool_calls import ToolCallExtractor, tool_format

WEATHER = Tool("get_weather", "", json.dumps({"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]},
    "options": {"type": "object", "properties": {"hourly": {"type": "boolean"}}}}, "required": ["city"]}))
SQL = Tool("run_sql", "", json.dumps({"type": "object", "properties": {"query": {"type": "string"}}}))

RECORDED = {
    "one call, typed values": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n<parameter=options>\n{\"hourly\": true}\n</parameter>\n</function>\n</tool_call>",
        "", [("get_weather", {"city": "San Francisco", "days": 3, "options": {"hourly": True}})],
    ),
    "text, then two calls, a multi-line string": (
        "Let me look.\n<tool_call>\n<function=run_sql>\n<parameter=query>\nSELECT *\nFROM t\nWHERE a < 3\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\n北京\n</parameter>\n"
        "</function>\n</tool_call>",
        "Let me look.", [("run_sql", {"query": "SELECT *\nFROM t\nWHERE a < 3"}), ("get_weather", {"city": "北京"})],
    ),
    "a function that was not offered stays text": (
        "<tool_call>\n<function=delete_all>\n</function>\n</tool_call>",
        "<tool_call>\n<function=delete_all>\n</function>\n</tool_call>", [],
    ),
    "no parameters": ("<tool_call>\n<function=run_sql>\n</function>\n</tool_call>", "", [("run_sql", {})]),
    "cut short by max_tokens": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=da",
        "", [("get_weather", {"city": "Oslo"})],
    ),
}


def run(pieces: list[str]):
    extractor = ToolCallExtractor(Qwen3CoderFormat(), (WEATHER, SQL), 1)
    text, calls = "", []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        delta = extractor.apply(ChoiceDelta(0, text=piece, finish_reason=FinishReason.STOP if last else None))
        text += delta.text
        for call in delta.tool_calls:
            if call.id is not None:
                assert call.name and call.arguments == ""
                calls.append([call.name, ""])
            else:
                calls[call.index][1] += call.arguments
    return text, [(name, json.loads(arguments)) for name, arguments in calls], delta.finish_reason


@pytest.mark.parametrize("case", list(RECORDED))
def test_recorded_outputs_parse_at_every_cut(case):
    output, content, expected = RECORDED[case]
    for cut in range(1, len(output)):
        text, calls, finish = run([output[:cut], output[cut:]])
        assert (text, calls) == (content, expected), cut
    text, calls, finish = run(list(output))  # one character at a time
    assert (text, calls) == (content, expected)
    assert finish is (FinishReason.TOOL_CALLS if expected else FinishReason.STOP)


def test_values_are_read_by_their_schema_type():
    assert typed("42", {"type": "integer"}) == 42 and typed("4.5", {"type": "number"}) == 4.5
    assert typed("007", {"type": "string"}) == "007" and typed("True", {"type": "boolean"}) is True
    assert typed("[1, 2]", {"type": "array"}) == [1, 2] and typed("oops", {"type": "integer"}) == "oops"
    assert typed("c", {"enum": ["c", "f"]}) == "c" and typed("12", {}) == 12


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "get_weather"), ToolChoice("auto")])
def test_the_grammar_writes_what_the_parser_reads(choice):
    from transformers import AutoTokenizer

    from service.engines.default_model import prepared_path

    tokenizer = AutoTokenizer.from_pretrained(prepared_path())
    request = GenerateRequest("r", ChatInput((Message("user", "weather?"),), tools=(WEATHER, SQL), tool_choice=choice))
    spec = grammar_for(request, Qwen3CoderFormat())
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer)).compile_grammar(spec.text)
    good = RECORDED["one call, typed values"][0]
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string(good)
    for bad in (good.replace("\n3\n", "\nthree\n"),  # an integer
                good.replace("<parameter=city>\nSan Francisco\n</parameter>\n", "")):  # the required parameter
        assert not xgr.GrammarMatcher(compiled).accept_string(bad)


def test_auto_reads_the_template_and_history_renders_as_xml():
    assert tool_format("auto", "{% for m in messages %}<function={{ m }}>{% endfor %}").name == "qwen3_coder"
    assert tool_format("auto", "{{ messages }}").name == "hermes"
    from service.domain import ToolCall

    rendered = Qwen3CoderFormat().render_calls(Message("assistant", "", tool_calls=(
        ToolCall("c1", "get_weather", '{"city": "Oslo", "days": 2}'),)))
    assert rendered == ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2\n"
                        "</parameter>\n</function>\n</tool_call>")
