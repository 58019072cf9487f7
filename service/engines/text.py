"""Incremental detokenization and stop-string matching for engines that produce one token at a time."""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns token ids into text as they arrive, holding back bytes that do not complete a character yet.

    Uses the tokenizers library's own `DecodeStream`, which handles byte-fallback and multi-byte UTF-8.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, prompt_ids: list[int] | None = None) -> None:
        self._backend = tokenizer.backend_tokenizer
        # Seeding with the prompt's tail lets the first token decode with its leading space intact.
        self._stream = DecodeStream(ids=(prompt_ids or [])[-4:], skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


def partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of a stop string: text that must be held
    back until it is known not to start one."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class StopMatcher:
    """Finds stop strings in streamed text. Text that might be the start of a stop string is held back until
    it is known not to be one, so a stop string is never streamed out and then taken back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop string matched or None). After a match, stop feeding."""
        if not self._stops:
            return text, None
        pending = self._held + text
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = pending.find(stop)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._held = ""
            return pending[: best[0]], best[1]
        keep = partial_stop_len(pending, self._stops)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], None

    def flush(self) -> str:
        """The held-back text, once the choice ended without a stop string."""
        held, self._held = self._held, ""
        return held
