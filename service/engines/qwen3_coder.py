"""The XML tool-call syntax of Qwen3-Coder and Qwen3.5+ (`--tool-parser qwen3_coder`, as SGLang and vLLM name it):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text; the parser reads it by the type its tool's schema gives it (a string as is,
numbers and booleans as such, objects and arrays as JSON), and streams each call as OpenAI does: id and name first,
then the arguments' JSON, one parameter at a time. The grammar for forced calls (service/engines/grammar.py) writes
exactly this syntax, with each value shaped by its type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from service.domain import Message, Tool, ToolCallDelta
from service.engines.tool_calls import Parsed, TaggedCallParser, new_call_id

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?")


class Qwen3CoderFormat:
    name = "qwen3_coder"
    trigger = "<tool_call>"
    separator = "\n"
    call_end = "</function>\n</tool_call>"
    arguments = "xml"  # how grammar.py shapes a call's arguments

    def call_begin(self, tool: str) -> str:
        return f"<tool_call>\n<function={tool}>\n"

    def parser(self, tools: Iterable[Tool]) -> Qwen3CoderParser:
        return Qwen3CoderParser({t.name: t.parameters_schema() for t in tools})

    def system_prompt(self, tools: tuple[Tool, ...]) -> str:
        from service.engines.tool_calls import tool_json

        listed = "".join("\n" + json.dumps(tool_json(t), ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou have access to the following functions:\n\n<tools>" + listed + "\n</tools>\n\n"
            "If you choose to call a function, reply in exactly this format:\n\n<tool_call>\n<function=NAME>\n"
            "<parameter=PARAMETER>\nVALUE\n</parameter>\n</function>\n</tool_call>\n\n"
            "Give every required parameter; a value may span several lines."
        )

    def render_calls(self, message: Message) -> str:
        parts = [message.content] if message.content else []
        for call in message.tool_calls:
            arguments = json.loads(call.arguments or "{}")
            body = "".join(f"<parameter={k}>\n{_raw(v)}\n</parameter>\n" for k, v in arguments.items())
            parts.append(self.call_begin(call.name) + body + self.call_end)
        return "\n".join(parts)

    def render_results(self, results: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


def _raw(value: Any) -> str:
    """A value as the model writes it: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def typed(value: str, schema: dict[str, Any]) -> Any:
    """A parameter's raw text read by its schema's type; text that does not read as that type stays a string."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    if "string" in kinds:
        return value
    text = value.strip()
    if not kinds:  # no type given: JSON where it reads as JSON (a string enum stays text)
        if all(isinstance(e, str) for e in schema.get("enum", [1])):
            return value
        try:
            return json.loads(text)
        except ValueError:
            return value
    for kind in kinds:
        try:
            if kind == "integer":
                return int(text)
            if kind == "number":
                return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
            if kind == "boolean" and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if kind == "null" and text.lower() in ("null", "none"):
                return None
            if kind in ("object", "array"):
                return json.loads(text)
        except ValueError:
            continue
    return value


class Qwen3CoderParser(TaggedCallParser):
    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self._tools = tools
        self._params = 0  # parameters written for the current call
        self._name = ""  # the current call's tool

    def _finish_call(self, out: Parsed) -> None:
        if self._mode == "params":
            # Cut short (max_tokens): close what was written, so the arguments are the parameters completed.
            out.calls.append(ToolCallDelta(self._calls - 1, arguments="}" if self._params else "{}"))

    def _step_call(self, out: Parsed) -> bool:
        buf = self._buf
        if self._mode == "head":
            head = _FUNCTION.match(buf)
            if head is None:
                if len(buf.strip()) > len("<function=") and not buf.lstrip().startswith("<function="):
                    self._mode = "raw"
                    return True
                return False
            if head.end() == len(buf) and not buf.endswith("\n"):
                return False  # the newline after the tag may still come
            name = head.group(1).strip()
            if name not in self._tools:
                self._mode = "raw"
                return True
            out.calls.append(ToolCallDelta(self._calls, id=new_call_id(), name=name))
            self._calls += 1
            self._params = 0
            self._name = name
            self._buf = buf[head.end():]
            self._mode = "params"
            return True
        if self._mode == "params":
            stripped = buf.lstrip()
            if stripped.startswith("</function>"):
                out.calls.append(ToolCallDelta(self._calls - 1, arguments="}" if self._params else "{}"))
                self._buf = stripped[len("</function>"):]
                self._mode = "tail"
                return True
            parameter = _PARAMETER.match(buf)
            if parameter is None:
                return False
            end = buf.find("</parameter>", parameter.end())
            if end == -1:
                return False
            key = parameter.group(1).strip()
            value = buf[parameter.end():end]
            value = value[:-1] if value.endswith("\n") else value
            schema = (self._tools[self._name].get("properties") or {}).get(key) or {}
            fragment = ("{" if self._params == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": "
            out.calls.append(ToolCallDelta(self._calls - 1, arguments=fragment + json.dumps(typed(value, schema),
                                                                                         ensure_ascii=False)))
            self._params += 1
            self._buf = buf[end + len("</parameter>"):]
            return True
        raise AssertionError(self._mode)
