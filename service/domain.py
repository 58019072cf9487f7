"""The service's own request and output types and their validation.

Engines and the pipeline see only these types; protobuf is converted at the servicer's edge (service/wire.py).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from service.errors import InvalidArgument

MAX_CHOICES = 16
MAX_MESSAGES = 2048
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128
# A JSON schema, regex or grammar longer than this is refused before anything compiles it.
MAX_CONSTRAINT_CHARS = 256 * 1024
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "ebnf")


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made, as it appears in a chat's history."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages
    tool_call_id: str | None = None  # tool messages
    reasoning_content: str | None = None  # assistant messages: the thinking before the content


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""  # JSON Schema text of the arguments; "" means none

    def parameters_schema(self) -> dict:
        return json.loads(self.parameters) if self.parameters else {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: str = "auto"  # "none", "auto", "required" or "function"
    function: str | None = None  # the tool to call, with mode "function"

    @property
    def forced(self) -> bool:
        """The model must call a tool (constrained decoding) and writes no text."""
        return self.mode in ("required", "function")


@dataclass(frozen=True, slots=True)
class ChatInput:
    messages: tuple[Message, ...]
    add_generation_prompt: bool = True
    # The last (assistant) message is a prefill the answer continues, not a closed turn.
    continue_final_message: bool = False
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    # Extra chat-template variables, as JSON object text ("" for none), e.g. '{"enable_thinking": false}'.
    template_kwargs: str = ""

    def template_variables(self) -> dict:
        return json.loads(self.template_kwargs) if self.template_kwargs else {}

    @property
    def offered_tools(self) -> tuple[Tool, ...]:
        """The tools the model sees and may call: none at all with tool_choice "none"."""
        return () if self.tool_choice.mode == "none" else self.tools


@dataclass(frozen=True, slots=True)
class TextInput:
    text: str


@dataclass(frozen=True, slots=True)
class TokenInput:
    ids: tuple[int, ...]


Input = ChatInput | TextInput | TokenInput


@dataclass(frozen=True, slots=True)
class Constraint:
    """Structured output: a grammar the output must match (constrained decoding)."""

    kind: str  # one of CONSTRAINT_KINDS
    value: str = ""  # the JSON Schema text, the regex or the EBNF grammar; empty for json_object

    @property
    def field(self) -> str:
        """The request field that holds it, for error messages."""
        return f"constraint.{self.kind}"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling as the caller asked for it. None means "the model's default" (see `resolve`)."""

    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    skip_special_tokens: bool = True
    max_reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The model's own sampling defaults, from its generation config."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # Output length when a request leaves max_tokens unset; None fills what the context window leaves.
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ResolvedSampling:
    """Sampling with every default filled in: what an engine actually runs."""

    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    seed: int | None
    logit_bias: Mapping[int, float]
    skip_special_tokens: bool
    max_reasoning_tokens: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    input: Input
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    # None: no log probabilities. An int: log probabilities with that many top alternatives per token.
    top_logprobs: int | None = None
    constraint: Constraint | None = None

    @property
    def tools(self) -> tuple[Tool, ...]:
        """The tools offered to the model (so its calls are parsed out of its text)."""
        return self.input.offered_tools if isinstance(self.input, ChatInput) else ()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    engine: str
    context_length: int
    max_output_tokens: int
    vocab_size: int
    created: int


# ---------------------------------------------------------------------------------------------- outputs


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    token_bytes: bytes


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    token_bytes: bytes
    top: list[TopLogprob]


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a tool call being made: id and name on its first delta, then fragments of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    reasoning: str = ""  # thinking text, kept apart from `text` (see service/engines/reasoning.py)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    stop_token_id: int | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def merge(self, later: ChoiceDelta) -> None:
        """Append a later delta of the same choice to this one (used when the reader falls behind)."""
        self.text += later.text
        self.reasoning += later.reasoning
        self.token_ids.extend(later.token_ids)
        for call in later.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(call)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.stop_string = later.stop_string
            self.stop_token_id = later.stop_token_id


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # of completion_tokens


@dataclass(slots=True)
class GenerateOutput:
    """One step of a generation: the choices that advanced, and usage on the last output only."""

    choices: list[ChoiceDelta]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------- validation


