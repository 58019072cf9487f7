"""The `Engine` protocol every backend implements, and the small types it reports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from service.domain import GenerateOutput, GenerateRequest, Input, ModelInfo


@dataclass(frozen=True, slots=True)
class EngineStats:
    # Sequences (choices) the engine is generating or holds in its own queue.
    running: int
    waiting: int


class Engine(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    async def start(self) -> None:
        """Load the model and start generating; returns once the engine can take requests."""

    async def stop(self) -> None:
        """Abort what is left and release the model."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream the outputs of one request; the last output carries usage.

        Closing the iterator early (the caller was cancelled) aborts the request in the engine at once.
        Raises InvalidArgument for a request the model cannot take (too long, bad template input) before
        the first output, and EngineFailure if the engine fails it.
        """
        ...

    def count_tokens(self, input: Input) -> int:
        """The number of prompt tokens `input` renders to, exactly as `generate` would."""
        ...

    def is_alive(self) -> bool:
        """False once the engine has failed for good (its loop died); the service then stops serving."""
        ...

    def stats(self) -> EngineStats: ...
