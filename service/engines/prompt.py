"""Turning an input (chat messages, text or token ids) into prompt token ids with the model's tokenizer."""

from __future__ import annotations

from typing import Any

from service.domain import ChatInput, Input, TextInput, TokenInput
from service.errors import InvalidArgument

CHAT_ROLES = frozenset({"system", "user", "assistant"})


class PromptRenderer:
    """Applies the model's chat template and tokenizes, the same way for every engine."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            self.has_chat_template = False
        else:
            self.has_chat_template = True

    def render_chat(self, chat: ChatInput) -> str:
        if not self.has_chat_template:
            raise InvalidArgument("input.chat", "this model has no chat template; send a text prompt instead")
        messages = []
        for i, m in enumerate(chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"input.chat.messages[{i}].role",
                    f"unsupported role {m.role!r}; use one of {', '.join(sorted(CHAT_ROLES))}",
                )
            message: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.name:
                message["name"] = m.name
            messages.append(message)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=chat.add_generation_prompt
            )
        except Exception as e:  # jinja2.TemplateError and friends: the template refused these messages
            raise InvalidArgument("input.chat.messages", f"the model's chat template rejected the messages: {e}") from e

    def token_ids(self, input: Input) -> list[int]:
        match input:
            case ChatInput():
                # The template already holds the special tokens (BOS, role markers).
                return self.tokenizer.encode(self.render_chat(input), add_special_tokens=False)
            case TextInput(text=text):
                return self.tokenizer.encode(text, add_special_tokens=True)
            case TokenInput(ids=ids):
                return list(ids)
        raise InvalidArgument("input", "input must hold chat messages, a text prompt or token ids")