def validate_sampling(s: SamplingParams, vocab_size: int) -> None:
    """Range checks shared by every engine. Raises InvalidArgument naming the field."""

    def check(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise InvalidArgument(f"sampling.{name}", message)

    def finite(name: str, value: float | None) -> None:
        check(value is None or math.isfinite(value), name, f"{name} must be a finite number")

    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        finite(name, getattr(s, name))
    check(s.max_tokens is None or s.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1")
    check(s.min_tokens >= 0, "min_tokens", "min_tokens must not be negative")
    check(
        s.max_tokens is None or s.min_tokens <= s.max_tokens,
        "min_tokens",
        "min_tokens must not exceed max_tokens",
    )
    check(s.temperature is None or 0 <= s.temperature <= 2, "temperature", "temperature must be between 0 and 2")
    check(s.top_p is None or 0 < s.top_p <= 1, "top_p", "top_p must be greater than 0 and at most 1")
    check(s.top_k is None or s.top_k >= -1, "top_k", "top_k must be -1, 0 (no cut) or a positive number")
    check(s.min_p is None or 0 <= s.min_p <= 1, "min_p", "min_p must be between 0 and 1")
    check(-2 <= s.frequency_penalty <= 2, "frequency_penalty", "frequency_penalty must be between -2 and 2")
    check(-2 <= s.presence_penalty <= 2, "presence_penalty", "presence_penalty must be between -2 and 2")
    check(
        s.repetition_penalty is None or 0 < s.repetition_penalty <= 2,
        "repetition_penalty",
        "repetition_penalty must be greater than 0 and at most 2",
    )
    check(len(s.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    check(all(s.stop), "stop", "stop strings must not be empty")
    check(
        all(0 <= t < vocab_size for t in s.stop_token_ids),
        "stop_token_ids",
        f"stop_token_ids must be token ids below the vocabulary size ({vocab_size})",
    )
    check(len(s.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
    for token, bias in s.logit_bias.items():
        check(0 <= token < vocab_size, "logit_bias", f"logit_bias token {token} is not in the vocabulary")
        check(math.isfinite(bias) and -100 <= bias <= 100, "logit_bias", "logit_bias values must be between -100 and 100")


def _json(text: str, field: str, what: str, kinds: tuple[type, ...] = (dict,)):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidArgument(field, f"{what} is not valid JSON") from None
    if not isinstance(value, kinds):
        raise InvalidArgument(field, f"{what} must be a JSON object")
    return value


def validate_messages(messages: tuple[Message, ...]) -> None:
    for i, m in enumerate(messages):
        at = f"input.chat.messages[{i}]"
        if m.tool_calls and m.role != "assistant":
            raise InvalidArgument(f"{at}.tool_calls", "only assistant messages carry tool_calls")
        for j, call in enumerate(m.tool_calls):
            if not call.name:
                raise InvalidArgument(f"{at}.tool_calls[{j}].name", "a tool call needs the name of its function")
            _json(call.arguments, f"{at}.tool_calls[{j}].arguments", "the arguments of a tool call")
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidArgument(f"{at}.tool_call_id", "a tool message needs the tool_call_id of the call it answers")


def validate_tools(chat: ChatInput) -> None:
    """Names, parameter schemas (as JSON; whether a grammar can be built from them is the engine's to say) and
    tool_choice. Raises InvalidArgument naming the field, e.g. "input.chat.tools[1].parameters"."""
    if len(chat.tools) > MAX_TOOLS:
        raise InvalidArgument("input.chat.tools", f"at most {MAX_TOOLS} tools are allowed")
    names: set[str] = set()
    for i, tool in enumerate(chat.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(
                f"input.chat.tools[{i}].name",
                "a tool's name must be 1 to 64 letters, digits, underscores or dashes",
            )
        if tool.name in names:
            raise InvalidArgument(f"input.chat.tools[{i}].name", f"the tool name {tool.name!r} is given twice")
        names.add(tool.name)
        if len(tool.parameters) > MAX_CONSTRAINT_CHARS:
            raise InvalidArgument(f"input.chat.tools[{i}].parameters", "the parameters schema is too long")
        if tool.parameters:
            _json(tool.parameters, f"input.chat.tools[{i}].parameters", "the parameters schema")
    choice = chat.tool_choice
    if choice.mode not in ("none", "auto", "required", "function"):
        raise InvalidArgument("input.chat.tool_choice", "tool_choice must be none, auto, required or a function")
    if choice.forced and not chat.tools:
        raise InvalidArgument("input.chat.tool_choice", "tool_choice requires a tool call, but no tools are given")
    if choice.mode == "function" and choice.function not in names:
        raise InvalidArgument("input.chat.tool_choice", f"tool_choice names the function {choice.function!r}, which is not among the tools")


def validate_continuation(chat: ChatInput) -> None:
    if not chat.continue_final_message:
        return
    if chat.add_generation_prompt:
        raise InvalidArgument("input.chat.continue_final_message",
                              "continue_final_message needs add_generation_prompt false: the last message is continued, "
                              "no new turn is opened")
    if chat.messages[-1].role != "assistant":
        raise InvalidArgument("input.chat.continue_final_message",
                              "continue_final_message continues the last message, which must be an assistant message")


# Chat-template variables a caller may not set: the renderer's own arguments.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "tokenize",
                                      "continue_final_message", "return_dict", "chat_template", "tokenizer"})
MAX_TEMPLATE_KWARGS_CHARS = 16 * 1024


def validate_template_kwargs(text: str) -> None:
    if not text:
        return
    if len(text) > MAX_TEMPLATE_KWARGS_CHARS:
        raise InvalidArgument("input.chat.chat_template_kwargs", "chat_template_kwargs is too long")
    kwargs = _json(text, "input.chat.chat_template_kwargs", "chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise InvalidArgument("input.chat.chat_template_kwargs",
                              f"chat_template_kwargs may not set {', '.join(reserved)}: the request's own fields do")


def validate_constraint(c: Constraint) -> None:
    """The constraint's shape; whether it compiles is the engine's to say (it raises InvalidArgument then)."""
    if c.kind not in CONSTRAINT_KINDS:
        raise InvalidArgument("constraint", f"unknown constraint kind {c.kind!r}")
    if len(c.value) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(c.field, f"the {c.kind} constraint is longer than {MAX_CONSTRAINT_CHARS} characters")
    if c.kind == "json_schema":
        _json(c.value, c.field, "the JSON schema", (dict, bool))
    elif c.kind in ("regex", "ebnf") and not c.value:
        raise InvalidArgument(c.field, f"the {c.kind} constraint must not be empty")


# A prompt of more characters than this per token of the context window is refused before it is tokenized, which
# would hold a core for seconds to find out (common/bounds.py, shared with the gateway).
from common.bounds import MAX_CHARS_PER_TOKEN  # noqa: E402


def input_chars(input: Input) -> int:
    """The characters a prompt's tokens are made from (text, messages, tool calls and tool definitions)."""
    match input:
        case TextInput(text=text):
            return len(text)
        case ChatInput(messages=messages, tools=tools):
            chars = sum(len(m.content) + sum(len(c.name) + len(c.arguments) for c in m.tool_calls) for m in messages)
            return chars + sum(len(t.name) + len(t.description) + len(t.parameters) for t in tools)
    return 0


def check_input_size(input: Input, context_length: int) -> None:
    chars = input_chars(input)
    if chars > context_length * MAX_CHARS_PER_TOKEN:
        raise InvalidArgument(
            "input",
            f"the prompt is {chars} characters, far more than this model's context window of {context_length} "
            "tokens can hold; shorten it",
        )


def validate_request(request: GenerateRequest, info: ModelInfo) -> None:
    check_input_size(request.input, info.context_length)
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidArgument("n", f"n must be between 1 and {MAX_CHOICES}")
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("logprobs.top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    match request.input:
        case ChatInput(messages=messages):
            if not messages:
                raise InvalidArgument("input.chat.messages", "messages must not be empty")
            if len(messages) > MAX_MESSAGES:
                raise InvalidArgument("input.chat.messages", f"at most {MAX_MESSAGES} messages are allowed")
            validate_messages(messages)
            validate_continuation(request.input)
            validate_tools(request.input)
            validate_template_kwargs(request.input.template_kwargs)
            if request.constraint is not None and request.input.tool_choice.forced:
                raise InvalidArgument(
                    request.constraint.field,
                    "a constraint cannot be combined with a tool_choice that requires a tool call: the call's "
                    "arguments are already constrained to the tool's parameters",
                )
        case TextInput(text=text):
            if not text:
                raise InvalidArgument("input.text", "the prompt must not be empty")
        case TokenInput(ids=ids):
            if not ids:
                raise InvalidArgument("input.token_ids", "token_ids must not be empty")
            if any(i >= info.vocab_size for i in ids):
                raise InvalidArgument("input.token_ids", f"token ids must be below the vocabulary size ({info.vocab_size})")
    validate_sampling(request.sampling, info.vocab_size)
    if request.constraint is not None:
        validate_constraint(request.constraint)
    if request.sampling.ignore_eos and (request.constraint is not None or request.tools):
        # A grammar ends the output with an end token once it is complete; ignore_eos would forbid that.
        raise InvalidArgument("sampling.ignore_eos", "ignore_eos cannot be combined with structured output or tools")


def resolve(
    s: SamplingParams, defaults: SamplingDefaults, prompt_tokens: int, info: ModelInfo
) -> ResolvedSampling:
    """Fill in the model's defaults and fit max_tokens to the context window; raise if it cannot fit."""
    room = info.context_length - prompt_tokens
    if room < 1:
        raise InvalidArgument(
            "input",
            f"the prompt is {prompt_tokens} tokens long, but the model's context window is "
            f"{info.context_length} tokens; shorten the prompt",
        )
    if s.max_tokens is None:
        max_tokens = min(room, info.max_output_tokens, defaults.max_tokens or room)
    elif s.max_tokens > room:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({s.max_tokens}) exceeds the model's context "
            f"window of {info.context_length} tokens; ask for at most {room} tokens",
        )
    elif s.max_tokens > info.max_output_tokens:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"max_tokens ({s.max_tokens}) exceeds this service's output limit of {info.max_output_tokens} tokens",
        )
    else:
        max_tokens = s.max_tokens
    top_k = defaults.top_k if s.top_k is None else s.top_k
    return ResolvedSampling(
        max_tokens=max_tokens,
        min_tokens=s.min_tokens,
        temperature=defaults.temperature if s.temperature is None else s.temperature,
        top_p=defaults.top_p if s.top_p is None else s.top_p,
        top_k=0 if top_k < 0 else top_k,
        min_p=defaults.min_p if s.min_p is None else s.min_p,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        repetition_penalty=defaults.repetition_penalty if s.repetition_penalty is None else s.repetition_penalty,
        stop=s.stop,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        seed=s.seed,
        logit_bias=s.logit_bias,
        skip_special_tokens=s.skip_special_tokens,
        max_reasoning_tokens=s.max_reasoning_tokens,
    )
