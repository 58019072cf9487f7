"""The embedded CPU engine: a Hugging Face model under transformers' continuous batching.

Continuous batching runs on the library's own generation thread with a paged KV cache whose complete pages
are shared between requests with the same prefix (block sharing), so a repeated system prompt is not
recomputed; `cached_tokens` reports how many prompt tokens were reused. Each choice of a request is one
sequence in the batch; outputs arrive on the event loop through the library's result handlers. Everything
else a request goes through is the pipeline's (service/pipeline.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from service.domain import FinishReason, ModelInfo, ResolvedSampling, SamplingDefaults
from service.engines.base import ChoiceJob, EngineStats, RawLogprob, TokenChunk
from service.engines.cpu_features import cpu_dtype, cpu_flags
from service.engines.default_model import ensure_default_model
from service.engines.grammar import GrammarSpec, compile_grammar
from service.engines.hf_model import HFCodec, eos_ids, model_name, sampling_defaults
from service.engines.sampling import RequestSampler, SamplingPlan
from service.errors import EngineFailure

if TYPE_CHECKING:
    from service.config import ServiceConfig

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_TOKENS = 32768
# How often outputs stranded after a cancel are dropped (see TransformersEngine._sweep_stranded).
STRANDED_SWEEP_S = 1.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    """A `Backend` (service/engines/base.py): each choice is one sequence of the library's batch."""

    name = "transformers"

    def __init__(self, config: ServiceConfig) -> None:
        self._config = config
        # What the pipeline reads (the Backend protocol), set once the model is loaded.
        self.info: ModelInfo | None = None
        self.codec: HFCodec | None = None
        self.defaults = SamplingDefaults()
        self.end_ids: tuple[int, ...] = ()
        self._manager = None
        self._sampler = RequestSampler()
        self._alive = False
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        # Inference mode is thread-local and the generation thread inherits the caller's: start it in one.
        with torch.inference_mode():
            self._manager.start()
        self._alive = True
        self._sweeper = asyncio.create_task(self._sweep_stranded())

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
        router = self._manager.output_router
        with router._lock:
            handlers = len(router.result_handlers)
        return {"stranded_outputs": router.output_queue.qsize(), "result_handlers": handlers,
                "sampling_plans": len(self._sampler)}

    def _load(self) -> None:
        config = self._config
        model = self._load_model(_DTYPES.get(cpu_dtype(config.dtype, cpu_flags()), torch.float32))
        page_size = config.page_size
        generation_config = GenerationConfig(
            # Our sampler picks every non-greedy token itself and leaves it as the argmax (see sampling.py).
            do_sample=False,
            max_new_tokens=self.info.max_output_tokens,
            eos_token_id=list(self.end_ids),
            pad_token_id=self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self.end_ids[0],
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
        if config.attention == "varlen":
            from service.engines import varlen_attention

            varlen_attention.use(model)
        log.info(
            "loaded %s (%s, %s attention, %.0fM parameters, context %d) in %.1f s",
            self._path,
            str(model.dtype).removeprefix("torch."),
            config.attention,
            sum(p.numel() for p in model.parameters()) / 1e6,
            self.info.context_length,
            time.monotonic() - self._load_started,
        )

    def _load_model(self, dtype: torch.dtype):
        """The tokenizer, codec, sampling defaults, grammar compiler and model info every runner shares; returns the
        loaded transformers model."""
        config = self._config
        path = Path(config.model) if config.model else ensure_default_model()
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
        self._path = path
        self._load_started = started
        self.codec = HFCodec(self._tokenizer, config.tool_parser, config.chat_template)
        self.defaults = sampling_defaults(model.generation_config)
        self.end_ids = eos_ids(model.generation_config, self._tokenizer)
        # The logits can be wider than the tokenizer's vocabulary (padding rows); the bitmask covers them all.
        self._grammars = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=model.config.vocab_size),
            max_threads=2,
            cache_limit_bytes=256 * 1024 * 1024,
        )
        context_length = config.context_length or getattr(model.config, "max_position_embeddings", None) or 4096
        self.info = ModelInfo(
            name=config.served_model_name or model_name(path),
            engine="transformers",
            context_length=context_length,
            max_output_tokens=min(config.max_output_tokens, context_length),
            vocab_size=model.config.vocab_size,
            created=int(time.time()),
        )
        return model

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

    def metrics_collectors(self) -> list:
        return []

    def stats(self) -> EngineStats:
        processor = self._manager.batch_processor if self._manager is not None else None
        if processor is None:
            return EngineStats(running=0, waiting=len(self._sampler))
        scheduler = processor.scheduler
        running = len(scheduler.active_requests)
        return EngineStats(running=running, waiting=max(0, len(self._sampler) - running))

    # ------------------------------------------------------------------------------ jobs

    def refuse(self, sampling: ResolvedSampling) -> None:
        """Every sampling field is honoured here (see sampling.py)."""

    def compile_grammar(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        return compile_grammar(self._grammars, spec)

    async def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        plan = SamplingPlan.build(job.sampling, list(job.end_ids), job.prompt_ids, job.top_logprobs, job.seed, job.grammar,
                                  job.thinking)
        outputs: asyncio.Queue = asyncio.Queue()
        self._sampler.register(job.rid, plan)
        self._manager.register_result_handler(job.rid, outputs.put_nowait)
        finished = False
        seen = 0
        try:
            self._manager.add_request(
                job.prompt_ids,
                request_id=job.rid,
                max_new_tokens=job.sampling.max_tokens,
                streaming=True,
                # -1 is "no end token" for the library: with ignore_eos and no stop tokens nothing ends early.
                eos_token_id=list(job.end_ids) or -1,
            )
            while not finished:
                out = await outputs.get()
                # Outputs are cumulative: when several arrived meanwhile, the newest holds them all.
                while not outputs.empty():
                    out = outputs.get_nowait()
                if out.status == RequestStatus.FAILED:
                    finished = True
                    log.error("generation failed for %s: %s", job.rid, out.error)
                    raise EngineFailure("the engine failed while generating this request")
                finished = out.status == RequestStatus.FINISHED
                tokens = out.generated_tokens
                chunk = TokenChunk(
                    token_ids=list(tokens[seen:]),
                    # Ended by an end token (the last id) or by max_tokens; the pipeline tells them apart.
                    finished=FinishReason.LENGTH if finished else None,
                    cached_tokens=plan.cached_tokens,
                )
                if job.top_logprobs is not None:
                    chunk.logprobs = [
                        RawLogprob(r.logprob, list(zip(r.top_ids, r.top_logprobs)))
                        for r in plan.records[seen : len(tokens)]
                    ]
                seen = len(tokens)
                yield chunk
        finally:
            if not finished:
                # The caller went away or the pipeline ended the choice: free its sequence and KV pages now.
                self._manager.cancel_request(job.rid)
            # The library drops a result handler only when its request finishes; a cancelled one would stay.
            with self._manager.output_router._lock:
                self._manager.output_router.result_handlers.pop(job.rid, None)
            self._sampler.release(job.rid)
