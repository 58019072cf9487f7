"""The `Backend` protocol: only what really differs between inference engines, and the small types it speaks.

Everything a request goes through besides generating tokens (validation, the chat template, sampling defaults,
grammars, detokenization, stop strings, tool calls, log probabilities, the n-way merge, usage) is the
pipeline's (service/pipeline.py), defined once for every backend. A backend generates token ids for one choice
at a time and says how it is doing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.domain import FinishReason, Input, ModelInfo, ResolvedSampling, SamplingDefaults


@dataclass(frozen=True, slots=True)
class EngineStats:
    # Sequences (choices) the engine is generating or holds in its own queue.
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class ChoiceJob:
    """One choice of a request, ready for an engine: prompt ids and sampling with every default filled in."""

    rid: str  # unique per choice, also when callers reuse their request ids
    index: int
    prompt_ids: list[int]
    sampling: ResolvedSampling
    # This choice's seed (the request's seed + index), so a seeded request's choices differ and repeat.
    seed: int | None
    # The tokens that end this choice: the model's end tokens (unless ignore_eos) and the caller's stop_token_ids.
    end_ids: tuple[int, ...]
    top_logprobs: int | None  # None: no log probabilities
    grammar: Any = None  # what the backend's `compile_grammar` made, or None
    # A cap on the model's thinking (service/engines/reasoning.py's ThinkingBudget), or None.
    thinking: Any = None


@dataclass(slots=True)
class RawLogprob:
    """The log probability of one generated token and its top alternatives (token id, log probability)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class TokenChunk:
    """New tokens of one choice, in order, since its previous chunk.

    `finished` is set on the last chunk the engine sends for the choice: LENGTH, or STOP when it ended on an end
    token (then the last id is that token) or for a reason of its own. The pipeline decides what the caller sees.
    """

    token_ids: list[int]
    logprobs: list[RawLogprob] | None = None  # one per id, when the job asked for them
    finished: FinishReason | None = None
    # How many prompt tokens the engine found in its prefix cache, once it knows.
    cached_tokens: int | None = None

    def extend(self, later: TokenChunk) -> None:
        """Append a later chunk of the same choice (the reader fell behind)."""
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finished = later.finished or self.finished
        if self.cached_tokens is None:
            self.cached_tokens = later.cached_tokens


class Codec(Protocol):
    """The model's tokenizer, as the pipeline uses it: prompts to ids, ids back to text."""

    def prompt_ids(self, input: Input, limit: int | None = None) -> list[int]:
        """Render (chat template, tools) and tokenize; raises InvalidArgument for input the model cannot take, or
        (with `limit`) for a prompt of more tokens than that."""
        ...

    def detokenizer(self, skip_special_tokens: bool, prompt_ids: list[int]) -> Callable[[int], str]:
        """A function that takes one generated id at a time and returns the text it completes ("" while it is
        part of a character still being spelled)."""
        ...

    def token_repr(self, token: int) -> tuple[str, bytes]:
        """One token's text and exact bytes, for log probabilities."""
        ...

    def template_text(self) -> str:
        """The model's chat template ("" for none), for choosing a reasoning parser."""
        ...

    def think_ids(self) -> tuple[int, int, int] | None:
        """The ids of the thinking tags and of a newline (<think>, </think>, "\n"), or None for a model without."""
        ...


class Backend(Protocol):
    """An inference engine. Errors are the service's own (service/errors.py); nothing here knows gRPC."""

    name: str
    # Set once the engine has started (the pipeline reads them only then):
    info: ModelInfo
    codec: Codec  # the model's tokenizer
    defaults: SamplingDefaults  # the model's sampling defaults, from its generation config
    end_ids: tuple[int, ...]  # the model's end-of-sequence tokens

    async def start(self) -> None:
        """Load the model and start generating; returns once the engine can take jobs."""

    async def stop(self) -> None:
        """Release the model; jobs still open are aborted by the pipeline first."""

    def refuse(self, sampling: ResolvedSampling) -> None:
        """Raise InvalidArgument for sampling this engine cannot honour (rather than silently ignoring it)."""

    def compile_grammar(self, spec: Any) -> Any:
        """The engine's form of a grammar (service/engines/grammar.py's GrammarSpec); runs off the event loop.
        Raises InvalidArgument naming the field when it cannot be used."""
        ...

    def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        """Stream one choice's tokens. Closing the stream early aborts the choice in the engine and releases
        everything it holds there. Raises a ServiceError (InvalidArgument, Overloaded, EngineFailure, ...) when
        the engine refuses or fails it."""
        ...

    def is_alive(self) -> bool:
        """False once the engine has failed for good; the service then stops serving."""
        ...

    def stats(self) -> EngineStats: ...

    def leftovers(self) -> dict[str, int]:
        """What finished jobs left behind inside the engine, by kind: all zero once nothing is in flight."""
        ...

    def metrics_collectors(self) -> list[Any]:
        """Prometheus collectors of the engine's own metrics, served beside the service's."""
        ...

    def inject_fault(self) -> None:
        """Make the engine fail for good, as a crash would (only reachable with --enable-fault-injection)."""
        ...
