"""The grammar a request's output must match (constrained decoding), built once for every engine.

Structured output (`response_format`, regex, EBNF) and tool calls both become one `GrammarSpec`: a JSON schema, a
regex or an EBNF grammar, in the forms SGLang's `json_schema` / `regex` / `ebnf` sampling keys take, which the
transformers engine compiles with XGrammar (the grammar library SGLang itself uses by default, so a grammar means
the same on both engines).

Tool calls: the grammar forces the exact text of the model's call syntax (`ToolCallFormat`), with each call's
arguments following its tool's parameter schema, so the parser always reads a valid call:
- tool_choice "required" or a named function: one or more calls (one with parallel_tool_calls false), no text;
- "auto": free text, but once the model opens a call (the format's trigger, `<tool_call>`) the call must be
  complete and valid; with a response_format as well, either the formatted answer or tool calls.

Grammars are checked here (XGrammar parses them, no tokenizer needed), so a bad schema is an InvalidArgument naming
its field before any engine sees it. So are JSON-schema keywords XGrammar accepts but does not enforce (`not`,
`uniqueItems`, a several-part `allOf`, an unknown string `format`, a `pattern` together with a length or a format):
an answer that does not validate against its schema would break the promise that it always does.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import xgrammar as xgr

from service.domain import ChatInput, Constraint, GenerateRequest, Tool, ToolChoice
from service.engines.tool_calls import ToolCallFormat, tool_format
from service.errors import InvalidArgument

JSON_OBJECT_SCHEMA = '{"type": "object"}'
# What XGrammar raises for a grammar it cannot use: RuntimeError from its C++ side (RecursionError is one too),
# ValueError and TypeError (pydantic's ValidationError included) from its Python side; ours is a ValueError.
_GRAMMAR_ERRORS = (RuntimeError, ValueError, TypeError)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: str  # "json_schema", "regex" or "ebnf": SGLang's sampling key
    text: str
    field: str  # the request field it came from, for errors


def grammar_for(request: GenerateRequest, fmt: ToolCallFormat) -> GrammarSpec | None:
    """The grammar of this request's output, checked; None when the output is free."""
    constraint = request.constraint
    tools = request.tools
    if tools:
        chat = request.input
        assert isinstance(chat, ChatInput)
        for i, tool in enumerate(chat.tools):
            if tool in tools:
                _check_schema(_parameters(tool), f"input.chat.tools[{i}].parameters")
        if constraint is not None:
            check(_constraint_spec(constraint))
        try:
            ebnf = _tool_grammar(fmt.name, tools, chat.tool_choice, chat.parallel_tool_calls, constraint)
        except _GRAMMAR_ERRORS as e:
            raise InvalidArgument("input.chat.tools", f"no grammar can be built for these tools: {_reason(e)}") from None
        return GrammarSpec("ebnf", ebnf, "input.chat.tools")
    if constraint is None:
        return None
    spec = _constraint_spec(constraint)
    check(spec)
    return spec


def after_thinking(spec: GrammarSpec, parser: str) -> GrammarSpec:
    """`spec` for the answer, after a free thinking block (Qwen3: `<think>`...`</think>` and a blank line; a
    qwen3-thinking model's output starts inside the block). Grammars are otherwise applied from the first token,
    which would leave a thinking model no room to think (what users of SGLang and vLLM report as broken structured
    output with Qwen3)."""
    if spec.kind == "json_schema":
        answer = {"type": "grammar", "grammar": _json_grammar(spec.text)}
    elif spec.kind == "regex":
        answer = {"type": "regex", "pattern": spec.text}
    else:
        answer = {"type": "grammar", "grammar": spec.text}
    begin = "" if parser == "qwen3-thinking" else "<think>"
    # The first </think> ends the thinking (any_text stops at its tag's end); Qwen puts a blank line after it.
    think = {"type": "tag", "begin": begin, "content": {"type": "any_text"}, "end": "</think>"}
    blank = {"type": "const_string", "value": "\n\n"}
    root = {"type": "structural_tag", "format": {"type": "sequence", "elements": [think, blank, answer]}}
    return GrammarSpec("ebnf", str(xgr.Grammar.from_structural_tag(json.dumps(root))), spec.field)


