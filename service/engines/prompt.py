"""Turning an input (chat messages, text or token ids) into prompt token ids with the model's tokenizer.

Tools: a chat template that uses `tools` (Qwen2.5, Llama 3.1, Hermes, ...) renders them, the assistant messages'
tool calls and the tool results itself. For a template that knows no tools (SmolLM2's), the tool-call format
writes them into the messages the way a Hermes-style template would: a system block describing the tools and
the call syntax, calls as `<tool_call>` text, results as `<tool_response>` blocks in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

from service.domain import (
    ChatInput,
    Input,
    Message,
    TextInput,
    TokenInput,
    validate_continuation,
    validate_messages,
    validate_template_kwargs,
    validate_tools,
)
from service.engines.tool_calls import HermesFormat, ToolCallFormat, tool_json
from service.errors import InvalidArgument

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


class PromptRenderer:
    """Applies the model's chat template and tokenizes, the same way for every engine."""

    def __init__(self, tokenizer: Any, tool_format: ToolCallFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.tool_format = tool_format or HermesFormat()
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        templates = template.values() if isinstance(template, dict) else [template or ""]
        self.template_knows_tools = any("tools" in t for t in templates)

    def render_chat(self, chat: ChatInput) -> str:
        if not self.has_chat_template:
            raise InvalidArgument("input.chat", "this model has no chat template; send a text prompt instead")
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"input.chat.messages[{i}].role",
                    f"unsupported role {m.role!r}; use one of {', '.join(sorted(CHAT_ROLES))}",
                )
        # Rendering reads tool schemas and call arguments as JSON: check them here too, since CountTokens
        # renders without the rest of a request's validation.
        validate_messages(chat.messages)
        validate_continuation(chat)
        validate_tools(chat)
        validate_template_kwargs(chat.template_kwargs)
        tools = chat.offered_tools
        # The caller's template variables (enable_thinking, ...), over the service's defaults.
        kwargs: dict[str, Any] = chat.template_variables()
        if self.template_knows_tools:
            messages = [_template_message(m) for m in chat.messages]
            if tools:
                kwargs["tools"] = [tool_json(t) for t in tools]
        else:
            messages = self._fold_tools(chat)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message, **kwargs
            )
        except Exception as e:  # jinja2.TemplateError and friends: the template refused these messages
            raise InvalidArgument("input.chat.messages", f"the model's chat template rejected the messages: {e}") from e

    def _fold_tools(self, chat: ChatInput) -> list[dict[str, Any]]:
        """The messages for a template without tools: tools, calls and results written as text."""
        fmt = self.tool_format
        messages: list[dict[str, Any]] = []
        results: list[str] = []
        for m in chat.messages:
            if m.role != "tool" and results:
                messages.append({"role": "user", "content": fmt.render_results(results)})
                results = []
            if m.role == "tool":
                results.append(m.content)
            elif m.role == "assistant" and m.tool_calls:
                messages.append({"role": "assistant", "content": fmt.render_calls(m)})
            else:
                messages.append(_plain_message(m))
        if results:
            messages.append({"role": "user", "content": fmt.render_results(results)})
        tools = chat.offered_tools
        if tools:
            block = fmt.system_prompt(tools)
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{block}"}
            else:
                messages.insert(0, {"role": "system", "content": block})
        return messages

    def token_ids(self, input: Input, limit: int | None = None) -> list[int]:
        """The prompt's token ids. With `limit`, a prompt that has more tokens than that is refused (InvalidArgument)
        and a huge one is found out on a prefix: tokenizing all of it would take a core for a while to learn only
        that it does not fit."""
        match input:
            case ChatInput():
                # The template already holds the special tokens (BOS, role markers).
                return self._encode(self.render_chat(input), False, limit)
            case TextInput(text=text):
                return self._encode(text, True, limit)
            case TokenInput(ids=ids):
                return list(ids)
        raise InvalidArgument("input", "input must hold chat messages, a text prompt or token ids")

    def _encode(self, text: str, special: bool, limit: int | None) -> list[int]:
        probe = None if limit is None else limit * PROBE_CHARS_PER_TOKEN
        if probe is not None and len(text) > probe:
            # Tokens of a prefix are (to a token or two at the cut) at most those of the whole.
            head = self.tokenizer.encode(text[:probe], add_special_tokens=special)
            if len(head) > limit + 2:
                raise InvalidArgument(
                    "input",
                    f"the prompt is more than {len(head)} tokens long, but the model's context window is {limit} "
                    "tokens; shorten the prompt",
                )
        return self.tokenizer.encode(text, add_special_tokens=special)


# A prompt longer than this many characters per token of the context window is first tokenized on a prefix of that
# length: text runs 3 to 5 characters a token, so the prefix alone already shows that a huge prompt cannot fit.
PROBE_CHARS_PER_TOKEN = 8


def _plain_message(m: Message) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.reasoning_content:  # for templates that render earlier thinking (Qwen3's reads reasoning_content)
        message["reasoning_content"] = m.reasoning_content
    return message


def _template_message(m: Message) -> dict[str, Any]:
    """A message as tool-aware chat templates read it: calls with their arguments as a mapping (Qwen's template
    writes `arguments | tojson`), results with the id of their call."""
    message = _plain_message(m)
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message
