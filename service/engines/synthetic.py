"""A benchmark-only engine (`--engine synthetic`): placeholder tokens at a set rate, no model, never the default.

It exists to measure the serving stack's own cost and ceiling (gRPC, gateway, SSE) without model noise. Like a
real batch engine it advances every running sequence together, one step at a time: each stream gets
`synthetic_tokens_per_s`, and `synthetic_total_tokens_per_s` (when set) is shared by all running streams, so
"20,000 tokens/s across 256 streams" is `--synthetic-tokens-per-s 0 --synthetic-total-tokens-per-s 20000`.
`--synthetic-tokens-per-step N` gives each stream N tokens per step, i.e. per output message, at the same rate:
what a stream interval (several tokens per message) would save the stack.
Production does not wait for the reader: a reader that falls behind gets everything produced since its last
read in one chunk.

A `Backend` (service/engines/base.py) like the real engines: its tokens go through the same pipeline. Every token
is a 4-character word (" the", " and", ...) so a client can count tokens from text length alone. Prompt tokens are
counted by a fixed rule (4 characters a token, `SyntheticCodec`), EOS does not exist here (a choice ends with
`length` unless a stop string ends it), and `cached_tokens` is always 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.domain import (
    ChatInput,
    FinishReason,
    Input,
    ModelInfo,
    ResolvedSampling,
    SamplingDefaults,
    TextInput,
    TokenInput,
)
from service.engines.base import ChoiceJob, EngineStats, RawLogprob, TokenChunk
from service.errors import Unavailable

if TYPE_CHECKING:
    from service.config import ServiceConfig

log = logging.getLogger(__name__)

NAME = "synthetic"
VOCAB_SIZE = 49152
DEFAULT_CONTEXT = 32768
# What a request without max_tokens gets: enough to stream for a while, bounded like the real default model.
DEFAULT_MAX_TOKENS = 256
CHARS_PER_TOKEN = 4
# Every word is exactly CHARS_PER_TOKEN characters, so tokens = len(text) // CHARS_PER_TOKEN.
WORDS = (
    " the", " and", " for", " you", " not", " are", " but", " all", " any", " can", " had", " her", " was",
    " one", " our", " out", " day", " get", " has", " him", " his", " how", " man", " new", " now", " old",
    " see", " two", " way", " who", " boy", " did", " its", " let", " put", " say", " she", " too", " use",
)
FIRST_TOKEN_ID = 1000
# Steps are at least this far apart (the event loop's timers are not finer); a faster rate gives several
# tokens per step, as a real engine gives several tokens per step to a speculative or multi-token decoder.
MIN_STEP_S = 0.001
# A step is never longer than this, so a change of rate (streams joining a shared rate) is noticed quickly.
MAX_STEP_S = 1.0


def token_text(position: int) -> str:
    return WORDS[position % len(WORDS)]


def token_id(position: int) -> int:
    return FIRST_TOKEN_ID + position % len(WORDS)


def count_prompt_tokens(input: Input) -> int:
    """A fixed rule instead of a tokenizer: 4 characters a token, plus 4 per chat message for its template."""
    match input:
        case TokenInput(ids=ids):
            return len(ids)
        case TextInput(text=text):
            return max(1, len(text) // CHARS_PER_TOKEN)
        case ChatInput(messages=messages, add_generation_prompt=add):
            chars = sum(len(m.content) for m in messages)
            return max(1, chars // CHARS_PER_TOKEN + 4 * len(messages) + (3 if add else 0))
    raise TypeError(f"unknown input {input!r}")


@dataclass(slots=True, eq=False)
class _Stream:
    """One choice: what the engine produced and what its reader has taken. Counters only, so a slow reader
    costs no memory however far it falls behind."""

    max_tokens: int
    wake: asyncio.Event
    produced: int = 0
    delivered: int = 0
    credit: float = 0.0
    # Not running yet: waiting out its synthetic time to first token.
    pending_first: bool = True
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class SyntheticEngine:
    name = NAME

    def __init__(self, config: ServiceConfig) -> None:
        per_stream = config.synthetic_tokens_per_s
        total = config.synthetic_total_tokens_per_s
        if per_stream < 0 or total < 0 or config.synthetic_ttft_s < 0:
            raise ValueError("synthetic engine rates and time to first token must not be negative")
        if config.synthetic_tokens_per_step < 1:
            raise ValueError("the synthetic engine gives at least one token per step")
        if per_stream == 0 and total == 0:
            raise ValueError("the synthetic engine needs a rate: --synthetic-tokens-per-s or --synthetic-total-tokens-per-s")
        self._per_stream = per_stream or math.inf
        self._total = total or math.inf
        self._ttft = config.synthetic_ttft_s
        self._step_tokens = config.synthetic_tokens_per_step
        context = config.context_length or DEFAULT_CONTEXT
        self.info = ModelInfo(
            name=config.served_model_name or NAME,
            engine=NAME,
            context_length=context,
            max_output_tokens=min(config.max_output_tokens, context),
            vocab_size=VOCAB_SIZE,
            created=int(time.time()),
        )
        self.defaults = SamplingDefaults(max_tokens=DEFAULT_MAX_TOKENS)
        self.codec = SyntheticCodec()
        self.end_ids: tuple[int, ...] = ()  # no end token: a choice ends at its length or a stop string
        self._running: set[_Stream] = set()
        self._pending = 0
        self._has_work: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._alive = False
        # Tokens produced since start: lets a benchmark compare what was made with what was delivered.
        self.produced_tokens = 0

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        log.warning(
            "the SYNTHETIC engine is running: it serves no model and answers placeholder text, for benchmarking "
            "the serving stack only (%s tokens/s per stream, %s tokens/s shared, first token after %.3f s)",
            "unlimited" if math.isinf(self._per_stream) else f"{self._per_stream:g}",
            "unlimited" if math.isinf(self._total) else f"{self._total:g}",
            self._ttft,
        )
        self._has_work = asyncio.Event()
        self._task = asyncio.create_task(self._steps(), name="synthetic-engine")
        self._alive = True

    async def stop(self) -> None:
        self._alive = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for stream in list(self._running):
            stream.wake.set()  # readers notice the engine stopped

    def is_alive(self) -> bool:
        return self._alive and self._task is not None and not self._task.done()

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=self._pending)

    # ------------------------------------------------------------------------------ the step loop

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._has_work is not None
        last = loop.time()
        while True:
            if not self._running:
                self._has_work.clear()
                await self._has_work.wait()
                last = loop.time()
            rate = self._stream_rate()
            await asyncio.sleep(min(MAX_STEP_S, max(MIN_STEP_S, self._step_tokens / rate)))
            now = loop.time()
            # Credit by elapsed time, not by steps: a late wake-up (a busy loop) gives more tokens, not fewer.
            self._advance(min(now - last, 1.0) * self._stream_rate())
            last = now

    def _stream_rate(self) -> float:
        running = len(self._running) or 1
        return min(self._per_stream, self._total / running)

    def _advance(self, credit: float) -> None:
        finished = []
        step = self._step_tokens
        for s in self._running:
            s.credit += credit
            remaining = s.max_tokens - s.produced
            whole = int(s.credit)
            # Whole steps only (the last one may be short): each output then carries `step` tokens.
            tokens = remaining if whole >= remaining else whole - whole % step
            if tokens <= 0:
                continue
            s.credit -= tokens
            s.produced += tokens
            self.produced_tokens += tokens
            s.wake.set()
            if s.produced >= s.max_tokens:
                finished.append(s)
        for s in finished:
            self._running.discard(s)

    def _admit(self, s: _Stream) -> None:
        """The stream's 'prefill' is over: it gets its first token now and joins the running batch."""
        s.timer = None
        if not s.pending_first:
            return
        s.pending_first = False
        self._pending -= 1
        s.produced = 1
        self.produced_tokens += 1
        s.wake.set()
        if s.produced < s.max_tokens:
            self._running.add(s)
            assert self._has_work is not None
            self._has_work.set()

    def _drop(self, s: _Stream) -> None:
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if s.pending_first:
            s.pending_first = False
            self._pending -= 1
        self._running.discard(s)

    # ------------------------------------------------------------------------------ jobs

    def refuse(self, sampling: ResolvedSampling) -> None:
        """Sampling changes nothing here: every choice is the same placeholder text."""

    def compile_grammar(self, spec: object) -> None:
        """Grammars are not enforced: the placeholder text is what it is."""
        return None

    async def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        s = _Stream(job.sampling.max_tokens, asyncio.Event())
        self._pending += 1
        if self._ttft > 0:
            s.timer = asyncio.get_running_loop().call_later(self._ttft, self._admit, s)
        else:
            self._admit(s)
        try:
            while True:
                await s.wake.wait()
                s.wake.clear()
                if not self._alive:
                    raise Unavailable("the engine stopped")
                if s.produced == s.delivered:
                    continue
                positions = range(s.delivered, s.produced)
                s.delivered = s.produced
                done = s.delivered >= s.max_tokens
                chunk = TokenChunk(
                    token_ids=[token_id(p) for p in positions],
                    finished=FinishReason.LENGTH if done else None,
                    cached_tokens=0,
                )
                if job.top_logprobs is not None:
                    chunk.logprobs = [_logprob(p, job.top_logprobs) for p in positions]
                yield chunk
                if done:
                    return
        finally:
            self._drop(s)

    def leftovers(self) -> dict[str, int]:
        return {"running": len(self._running), "pending": self._pending}

    def metrics_collectors(self) -> list:
        return []

    def inject_fault(self) -> None:
        """Stop the step loop, as a crashed engine loop would."""
        log.warning("fault injection: the synthetic engine's step loop stops")
        if self._task is not None:
            self._task.cancel()


class SyntheticCodec:
    """The `Codec` of a model that does not exist: prompts are counted by a fixed rule (`count_prompt_tokens`) and
    every token id spells one word."""

    def prompt_ids(self, input: Input, limit: int | None = None) -> list[int]:
        if isinstance(input, TokenInput):
            return list(input.ids)
        return [FIRST_TOKEN_ID] * count_prompt_tokens(input)

    def detokenizer(self, skip_special_tokens: bool, prompt_ids: list[int]):
        return self.text

    def template_text(self) -> str:
        return ""

    def think_ids(self) -> None:
        return None

    def token_repr(self, token: int) -> tuple[str, bytes]:
        text = self.text(token)
        return text, text.encode()

    @staticmethod
    def text(token: int) -> str:
        offset = token - FIRST_TOKEN_ID
        return WORDS[offset] if 0 <= offset < len(WORDS) else ""


def _logprob(position: int, top: int) -> RawLogprob:
    return RawLogprob(0.0, [(token_id(position + k), -float(k)) for k in range(top)])
