"""The request pipeline: the one place that turns a domain `GenerateRequest` into engine work and the engine's
tokens into `GenerateOutput`s, the same way for every backend.

    validate → render and tokenize the prompt (off the loop; the service's chat-template defaults under the
    request's) → resolve sampling against the model's defaults → the backend's refusals → compile the grammar
    (off the loop) → one job per choice → stream → detokenize → reasoning apart from the answer → end tokens and
    stop strings → log probabilities → merge the n choices → tool calls → usage

A backend (service/engines/base.py) only generates token ids for one choice at a time. Its streams feed a
mailbox that merges what the reader has not taken yet, so a slow reader gets fewer, fuller outputs and
nothing queues per message. A choice that ends here (a stop string, an end token the engine did not stop on)
or a request that ends early (the caller left, a deadline, a failure) closes its engine streams, which aborts
them in the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from service.domain import (
    ChatInput,
    ChoiceDelta,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    Input,
    ModelInfo,
    ResolvedSampling,
    SamplingParams,
    TextInput,
    TokenLogprob,
    TopLogprob,
    Usage,
    check_input_size,
    resolve,
    validate_request,
)
from service.engines import reasoning
from service.engines.base import Backend, ChoiceJob, Codec, EngineStats, RawLogprob, TokenChunk
from service.engines.reasoning import ReasoningSplitter, ThinkingBudget
from service.engines.text import StopMatcher
from service.engines.tool_calls import ToolCallExtractor, ToolCallFormat, tool_format
from service.errors import EngineFailure, InvalidArgument, ServiceError, Unavailable

log = logging.getLogger(__name__)

# Seeds are int64 on every engine (SGLang checks sampling_seed against that range).
SEED_RANGE = 2**63


class ChoiceDecoder:
    """Turns one choice's token chunks into the deltas a caller sees: text, ids, log probabilities, the finish.

    An end token (the model's, or one of the caller's stop_token_ids) ends the choice and is not output, though
    it counts as generated. A stop string ends it too and is never streamed: text that could be the start of
    one is held back until it is known not to be (StopMatcher). With a reasoning parser, the model's thinking goes
    to `reasoning` and only the answer is matched against stop strings (and read for tool calls)."""

    def __init__(
        self,
        index: int,
        codec: Codec,
        sampling: ResolvedSampling,
        job: ChoiceJob,
        want_logprobs: bool,
        reasoning_parser: str = "none",
    ) -> None:
        self.index = index
        self._codec = codec
        self._decode = codec.detokenizer(sampling.skip_special_tokens, job.prompt_ids)
        self._split = ReasoningSplitter(reasoning_parser)
        self._stops = StopMatcher(sampling.stop)
        self._end_ids = frozenset(job.end_ids)
        self._caller_stop_ids = frozenset(sampling.stop_token_ids)
        self._want_logprobs = want_logprobs
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.cached_tokens: int | None = None
        self.done = False
        # The engine ended the choice itself; otherwise its stream is still open when the choice is done here.
        self.engine_finished = False

    def feed(self, chunk: TokenChunk) -> ChoiceDelta | None:
        if self.cached_tokens is None:
            self.cached_tokens = chunk.cached_tokens
        if self.done:
            return None
        delta = ChoiceDelta(index=self.index, logprobs=[] if self._want_logprobs else None)
        for i, token in enumerate(chunk.token_ids):
            self.completion_tokens += 1
            if token in self._end_ids:
                delta.finish_reason = FinishReason.STOP
                if token in self._caller_stop_ids:
                    delta.stop_token_id = token
                break
            thinking = self._split.thinking
            thought, answer = self._split.feed(self._decode(token))
            if thinking or thought or self._split.thinking:
                self.reasoning_tokens += 1
            delta.reasoning += thought
            text, matched = self._stops.feed(answer)
            delta.text += text
            delta.token_ids.append(token)
            if delta.logprobs is not None:
                delta.logprobs.append(self._logprob(token, chunk.logprobs[i]))
            if matched is not None:
                delta.finish_reason = FinishReason.STOP
                delta.stop_string = matched
                break
        if delta.finish_reason is None:
            delta.finish_reason = chunk.finished
        if delta.finish_reason is not None:
            self.done = True
            self.engine_finished = chunk.finished is not None
            if delta.stop_string is None:
                thought, answer = self._split.flush()
                delta.reasoning += thought
                text, matched = self._stops.feed(answer)
                delta.text += text if matched is not None else text + self._stops.flush()
                if matched is not None:
                    delta.finish_reason, delta.stop_string = FinishReason.STOP, matched
        if not delta.text and not delta.reasoning and not delta.token_ids and delta.finish_reason is None:
            return None
        return delta

    def _logprob(self, token: int, raw: RawLogprob) -> TokenLogprob:
        text, data = self._codec.token_repr(token)
        top = []
        for tid, logprob in raw.top:
            t_text, t_data = self._codec.token_repr(tid)
            top.append(TopLogprob(token_id=tid, token=t_text, logprob=logprob, token_bytes=t_data))
        return TokenLogprob(token_id=token, token=text, logprob=raw.logprob, token_bytes=data, top=top)


class _Mailbox:
    """Where a request's choice streams leave their chunks for the reader: merged per choice until taken."""

    def __init__(self) -> None:
        self._pending: dict[int, TokenChunk] = {}
        self._error: ServiceError | None = None
        self._ready = asyncio.Event()

    def put(self, index: int, chunk: TokenChunk) -> None:
        held = self._pending.get(index)
        if held is None:
            self._pending[index] = chunk
        else:
            held.extend(chunk)
        self._ready.set()

    def fail(self, error: ServiceError) -> None:
        if self._error is None:
            self._error = error
        self._ready.set()

    async def take(self) -> dict[int, TokenChunk]:
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        taken, self._pending = self._pending, {}
        return taken