def check(spec: GrammarSpec) -> None:
    """Raise InvalidArgument naming the field when XGrammar cannot read the grammar or would not enforce it."""
    try:
        if spec.kind == "json_schema":
            _check_enforced(json.loads(spec.text))
            _json_grammar(spec.text)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.text)
        else:
            xgr.Grammar.from_ebnf(spec.text)
    except _GRAMMAR_ERRORS as e:
        raise InvalidArgument(spec.field, f"the {_WHAT[spec.kind]} cannot be used: {_reason(e)}") from None


def compile_grammar(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    """Compile for one tokenizer (the transformers engine). XGrammar caches compiled grammars by their text."""
    try:
        if spec.kind == "json_schema":
            # Compact JSON (", " and ": " only): no runs of whitespace a small model could get lost in, and fewer
            # tokens on a slow CPU. SGLang's own default allows any whitespace; both are valid JSON.
            return compiler.compile_json_schema(spec.text, any_whitespace=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.text)
        return compiler.compile_grammar(spec.text)
    except _GRAMMAR_ERRORS as e:
        raise InvalidArgument(spec.field, f"the {_WHAT[spec.kind]} cannot be used: {_reason(e)}") from None


# ---------------------------------------------------------------------------------------------- internals

_WHAT = {"json_schema": "JSON schema", "regex": "regular expression", "ebnf": "grammar"}
# XGrammar's C++ errors start with a time and a source location: "[13:45:51] /project/cpp/x.cc:83: ".
_LOCATION = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


def _reason(error: Exception) -> str:
    text = _LOCATION.sub("", str(error).strip()).strip() or type(error).__name__
    return text[:300]


def _constraint_spec(c: Constraint) -> GrammarSpec:
    if c.kind == "json_object":
        return GrammarSpec("json_schema", JSON_OBJECT_SCHEMA, c.field)
    return GrammarSpec(c.kind, c.value, c.field)


@functools.lru_cache(maxsize=256)
def _json_grammar(schema: str) -> str:
    """The EBNF of a JSON schema (compact JSON), cached by the schema's text."""
    return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))


def _parameters(tool: Tool) -> str:
    # The schema's own text: its property order is the order the arguments are written in.
    return tool.parameters or '{"type": "object", "properties": {}}'


def _check_schema(schema: str, field: str) -> None:
    try:
        _check_enforced(json.loads(schema))
        _json_grammar(schema)
    except _GRAMMAR_ERRORS as e:
        raise InvalidArgument(field, f"the parameters schema cannot be used: {_reason(e)}") from None


