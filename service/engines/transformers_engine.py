"""The embedded CPU engine: a Hugging Face model under transformers' continuous batching.

Continuous batching runs on the library's own generation thread with a paged KV cache whose complete pages
are shared between requests with the same prefix (block sharing), so a repeated system prompt is not
recomputed; `cached_tokens` reports how many prompt tokens were reused. Each choice of a request is one
sequence in the batch; outputs arrive on the event loop through the library's result handlers.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from service.domain import (
    ChoiceDelta,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    Input,
    ModelInfo,
    ResolvedSampling,
    TokenLogprob,
    TopLogprob,
    Usage,
    resolve,
    validate_request,
)
from service.engines.base import EngineStats
from service.engines.default_model import ensure_default_model
from service.engines.grammar import compile_grammar, grammar_for
from service.engines.hf_model import model_name as _model_name
from service.engines.hf_model import sampling_defaults as _sampling_defaults
from service.engines.hf_model import token_bytes as _token_bytes
from service.engines.prompt import PromptRenderer
from service.engines.sampling import RequestSampler, SamplingPlan
from service.engines.text import IncrementalDetokenizer, StopMatcher
from service.engines.tool_calls import ToolCallExtractor, tool_format
from service.errors import EngineFailure, Unavailable

if TYPE_CHECKING:
    from service.config import ServiceConfig

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_TOKENS = 32768
# How often outputs stranded after a cancel are dropped (see TransformersEngine._sweep_stranded).
STRANDED_SWEEP_S = 1.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    def __init__(self, config: ServiceConfig) -> None:
        self._config = config
        self._info: ModelInfo | None = None
        self._manager = None
        self._sampler = RequestSampler()
        self._alive = False
        self._sweeper: asyncio.Task | None = None
        self._token_text: dict[int, tuple[str, bytes]] = {}
        self._tool_format = tool_format(config.tool_parser)

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def info(self) -> ModelInfo:
        assert self._info is not None, "engine not started"
        return self._info

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        # Inference mode is thread-local and the generation thread inherits the caller's: start it in one.
        with torch.inference_mode():
            self._manager.start()
        self._alive = True
        self._sweeper = asyncio.create_task(self._sweep_stranded())
        await self._warm_up()

    async def _sweep_stranded(self) -> None:
        """Drop outputs stranded in the library's shared output queue.

        Every request here has a result handler, removed when the choice closes. A cancel is only queued, though:
        the generation thread may still deliver outputs for that request, and with no handler left the library
        puts them on its `output_queue`, which nothing here reads, so they would pile up forever (one early close
        or stop-string end at a time). Nothing else uses that queue, so whatever is in it is stranded."""
        while True:
            await asyncio.sleep(STRANDED_SWEEP_S)
            self._drop_stranded()

    def _drop_stranded(self) -> int:
        stranded = self._manager.output_router.output_queue
        dropped = 0
        while True:
            try:
                stranded.get_nowait()
            except queue.Empty:
                return dropped
            dropped += 1

    def leftovers(self) -> dict[str, int]:
        """What requests leave behind in the engine: all zero once nothing is in flight (for tests and soaks)."""
        router = self._manager.output_router
        with router._lock:
            handlers = len(router.result_handlers)
        return {"stranded_outputs": router.output_queue.qsize(), "result_handlers": handlers,
                "sampling_plans": len(self._sampler)}

    def _load(self) -> None:
        config = self._config
        path = Path(config.model) if config.model else ensure_default_model()
        dtype = _DTYPES.get(config.dtype, torch.float32)  # "auto": float32, the fast path on CPUs without bf16 units
        if config.threads:
            # Process-wide, so the generation thread started later computes with the same count.
            torch.set_num_threads(config.threads)
        started = time.monotonic()
        # The weight-loading progress bar is for a terminal, not for a service log (one line below says it all).
        hf_logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        self._model = model
        self._renderer = PromptRenderer(self._tokenizer, self._tool_format)
        self._defaults = _sampling_defaults(model.generation_config)
        self._eos_ids = _eos_ids(model.generation_config, self._tokenizer)
        # The logits can be wider than the tokenizer's vocabulary (padding rows); the bitmask covers them all.
        self._grammars = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=model.config.vocab_size),
            max_threads=2,
            cache_limit_bytes=256 * 1024 * 1024,
        )
        context_length = config.context_length or getattr(model.config, "max_position_embeddings", None) or 4096
        self._info = ModelInfo(
            name=config.served_model_name or _model_name(path),
            engine="transformers",
            context_length=context_length,
            max_output_tokens=min(config.max_output_tokens, context_length),
            vocab_size=model.config.vocab_size,
            created=int(time.time()),
        )
        page_size = config.page_size
        generation_config = GenerationConfig(
            # Our sampler picks every non-greedy token itself and leaves it as the argmax (see sampling.py).
            do_sample=False,
            max_new_tokens=self._info.max_output_tokens,
            eos_token_id=self._eos_ids,
            pad_token_id=self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._eos_ids[0],
        )
        cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=max(1, (config.kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS) // page_size),
            max_batch_tokens=config.max_batch_tokens,
            max_requests_per_batch=config.max_running,
            allow_block_sharing=True,
            scheduler_type="fifo",
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        self._manager.logit_processor = self._sampler
        log.info(
            "loaded %s (%s, %.0fM parameters, context %d) in %.1f s",
            path,
            str(dtype).removeprefix("torch."),
            sum(p.numel() for p in model.parameters()) / 1e6,
            context_length,
            time.monotonic() - started,
        )

    async def _warm_up(self) -> None:
        """One tiny generation, so the first caller does not pay for the first batch's set-up."""
        from service.domain import SamplingParams, TextInput

        request = GenerateRequest(
            request_id="warmup", input=TextInput("Hello"), sampling=SamplingParams(max_tokens=2, temperature=0.0)
        )
        async for _ in self.generate(request):
            pass

    async def stop(self) -> None:
        self._alive = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._manager is not None and self._manager.is_running():
            await asyncio.to_thread(self._manager.stop, block=True, timeout=30, hard_stop=True)

    def inject_fault(self) -> None:
        """Crash the generation loop at its next step (only reachable with --enable-fault-injection)."""
        log.warning("fault injection: the engine loop will fail at its next step")
        self._sampler.inject_fault("injected engine fault")

    def is_alive(self) -> bool:
        manager = self._manager
        return (
            self._alive
            and manager is not None
            and manager.is_running()
            and manager.background_thread_status.fatal_error is None
        )

    def stats(self) -> EngineStats:
        processor = self._manager.batch_processor if self._manager is not None else None
        if processor is None:
            return EngineStats(running=0, waiting=len(self._sampler))
        scheduler = processor.scheduler
        running = len(scheduler.active_requests)
        return EngineStats(running=running, waiting=max(0, len(self._sampler) - running))

    # ------------------------------------------------------------------------------ requests

    def count_tokens(self, input: Input) -> int:
        return len(self._renderer.token_ids(input))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if not self.is_alive():
            raise Unavailable("the engine is not running")
        validate_request(request, self.info)
        # Chat template and tokenizer: milliseconds, or seconds for a long prompt; off the event loop, so the
        # streams in flight keep flowing meanwhile.
        prompt_ids = await asyncio.to_thread(self._renderer.token_ids, request.input)
        sampling = resolve(request.sampling, self._defaults, len(prompt_ids), self.info)
        end_ids = [] if sampling.ignore_eos else list(self._eos_ids)
        end_ids += [t for t in sampling.stop_token_ids if t not in end_ids]
        grammar = None
        if request.constraint is not None or request.tools:
            # Milliseconds (cached per grammar text), a large schema longer: off the event loop.
            grammar = await asyncio.to_thread(self._grammar, request)
        tools = ToolCallExtractor(self._tool_format, request.tools, request.n) if request.tools else None

        outputs: asyncio.Queue = asyncio.Queue()
        choices = [
            self._open_choice(i, request, sampling, prompt_ids, end_ids, outputs, grammar) for i in range(request.n)
        ]
        try:
            for c in choices:
                self._manager.add_request(
                    prompt_ids,
                    request_id=c.rid,
                    max_new_tokens=sampling.max_tokens,
                    streaming=True,
                    # -1 is "no end token" for the library: with ignore_eos and no stop tokens nothing ends early.
                    eos_token_id=end_ids or -1,
                )
            live = len(choices)
            while live:
                ready = [await outputs.get()]
                # Whatever else arrived meanwhile goes into the same output: a slow reader gets fewer, larger
                # messages instead of an ever-growing queue. Outputs are cumulative, so the newest per choice wins.
                while not outputs.empty():
                    ready.append(outputs.get_nowait())
                newest = {index: out for index, out in ready}
                deltas = []
                for index, out in sorted(newest.items()):
                    choice = choices[index]
                    if choice.done:
                        continue
                    delta = self._advance(choice, out, sampling)
                    if delta is not None:
                        deltas.append(tools.apply(delta) if tools is not None else delta)
                    if choice.done:
                        live -= 1
                usage = None
                if not live:
                    usage = Usage(
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=sum(c.completion_tokens for c in choices),
                        cached_tokens=choices[0].plan.cached_tokens or 0,
                    )
                if deltas or usage is not None:
                    yield GenerateOutput(deltas, usage)
        finally:
            for c in choices:
                self._close_choice(c)

    def _grammar(self, request: GenerateRequest) -> xgr.CompiledGrammar | None:
        spec = grammar_for(request, self._tool_format)
        return compile_grammar(self._grammars, spec) if spec is not None else None

    def _open_choice(
        self,
        index: int,
        request: GenerateRequest,
        sampling: ResolvedSampling,
        prompt_ids: list[int],
        end_ids: list[int],
        outputs: asyncio.Queue,
        grammar: xgr.CompiledGrammar | None = None,
    ) -> _Choice:
        # Engine-side ids are unique even when callers reuse theirs; the caller's id stays in front for debugging.
        rid = f"{request.request_id}/{index}/{uuid.uuid4().hex[:8]}"
        seed = None if sampling.seed is None else (sampling.seed + index) % 2**64
        plan = SamplingPlan.build(sampling, end_ids, prompt_ids, request.top_logprobs, seed, grammar)
        self._sampler.register(rid, plan)
        self._manager.register_result_handler(rid, lambda out: outputs.put_nowait((index, out)))
        return _Choice(
            index=index,
            rid=rid,
            plan=plan,
            detokenizer=IncrementalDetokenizer(self._tokenizer, sampling.skip_special_tokens, prompt_ids),
            stops=StopMatcher(sampling.stop),
            end_ids=frozenset(end_ids),
            user_stop_ids=frozenset(sampling.stop_token_ids),
            want_logprobs=request.top_logprobs is not None,
        )

    def _close_choice(self, c: _Choice) -> None:
        if not c.finished_in_engine:
            # The caller went away or a stop string ended the choice: free its sequence and KV pages now.
            self._manager.cancel_request(c.rid)
        # The library drops a result handler only when its request finishes; a cancelled one would stay.
        with self._manager.output_router._lock:
            self._manager.output_router.result_handlers.pop(c.rid, None)
        self._sampler.release(c.rid)

    def _advance(self, c: _Choice, out, sampling: ResolvedSampling) -> ChoiceDelta | None:
        if out.status == RequestStatus.FAILED:
            c.finished_in_engine = True
            log.error("generation failed for %s: %s", c.rid, out.error)
            raise EngineFailure("the engine failed while generating this request")
        finished = out.status == RequestStatus.FINISHED
        tokens = out.generated_tokens
        delta = ChoiceDelta(index=c.index, logprobs=[] if c.want_logprobs else None)
        for position in range(c.seen, len(tokens)):
            token = tokens[position]
            c.completion_tokens = position + 1
            if token in c.end_ids:
                # End-of-sequence or a stop token: it ends the choice and is not part of the text.
                delta.finish_reason = FinishReason.STOP
                if token in c.user_stop_ids:
                    delta.stop_token_id = token
                break
            text, matched = c.stops.feed(c.detokenizer.step(token))
            delta.text += text
            delta.token_ids.append(token)
            if delta.logprobs is not None:
                delta.logprobs.append(self._logprob(c.plan, position, token))
            if matched is not None:
                delta.finish_reason = FinishReason.STOP
                delta.stop_string = matched
                break
        c.seen = len(tokens)
        if delta.finish_reason is None and finished:
            delta.finish_reason = FinishReason.LENGTH
        if delta.finish_reason is not None:
            c.done = True
            c.finished_in_engine = finished
            if delta.stop_string is None:
                delta.text += c.stops.flush()
        if not delta.text and not delta.token_ids and delta.finish_reason is None:
            return None
        return delta

    def _logprob(self, plan: SamplingPlan, position: int, token: int) -> TokenLogprob:
        record = plan.records[position]
        text, raw = self._token_repr(token)
        top = []
        for tid, lp in zip(record.top_ids, record.top_logprobs):
            t_text, t_raw = self._token_repr(tid)
            top.append(TopLogprob(token_id=tid, token=t_text, logprob=lp, token_bytes=t_raw))
        return TokenLogprob(token_id=token, token=text, logprob=record.logprob, token_bytes=raw, top=top)

    def _token_repr(self, token: int) -> tuple[str, bytes]:
        cached = self._token_text.get(token)
        if cached is None:
            raw = _token_bytes(self._tokenizer, token)
            cached = (raw.decode("utf-8", errors="replace"), raw)
            self._token_text[token] = cached
        return cached


@dataclass(slots=True)
class _Choice:
    index: int
    rid: str
    plan: SamplingPlan
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    end_ids: frozenset[int]
    user_stop_ids: frozenset[int]
    want_logprobs: bool
    seen: int = 0
    completion_tokens: int = 0
    done: bool = False
    finished_in_engine: bool = False


def _eos_ids(generation_config: GenerationConfig, tokenizer) -> list[int]:
    ids: list[int] = []
    for source in (generation_config.eos_token_id, tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids
