"""Tool calling in the model's own syntax: how tools, calls and results are written into a prompt whose chat
template knows no tools, which text a call must be (for constrained decoding), and the streaming parser that
turns the model's text back into structured tool calls.

A `ToolCallFormat` describes one model family's syntax; `FORMATS` holds them by name (the service's
`--tool-parser` flag picks one). `HermesFormat` is the `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
syntax of Hermes, Qwen2.5 and Qwen3, which the default model is prompted with too. Adding a family is one more
class with the same attributes and a parser.

Pure Python, no torch: every engine shares it.
"""

from __future__ import annotations

import abc
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from service.domain import ChoiceDelta, FinishReason, Message, Tool, ToolCallDelta


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(slots=True)
class Parsed:
    """What one piece of model text turned into: text for the user, and tool-call deltas."""

    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallParser(Protocol):
    """Streaming: feed the model's text as it arrives, then `finish` once the choice ended.

    Text that might still turn out to be part of a call is held back (as stop strings are), so text is never
    streamed and then taken back. A call streams as OpenAI streams it: a first delta with id and name, then
    fragments of its arguments' JSON text."""

    def feed(self, text: str) -> Parsed: ...

    def finish(self) -> Parsed: ...

    @property
    def calls(self) -> int:
        """How many calls were started so far."""
        ...


class ToolCallFormat(Protocol):
    name: ClassVar[str]
    # The text that opens a call, for a grammar that leaves text free until it appears.
    trigger: ClassVar[str]
    # What separates two calls in a row.
    separator: ClassVar[str]
    # What ends a call, after its arguments.
    call_end: ClassVar[str]

    def call_begin(self, tool: str) -> str:
        """The exact text that opens a call of `tool`, up to its arguments' JSON."""
        ...

    def parser(self, tools: Iterable[Tool]) -> ToolCallParser: ...

    def system_prompt(self, tools: tuple[Tool, ...]) -> str:
        """Describes the tools and the call syntax, for a chat template that knows no tools."""
        ...

    def render_calls(self, message: Message) -> str:
        """An assistant message's text and calls, in the model's syntax."""
        ...

    def render_results(self, results: list[str]) -> str:
        """The content of the user turn that carries tool results."""
        ...


def tool_json(tool: Tool) -> dict[str, Any]:
    """A tool as OpenAI and chat templates describe one."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters_schema()
    return {"type": "function", "function": function}


# ---------------------------------------------------------------------------------------------- Hermes


class HermesFormat:
    """`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, as Qwen2.5's chat template asks for it.

    The system block, call and result texts are those of Qwen2.5-Instruct's template, so a prompt rendered
    here for a template without tools reads as the Hermes-trained models expect."""

    name = "hermes"
    trigger = "<tool_call>"
    separator = "\n"
    call_end = "}\n</tool_call>"
    arguments = "json"  # how grammar.py shapes a call's arguments

    def call_begin(self, tool: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(tool, ensure_ascii=False) + ', "arguments": '

    def parser(self, tools: Iterable[Tool]) -> HermesParser:
        return HermesParser(frozenset(t.name for t in tools))

    def system_prompt(self, tools: tuple[Tool, ...]) -> str:
        listed = "".join("\n" + json.dumps(tool_json(t), ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            + listed
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_calls(self, message: Message) -> str:
        parts = [message.content] if message.content else []
        for call in message.tool_calls:
            parts.append(self.call_begin(call.name) + call.arguments + self.call_end)
        return "\n".join(parts)

    def render_results(self, results: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


# The start of a Hermes call up to its arguments; the name is a JSON string. Some models write "parameters".
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class TaggedCallParser(abc.ABC):
    """What every `<tool_call>...</tool_call>` syntax shares: text streams until a call opens (held back while it
    might be the start of one), a call's text after its arguments is skipped to the closing tag, and a call naming
    no offered tool is given back as text. Subclasses read the call's inside (`_step_call`, from mode "head")."""

    _START = "<tool_call>"
    _END = "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""  # text received but not yet turned into output
        self._mode = "text"  # text | tail | raw, and the subclass's modes in between
        self._calls = 0

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self._buf += text
        while self._step(out):
            pass
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        buf, self._buf = self._buf, ""
        if self._mode == "text":
            # Whitespace after the calls is the model's line ending, not an answer.
            if not (self._calls and not buf.strip()):
                out.text = buf
        elif self._mode == "raw":
            # A call naming no offered tool: the model's text, not a call.
            out.text = self._START + buf
        else:
            self._finish_call(out)
        self._mode = "text"
        return out

    def _finish_call(self, out: Parsed) -> None:
        """The output ended inside a call (cut by max_tokens)."""

    def _step(self, out: Parsed) -> bool:
        """Consume what can be decided from the buffer now; True to be called again."""
        buf = self._buf
        if self._mode == "text":
            at = buf.find(self._START)
            if at != -1:
                # The whitespace before a call separates it from the text; it is not part of the answer.
                out.text += buf[:at].rstrip()
                self._buf = buf[at + len(self._START) :]
                self._mode = "head"
                return True
            keep = partial_suffix(buf, self._START)
            cut = len(buf) - keep
            while cut > 0 and buf[cut - 1].isspace():
                cut -= 1
            out.text += buf[:cut]
            self._buf = buf[cut:]
            return False
        if self._mode in ("tail", "raw"):
            end = buf.find(self._END)
            if end == -1:
                return False
            if self._mode == "raw":
                out.text += self._START + buf[: end + len(self._END)]
            self._buf = buf[end + len(self._END) :]
            self._mode = "text"
            return True
        return self._step_call(out)

    @abc.abstractmethod
    def _step_call(self, out: Parsed) -> bool:
        """Read the inside of a call (modes from "head" on); True to be called again."""


class HermesParser(TaggedCallParser):
    def __init__(self, tools: frozenset[str]) -> None:
        super().__init__()
        self._tools = tools
        self._args: _JsonValueEnd | None = None

    # In "head" the output ended inside a call's opening: an incomplete trailing call is dropped, never shown as text
    # (tool-call markup in `content` breaks the clients that bound the tools). In "args" the output was cut short
    # mid-arguments. Nothing to add either way (the inherited _finish_call).

    def _step_call(self, out: Parsed) -> bool:
        buf = self._buf
        if self._mode == "head":
            end = buf.find(self._END)
            head = _HERMES_HEAD.match(buf)
            if head is not None and head.end() < len(buf) and (end == -1 or head.end() <= end):
                name = json.loads(f'"{head.group(1)}"')
                if name in self._tools:
                    out.calls.append(ToolCallDelta(self._calls, id=new_call_id(), name=name))
                    self._calls += 1
                    self._args = _JsonValueEnd()
                    self._buf = buf[head.end() :]
                    self._mode = "args"
                    return True
                self._mode = "raw"
                return True
            if end == -1:
                return False
            # Not in the usual key order: decide on the whole call.
            body = buf[:end]
            self._buf = buf[end + len(self._END) :]
            self._mode = "text"
            call = _whole_call(body, self._tools)
            if call is None:
                out.text += self._START + body + self._END
            else:
                out.calls.append(ToolCallDelta(self._calls, id=new_call_id(), name=call[0], arguments=call[1]))
                self._calls += 1
            return True
        if self._mode == "args":
            assert self._args is not None
            used = self._args.feed(buf)
            if used:
                out.calls.append(ToolCallDelta(self._calls - 1, arguments=buf[:used]))
            self._buf = buf[used:]
            if self._args.done:
                self._mode = "tail"
                return True
            return False
        raise AssertionError(self._mode)


def _whole_call(body: str, tools: frozenset[str]) -> tuple[str, str] | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in tools:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        return call["name"], arguments
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class _JsonValueEnd:
    """Finds where one JSON value ends in text that arrives in pieces (strings, escapes and nesting aware)."""

    def __init__(self) -> None:
        self.done = False
        self._depth = 0
        self._started = False
        self._in_string = False
        self._escaped = False
        self._scalar = False

    def feed(self, text: str) -> int:
        """How many characters of `text` belong to the value; `done` once it ended."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return i + 1
                continue
            if self._scalar:
                if ch in ",}] \t\r\n<":
                    self.done = True
                    return i
                continue
            if ch in "{[":
                self._depth += 1
                self._started = True
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.done = True
                    return i + 1
            elif ch == '"':
                self._in_string = True
                self._started = True
            elif ch == "<":
                # Not JSON: the model closed the call without finishing its arguments.
                self.done = True
                return i
            elif not ch.isspace() and not self._started:
                self._scalar = True
                self._started = True
        return len(text)


# ---------------------------------------------------------------------------------------------- registry

from service.engines.qwen3_coder import Qwen3CoderFormat  # noqa: E402  (it builds on the names above)

FORMATS: dict[str, type] = {HermesFormat.name: HermesFormat, Qwen3CoderFormat.name: Qwen3CoderFormat}
DEFAULT_FORMAT = HermesFormat.name


def tool_format(name: str, template: str = "") -> ToolCallFormat:
    """The format named `name`; `auto` reads the model's chat template (XML calls: qwen3_coder, else hermes)."""
    if name == "auto":
        name = Qwen3CoderFormat.name if "<function=" in template else HermesFormat.name
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(FORMATS))}") from None


class ToolCallExtractor:
    """Turns the text of every choice of one request into text and tool calls, as deltas stream out.

    A choice that stopped after making calls finishes with TOOL_CALLS."""

    def __init__(self, fmt: ToolCallFormat, tools: tuple[Tool, ...], n: int) -> None:
        self._parsers = [fmt.parser(tools) for _ in range(n)]

    def apply(self, delta: ChoiceDelta) -> ChoiceDelta:
        parser = self._parsers[delta.index]
        parsed = parser.feed(delta.text) if delta.text else Parsed()
        if delta.finish_reason is not None:
            tail = parser.finish()
            parsed.text += tail.text
            parsed.calls += tail.calls
            if parser.calls and delta.finish_reason is FinishReason.STOP:
                delta.finish_reason = FinishReason.TOOL_CALLS
        delta.text = parsed.text
        delta.tool_calls = parsed.calls
        return delta