# Keywords XGrammar (0.2.7 and 0.2.8, probed) reads but lets outputs violate.
_NOT_ENFORCED = ("not", "uniqueItems")
# String formats XGrammar enforces; others it ignores.
_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                      "uri-reference", "uri-template", "uuid", "json-pointer", "relative-json-pointer"})
_ONE_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames", "if", "then",
                  "else", "not", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("items", "prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class _NotEnforced(ValueError):
    pass


def _check_enforced(schema: object, at: str = "#") -> None:
    """Raise _NotEnforced (with a JSON pointer) for a part of the schema XGrammar would not enforce."""
    if not isinstance(schema, dict):
        return
    for keyword in _NOT_ENFORCED:
        if keyword in schema:
            raise _NotEnforced(f"{keyword!r} at {at} is not supported for constrained decoding")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise _NotEnforced(f"'allOf' with more than one schema at {at} is not supported for constrained decoding")
    if "format" in schema and schema["format"] not in _FORMATS and schema.get("type", "string") in ("string", None):
        raise _NotEnforced(f"the string format {schema['format']!r} at {at} is not supported for constrained decoding")
    string_rules = [k for k in ("format", "pattern") if k in schema]
    if "minLength" in schema or "maxLength" in schema:
        string_rules.append("minLength/maxLength")
    if len(string_rules) > 1:
        raise _NotEnforced(f"{' with '.join(string_rules)} at {at} cannot be enforced together; use one of them")
    for keyword in _ONE_SUBSCHEMA:
        _check_enforced(schema.get(keyword), f"{at}/{keyword}")
    for keyword in _SUBSCHEMA_LISTS:
        children = schema.get(keyword)
        if isinstance(children, list):
            for i, child in enumerate(children):
                _check_enforced(child, f"{at}/{keyword}/{i}")
    for keyword in _SUBSCHEMA_MAPS:
        children = schema.get(keyword)
        if isinstance(children, dict):
            for name, child in children.items():
                _check_enforced(child, f"{at}/{keyword}/{str(name).replace('~', '~0').replace('/', '~1')}")


def _constraint_format(c: Constraint) -> dict:
    if c.kind == "regex":
        return {"type": "regex", "pattern": c.value}
    if c.kind == "ebnf":
        return {"type": "grammar", "grammar": c.value}
    return {"type": "grammar", "grammar": _json_grammar(JSON_OBJECT_SCHEMA if c.kind == "json_object" else c.value)}


@functools.lru_cache(maxsize=256)
def _tool_grammar(
    fmt_name: str, tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool, constraint: Constraint | None
) -> str:
    fmt = tool_format(fmt_name)
    callable_tools = [t for t in tools if choice.mode != "function" or t.name == choice.function]
    if choice.mode == "function":
        # A named function is one call of it, as OpenAI answers it: otherwise a small model tends to open a second
        # call of the same function and spend the rest of its budget on it.
        parallel = False
    tags = [
        {
            "type": "tag",
            "begin": fmt.call_begin(t.name),
            "content": (_xml_arguments(t) if getattr(fmt, "arguments", "json") == "xml"
                        else {"type": "grammar", "grammar": _json_grammar(_parameters(t))}),
            "end": fmt.call_end,
        }
        for t in callable_tools
    ]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": fmt.separator, "at_least_one": True,
             "stop_after_first": not parallel}
    if choice.forced:
        root: dict = calls
    elif constraint is not None:
        root = {"type": "or", "elements": [_constraint_format(constraint), calls]}
    else:
        root = {"type": "triggered_tags", "triggers": [fmt.trigger], "tags": tags, "at_least_one": False,
                "stop_after_first": not parallel}
    grammar = xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": root}))
    return str(grammar)


def _xml_arguments(tool: Tool) -> dict:
    """A call's parameters in the XML syntax (service/engines/qwen3_coder.py), in the schema's order: each
    `<parameter=NAME>` tag once, the required ones always, each value shaped by its type."""
    schema = tool.parameters_schema()
    required = set(schema.get("required") or ())
    elements = []
    for name, sub in (schema.get("properties") or {}).items():
        tag = {"type": "tag", "begin": f"<parameter={name}>\n", "content": _xml_value(sub if isinstance(sub, dict) else {}),
               "end": "\n</parameter>\n"}
        elements.append(tag if name in required else {"type": "or", "elements": [tag, {"type": "const_string", "value": ""}]})
    if not elements:
        return {"type": "const_string", "value": ""}
    return elements[0] if len(elements) == 1 else {"type": "sequence", "elements": elements}


def _xml_value(schema: dict) -> dict:
    """A parameter's value as the model writes it: strings as raw text, numbers and booleans bare, the rest as JSON
    under its schema (as qwen3_coder.typed reads it back)."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return {"type": "regex", "pattern": "|".join(re.escape(e) for e in enum)}
    if kinds == ["string"] and isinstance(schema.get("pattern"), str):
        return {"type": "regex", "pattern": schema["pattern"]}
    if kinds == ["string"] and ("maxLength" in schema or "minLength" in schema):
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        return {"type": "regex", "pattern": f"[^<]{{{low},{'' if high is None else int(high)}}}"}
    if kinds == ["string"] or (not kinds and not enum):
        return {"type": "any_text"}  # any text up to the tag's end
    # Digits are bounded (int64, and as many for a number's parts), so a value always ends.
    if kinds == ["integer"]:
        return {"type": "regex", "pattern": r"-?(0|[1-9][0-9]{0,17})"}
    if kinds == ["number"]:
        return {"type": "regex", "pattern": r"-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,3})?"}
    if kinds == ["boolean"]:
        return {"type": "regex", "pattern": "true|false"}
    return {"type": "json_schema", "json_schema": schema}