class Pipeline:
    """The service's engine: a backend behind the one request pipeline."""

    def __init__(
        self,
        backend: Backend,
        tool_calls: ToolCallFormat | str,
        reasoning_parser: str = "auto",
        template_defaults: dict[str, Any] | None = None,
        max_reasoning_tokens: int | None = None,
    ) -> None:
        self._backend = backend
        # A format, or a --tool-parser name resolved at start (auto reads the model's template).
        self._tool_format = tool_calls
        self._reasoning_flag = reasoning_parser
        self.reasoning_parser = "none"  # chosen at start, from the flag and the model's template
        self._template_defaults = dict(template_defaults or {})
        self._max_reasoning_tokens = max_reasoning_tokens
        self._ready = False
        self._inflight: set[_Mailbox] = set()
        # Chat templates, tokenization and grammar compilation: milliseconds, or a second for a huge prompt. They run
        # on threads the OS schedules after the engine's (nice 10), so a huge request waits rather than slowing every
        # stream in flight on a machine with few cores.
        self._prep = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="prepare", initializer=_lower_priority)

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        """True from the end of `start` until `stop`: requests before or after are refused as UNAVAILABLE."""
        return self._ready

    @property
    def info(self) -> ModelInfo:
        if not self._ready:
            raise Unavailable("the engine is starting; retry shortly")
        return self._backend.info

    @property
    def backend(self) -> Backend:
        return self._backend

    async def start(self) -> None:
        await self._backend.start()
        template = self._backend.codec.template_text()
        self.reasoning_parser = reasoning.choose(self._reasoning_flag, template)
        if isinstance(self._tool_format, str):
            self._tool_format = tool_format(self._tool_format, template)
        if self.reasoning_parser != "none":
            log.info("reasoning parser: %s", self.reasoning_parser)
        self._ready = True
        # One tiny generation through the whole path, so a broken engine fails at start, not on a caller, and the
        # first caller does not pay for the first batch's set-up.
        warm_up = GenerateRequest("warmup", TextInput("Hello"), SamplingParams(max_tokens=2, temperature=0.0))
        async for _ in self.generate(warm_up):
            pass

    async def stop(self) -> None:
        self._ready = False
        for mailbox in list(self._inflight):
            mailbox.fail(Unavailable("the engine is shutting down"))
        await self._backend.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)

    async def _prepare(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    def is_alive(self) -> bool:
        return self._ready and self._backend.is_alive()

    def stats(self) -> EngineStats:
        return self._backend.stats()

    def leftovers(self) -> dict[str, int]:
        """What requests leave behind: the pipeline's own open requests and the backend's state; all zero once
        nothing is in flight (for tests and soaks)."""
        return {"open_requests": len(self._inflight), **self._backend.leftovers()}

    def metrics_collectors(self) -> list[Any]:
        return self._backend.metrics_collectors()

    def inject_fault(self) -> None:
        self._backend.inject_fault()

    # ------------------------------------------------------------------------------ requests

    async def count_tokens(self, input: Input) -> int:
        """The number of prompt tokens `input` renders to, exactly as `generate` would."""
        info = self.info
        check_input_size(input, info.context_length)
        return len(await self._prepare(self._backend.codec.prompt_ids, self._with_defaults(input)))

    def _with_defaults(self, input: Input) -> Input:
        """A chat with the service's chat-template defaults (--chat-template-kwargs) under its own variables."""
        if not self._template_defaults or not isinstance(input, ChatInput):
            return input
        merged = {**self._template_defaults, **input.template_variables()}
        return dataclasses.replace(input, template_kwargs=json.dumps(merged))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream the outputs of one request; the last output carries usage.

        Closing the iterator early aborts every choice in the engine at once. Raises InvalidArgument for a
        request the model cannot take, before the first output; Unavailable while the engine is not serving;
        EngineFailure when the engine fails it.
        """
        if not self.is_alive():
            raise Unavailable("the engine is not running")
        backend = self._backend
        info = backend.info
        validate_request(request, info)
        # Chat template and tokenizer: milliseconds, or seconds for a long prompt; off the event loop, so the
        # streams in flight keep flowing meanwhile.
        # Refused early when it cannot fit the window (a huge prompt is found out on a prefix).
        prompt_ids = await self._prepare(backend.codec.prompt_ids, self._with_defaults(request.input),
                                         info.context_length - 1)
        sampling = resolve(request.sampling, backend.defaults, len(prompt_ids), info)
        backend.refuse(sampling)
        thinks = self._thinks(request.input)
        thinking = self._thinking_budget(sampling, prompt_ids) if thinks else None
        grammar = None
        if request.constraint is not None or request.tools:
            # Milliseconds (cached per grammar text), a large schema longer: off the event loop.
            grammar = await self._prepare(self._grammar, request, thinks)
        end_ids = () if sampling.ignore_eos else backend.end_ids
        end_ids += tuple(t for t in sampling.stop_token_ids if t not in end_ids)
        jobs = [
            ChoiceJob(
                # The caller's id stays in front for debugging; the random part keeps engine ids unique (SGLang
                # aborts by rid prefix, so it is long).
                rid=f"{request.request_id}/{i}/{uuid.uuid4().hex}",
                index=i,
                prompt_ids=prompt_ids,
                sampling=sampling,
                seed=None if sampling.seed is None else (sampling.seed + i) % SEED_RANGE,
                end_ids=end_ids,
                top_logprobs=request.top_logprobs,
                grammar=grammar,
                thinking=thinking,
            )
            for i in range(request.n)
        ]
        want_logprobs = request.top_logprobs is not None
        # Reasoning is a chat's: a text completion continues its prompt as it is.
        parser = self.reasoning_parser if isinstance(request.input, ChatInput) else "none"
        decoders = [ChoiceDecoder(j.index, backend.codec, sampling, j, want_logprobs, parser) for j in jobs]
        tools = ToolCallExtractor(self._tool_format, request.tools, request.n) if request.tools else None
        mailbox = _Mailbox()
        self._inflight.add(mailbox)
        streams = [asyncio.create_task(self._stream(job, mailbox), name=job.rid) for job in jobs]
        try:
            live = len(jobs)
            while live:
                ready = await mailbox.take()
                deltas = []
                for index in sorted(ready):
                    decoder = decoders[index]
                    if decoder.done:
                        continue
                    delta = decoder.feed(ready[index])
                    if decoder.done:
                        live -= 1
                        if not decoder.engine_finished:
                            # Ended here (a stop string): free its sequence and KV cache in the engine now.
                            streams[index].cancel()
                    if delta is not None:
                        deltas.append(tools.apply(delta) if tools is not None else delta)
                usage = None
                if not live:
                    cached = [d.cached_tokens for d in decoders if d.cached_tokens is not None]
                    usage = Usage(
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=sum(d.completion_tokens for d in decoders),
                        reasoning_tokens=sum(d.reasoning_tokens for d in decoders),
                        # The least any choice found cached: what was cached before this request, not what one
                        # choice found in the cache a sibling had just filled.
                        cached_tokens=min(cached, default=0),
                    )
                if deltas or usage is not None:
                    yield GenerateOutput(deltas, usage)
        finally:
            self._inflight.discard(mailbox)
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*streams, return_exceptions=True)

    def _thinks(self, input: Input) -> bool:
        """Whether the model will think before answering this request (a reasoning parser, thinking not off)."""
        if self.reasoning_parser == "none" or not isinstance(input, ChatInput):
            return False
        return self._with_defaults(input).template_variables().get("enable_thinking", True) is not False

    def _thinking_budget(self, sampling: ResolvedSampling, prompt_ids: list[int]) -> ThinkingBudget | None:
        budget = sampling.max_reasoning_tokens
        budget = self._max_reasoning_tokens if budget is None else budget
        if budget is None:
            return None
        ids = self._backend.codec.think_ids()
        if ids is None:
            raise InvalidArgument("sampling.max_reasoning_tokens", "this model has no thinking tags to close")
        return ThinkingBudget.for_prompt(budget, ids, prompt_ids)

    def _grammar(self, request: GenerateRequest, thinks: bool) -> Any:
        from service.engines.grammar import after_thinking, grammar_for

        spec = grammar_for(request, self._tool_format)
        if spec is None:
            return None
        # response_format and tools constrain the answer, after a free thinking block; the raw regex / ebnf extras
        # are the caller's grammar over the whole output, thinking included.
        if thinks and (request.tools or request.constraint.kind in ("json_schema", "json_object")):
            spec = after_thinking(spec, self.reasoning_parser)
        return self._backend.compile_grammar(spec)

    async def _stream(self, job: ChoiceJob, mailbox: _Mailbox) -> None:
        """Reads one choice's engine stream into the mailbox; whatever it raises ends the request, mapped."""
        try:
            async with contextlib.aclosing(self._backend.generate(job)) as chunks:
                async for chunk in chunks:
                    mailbox.put(job.index, chunk)
                    if chunk.finished is not None:
                        return
            log.error("the engine ended choice %s without finishing it", job.rid)
            mailbox.fail(EngineFailure("the engine failed while generating this request"))
        except asyncio.CancelledError:
            raise
        except ServiceError as e:
            mailbox.fail(e)
        except Exception:
            log.exception("the engine failed choice %s", job.rid)
            mailbox.fail(EngineFailure("the engine failed while generating this request"))


def _lower_priority() -> None:
    """Lower this thread's scheduling priority (Linux: per thread); elsewhere, or where refused, keep it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
