"""The Hermes tool-call parser on recorded Qwen2.5-style outputs, fed whole, one character at a time and split at
every position (streamed text arrives cut anywhere: inside the tag, the name, an escape, a multi-byte word)."""

from __future__ import annotations

import json
import random

import pytest

from service.domain import ChoiceDelta, FinishReason, Tool
from service.engines.tool_calls import FORMATS, HermesFormat, ToolCallExtractor, tool_format

TOOLS = ("get_weather", "get_time", "run_sql")

# (model output, the content a client sees, the calls as (name, arguments))
RECORDED = {
    "one call": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "San Francisco, CA", "unit": "fahrenheit"}}\n</tool_call>',
        "",
        [("get_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"})],
    ),
    "parallel calls": (
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
        ),
        "",
        [("get_weather", {"location": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    ),
    "text before the call": (
        (
            "Let me check the weather for you.\n\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Zürich"}}\n</tool_call>'
        ),
        "Let me check the weather for you.",
        [("get_weather", {"location": "Zürich"})],
    ),
    "braces, quotes and escapes inside strings": (
        (
            '<tool_call>\n{"name": "run_sql", "arguments": {"query": "SELECT \'}\' AS x, \\"{\\" AS y -- </tool_call>", '
            '"params": [1, {"k": [2, "]"]}], "unicode": "\\u00e9t\\u00e9"}}\n</tool_call>'
        ),
        "",
        [("run_sql", {"query": "SELECT '}' AS x, \"{\" AS y -- </tool_call>", "params": [1, {"k": [2, "]"]}],
                      "unicode": "été"})],
    ),
    "no arguments": (
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        "",
        [("get_time", {})],
    ),
    "compact, no newlines": (
        '<tool_call>{"name":"get_time","arguments":{"timezone":"UTC"}}</tool_call>',
        "",
        [("get_time", {"timezone": "UTC"})],
    ),
    "keys in the other order": (
        '<tool_call>\n{"arguments": {"location": "Oslo"}, "name": "get_weather"}\n</tool_call>',
        "",
        [("get_weather", {"location": "Oslo"})],
    ),
    "parameters instead of arguments": (
        '<tool_call>\n{"name": "get_weather", "parameters": {"location": "Rome"}}\n</tool_call>',
        "",
        [("get_weather", {"location": "Rome"})],
    ),
    "a tool that was not offered stays text": (
        'Sure. <tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        'Sure.<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        [],
    ),
    "not JSON stays text": (
        "<tool_call>\nget_weather(Paris)\n</tool_call> done",
        "<tool_call>\nget_weather(Paris)\n</tool_call> done",
        [],
    ),
    "plain answer mentioning tags": (
        "Use <tools> or a <tool_call tag; 3 < 4 and <b>bold</b>.\n",
        "Use <tools> or a <tool_call tag; 3 < 4 and <b>bold</b>.\n",
        [],
    ),
    # Cut by max_tokens inside the call's opening: dropped, never tool-call markup in the content.
    "an unfinished call is dropped": (
        "Checking.\n<tool_call>\n{\"name\": \"get_wea",
        "Checking.",
        [],
    ),
}


def run(pieces: list[str], tools=TOOLS):
    """Feed the pieces, then finish; returns (content, calls, deltas) as a client would assemble them."""
    parser = HermesFormat().parser(Tool(name) for name in tools)
    text, deltas = "", []
    for piece in pieces:
        out = parser.feed(piece)
        text += out.text
        deltas += out.calls
    out = parser.finish()
    text += out.text
    deltas += out.calls
    calls: list[dict] = []
    for d in deltas:
        if d.id is not None:
            assert d.id.startswith("call_") and d.name and d.index == len(calls)
            calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
        else:
            assert calls and d.index == len(calls) - 1 and d.name is None, "fragments follow their call's first delta"
            calls[-1]["arguments"] += d.arguments
    return text, calls, deltas


def splits(output: str):
    yield "whole", [output]
    yield "characters", list(output)
    for at in range(1, len(output)):
        yield f"split at {at}", [output[:at], output[at:]]
    rng = random.Random(len(output))
    for k in range(20):
        cuts = sorted(rng.sample(range(1, len(output)), min(len(output) - 1, rng.randint(2, 12))))
        yield f"random {k}", [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])]


