"""Reasoning parsers: split a model's thinking from its answer as the text streams, for every engine alike.

    qwen3           Qwen3 (hybrid): the output may start with `<think>`; what follows up to `</think>` is reasoning.
                    An output that does not start with it (thinking switched off) is all answer.
    qwen3-thinking  Qwen3-2507 "Thinking" models: the template opens `<think>` in the prompt, so the output starts
                    inside the reasoning (an opening tag, if the model writes one anyway, is dropped).
    none            no reasoning: all text is answer.

`auto` (the default) reads the model's chat template: one that switches thinking with `enable_thinking` is qwen3,
another that writes `<think>` is qwen3-thinking, anything else none. Tags never reach the caller; the newline(s)
Qwen writes after `</think>` are dropped from the answer's start.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engines.text import partial_stop_len

OPEN = "<think>"
CLOSE = "</think>"
PARSERS = ("auto", "qwen3", "qwen3-thinking", "none")


def choose(requested: str, template: str) -> str:
    """The parser for `requested` (one of PARSERS) and the model's chat template text."""
    if requested != "auto":
        return requested
    if "enable_thinking" in template:
        return "qwen3"
    if OPEN in template:
        return "qwen3-thinking"
    return "none"


class ReasoningSplitter:
    """Feeds on a choice's decoded text; returns (reasoning, answer) text that is safe to send now.

    Text that might be the start of a tag is held back until it is known not to be one, so a tag is never streamed
    and then taken back."""

    def __init__(self, parser: str) -> None:
        self.enabled = parser in ("qwen3", "qwen3-thinking")
        # "start": not yet known whether the output opens with <think>; "thinking"; "answer".
        self._state = "thinking" if parser == "qwen3-thinking" else ("start" if self.enabled else "answer")
        self._may_open = parser in ("qwen3", "qwen3-thinking")
        self._held = ""
        self._skip_newlines = False

    @property
    def thinking(self) -> bool:
        """Inside the reasoning (not merely at a start that may open it)."""
        return self._state == "thinking"

    def feed(self, text: str) -> tuple[str, str]:
        if not self.enabled:
            return "", text
        reasoning, answer = "", ""
        pending = self._held + text
        self._held = ""
        while pending:
            if self._skip_newlines:  # after a tag: Qwen's newlines around its reasoning are not text
                pending = pending.lstrip("\n")
                if not pending:
                    break
                self._skip_newlines = False
            if self._state == "start" or (self._may_open and self._state == "thinking"):
                stripped = pending.lstrip()
                if stripped.startswith(OPEN):
                    pending = stripped[len(OPEN):]
                    self._state, self._may_open, self._skip_newlines = "thinking", False, True
                    continue
                if OPEN.startswith(stripped):  # could still become <think>: wait for more
                    self._held = pending
                    break
                self._may_open = False
                if self._state == "start":
                    self._state = "answer"
                continue
            if self._state == "thinking":
                at = pending.find(CLOSE)
                if at == -1:
                    keep = partial_stop_len(pending, (CLOSE,))
                    # Newlines that may turn out to come right before </think> wait too.
                    body = pending[: len(pending) - keep].rstrip("\n")
                    reasoning += body
                    self._held = pending[len(body):]
                    break
                reasoning += pending[:at].rstrip("\n")
                pending = pending[at + len(CLOSE):]
                self._state, self._skip_newlines = "answer", True
                continue
            answer += pending
            pending = ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What was held back, once the choice ended: unfinished reasoning stays reasoning."""
        held, self._held = self._held, ""
        if self._state == "thinking":
            return held, ""
        return "", held


@dataclass(frozen=True, slots=True)
class ThinkingBudget:
    """At most `budget` tokens of thinking: then a newline and the end tag are forced (as SGLang's
    ThinkingBudgetLogitProcessor does), so the answer, and a grammar waiting for it, always comes. Tokens are
    counted from the tag that opened the thinking, which may be in the prompt (a template that opens it itself);
    an opening tag repeated inside the thinking does not restart the count. Every engine applies this same rule
    (transformers in service/engines/sampling.py, SGLang through service/engines/sglang_thinking.py)."""

    budget: int
    start_id: int
    end_id: int
    newline_id: int
    # Tokens of thinking the prompt already holds (an opening tag it left open), or None.
    open_in_prompt: int | None = None

    @classmethod
    def for_prompt(cls, budget: int, ids: tuple[int, int, int], prompt_ids: list[int]) -> ThinkingBudget:
        start, end, _ = ids
        opened = _last(prompt_ids, start)
        closed = _last(prompt_ids, end)
        open_in_prompt = len(prompt_ids) - opened - 1 if opened > closed else None
        return cls(budget, *ids, open_in_prompt=open_in_prompt)

    def forced(self, generated: list[int]) -> int | None:
        """The token to force next, or None to sample freely."""
        if self.end_id in generated:
            return None  # the thinking is over
        if self.open_in_prompt is not None:
            thought = self.open_in_prompt + len(generated)
        else:
            try:
                opened = generated.index(self.start_id)
            except ValueError:
                return None  # not thinking
            thought = len(generated) - opened - 1
        if thought < self.budget:
            return None
        return self.end_id if generated and generated[-1] == self.newline_id else self.newline_id


def _last(ids: list[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    return -1