@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_outputs_parse_the_same_however_they_are_split(name):
    output, content, expected = RECORDED[name]
    for how, pieces in splits(output):
        text, calls, _ = run(pieces)
        assert text == content, (how, pieces)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected, (how, pieces)
        assert len({c["id"] for c in calls}) == len(calls)


def test_arguments_stream_as_they_are_written():
    output = RECORDED["one call"][0]
    _, _, deltas = run(list(output))
    first, fragments = deltas[0], deltas[1:]
    assert first.name == "get_weather" and first.arguments == ""
    # The arguments arrive in many small fragments, not at the end of the call.
    assert len(fragments) > 20 and "".join(f.arguments for f in fragments) == (
        '{"location": "San Francisco, CA", "unit": "fahrenheit"}'
    )


def test_text_that_might_open_a_call_is_held_back_until_decided():
    parser = HermesFormat().parser(Tool(name) for name in TOOLS)
    assert parser.feed("The answer is 42. <tool").text == "The answer is 42."
    assert parser.feed("box> is not a tag").text == " <toolbox> is not a tag"
    assert parser.feed("\n").text == ""  # trailing whitespace waits: it could precede a call
    assert parser.finish().text == "\n"


def test_a_call_cut_short_in_its_arguments_keeps_what_was_streamed():
    text, calls, _ = run(['<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par'])
    assert text == "" and calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"location": "Par'


def test_a_call_cut_short_in_its_opening_is_dropped_not_shown_as_text():
    """max_tokens ending inside a second call's opening: no tool-call markup may reach the content."""
    first = RECORDED["one call"][0]
    for cut in ("\n<tool_call>", '\n<tool_call>\n{"name":', '\n<tool_call>\n{"name": "get_wea'):
        text, calls, _ = run([first + cut])
        assert text == "" and [c["name"] for c in calls] == ["get_weather"], cut


def test_whitespace_after_the_calls_is_not_content():
    text, calls, _ = run([RECORDED["one call"][0] + "\n\n"])
    assert text == "" and len(calls) == 1


def test_extractor_finishes_with_tool_calls_only_after_calls():
    tools = tuple(Tool(name) for name in TOOLS)
    extractor = ToolCallExtractor(HermesFormat(), tools, n=2)
    call = RECORDED["one call"][0]
    first = extractor.apply(ChoiceDelta(index=0, text=call[:50], token_ids=[1]))
    assert first.text == "" and first.tool_calls[0].name == "get_weather"
    last = extractor.apply(ChoiceDelta(index=0, text=call[50:], finish_reason=FinishReason.STOP))
    assert last.finish_reason is FinishReason.TOOL_CALLS and last.text == ""
    plain = extractor.apply(ChoiceDelta(index=1, text="No tools needed.", finish_reason=FinishReason.STOP))
    assert plain.finish_reason is FinishReason.STOP and plain.text == "No tools needed." and not plain.tool_calls
    cut = ToolCallExtractor(HermesFormat(), tools, n=1).apply(ChoiceDelta(index=0, text=call[:60], finish_reason=FinishReason.LENGTH))
    assert cut.finish_reason is FinishReason.LENGTH and cut.tool_calls


def test_formats_are_looked_up_by_name():
    assert isinstance(tool_format("hermes"), HermesFormat) and "hermes" in FORMATS
    with pytest.raises(ValueError, match="hermes"):
        tool_format("nope")


def test_hermes_renders_what_it_parses():
    from service.domain import Message, ToolCall

    fmt = HermesFormat()
    message = Message("assistant", "", tool_calls=(ToolCall("call_1", "get_time", '{"timezone": "UTC"}'),))
    text, calls, _ = run([fmt.render_calls(message)])
    assert text == "" and calls[0]["name"] == "get_time" and json.loads(calls[0]["arguments"]) == {"timezone": "UTC"}
    assert fmt.call_begin("get_time") + "{}" + fmt.call_end == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
