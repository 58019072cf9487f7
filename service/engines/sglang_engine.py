"""The GPU engine: SGLang's offline `Engine` inside this process, with RadixAttention prefix caching.

A `Backend` (service/engines/base.py): the pipeline (service/pipeline.py) renders and tokenizes prompts, hands
SGLang token ids, and detokenizes the ids SGLang streams back, so chat templates, text, stop strings,
`prompt_tokens` and validation agree across engines. Each choice of a request is its own SGLang request (see
`SGLangEngine.generate` for why). How SGLang's arguments, chunks and aborts map to ours is in sglang_compat.py.

sglang is imported lazily, in `start`: this module imports without sglang installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.domain import ModelInfo, ResolvedSampling, SamplingDefaults
from service.engines.base import ChoiceJob, EngineStats, TokenChunk
from service.engines.hf_model import HFCodec, eos_ids, sampling_defaults
from service.engines.sglang_compat import (
    CumulativeToTokens,
    PrefixCollector,
    check_schema_with_sglang,
    engine_kwargs,
    generation_config,
    keeping_root_logging,
    resolve_device,
    sampling_params,
    seed_refusal,
    thinking_processor,
    without_loop_signal_handler,
)
from service.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from service.config import ServiceConfig
    from service.engines.grammar import GrammarSpec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- the engine


@dataclass(slots=True)
class _Counts:
    # Choices submitted to SGLang that have no output yet (queued or in prefill), and those producing output.
    waiting: int = 0
    running: int = 0


class SGLangEngine:
    """A `Backend` (service/engines/base.py) over SGLang's offline engine."""

    name = "sglang"

    def __init__(self, config: ServiceConfig, engine_factory: Callable[..., Any] | None = None) -> None:
        """`engine_factory` builds the SGLang engine from `engine_kwargs(...)`; `sglang.Engine` unless a test
        hands in a stand-in."""
        self._config = config
        self._factory = engine_factory
        self._engine: Any = None
        # What the pipeline reads (the Backend protocol), set once the model is loaded.
        self.info: ModelInfo | None = None
        self.codec: HFCodec | None = None
        self.defaults = SamplingDefaults()
        self.end_ids: tuple[int, ...] = ()
        self._alive = False
        self._children: list[Any] = []
        self._counts = _Counts()
        self._extra_args = dict(config.sglang_args)
        self._deterministic = bool(self._extra_args.get("enable_deterministic_inference"))

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # Loading takes minutes (weights, CUDA graphs); off the event loop, health checks keep answering.
        await asyncio.to_thread(self._load)
        self._start_output_loop()
        self._alive = True

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from service.engines.default_model import ensure_default_model

        config = self._config
        path = Path(config.model) if config.model else ensure_default_model()
        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self.codec = HFCodec(self._tokenizer, config.tool_parser, config.chat_template)
        model_defaults = generation_config(path)
        self.defaults = sampling_defaults(model_defaults)
        self.end_ids = eos_ids(model_defaults, self._tokenizer)
        kwargs = engine_kwargs(config, str(path))
        if resolve_device(config.device) == "cpu":
            from service.engines import sglang_cpu

            plan = sglang_cpu.plan_for(config, path, self._extra_args)
            sglang_cpu.apply(plan)
            kwargs.update(plan.kwargs)
            log.info("%s", plan.describe())
        kwargs.update(self._extra_args)
        factory = self._factory
        if factory is None:
            import sglang

            factory = sglang.Engine
        with keeping_root_logging(kwargs["log_level"]):
            self._engine = factory(**kwargs)
        manager = self._engine.tokenizer_manager
        # SGLang's own view of the window (config override, or what the model supports).
        context_length = int(manager.context_len)
        self.info = ModelInfo(
            name=kwargs["served_model_name"],
            engine="sglang",
            context_length=context_length,
            max_output_tokens=min(config.max_output_tokens, context_length),
            vocab_size=int(manager.model_config.vocab_size),
            created=int(time.time()),
        )
        self._children = _child_processes(self._engine)
        log.info(
            "sglang engine up for %s (context %d, tp %d) in %.1f s",
            path,
            context_length,
            config.tp_size,
            time.monotonic() - started,
        )

    def metrics_collectors(self) -> list[Any]:
        """SGLang's own metrics (`sglang:*`), for the service's /metrics: its scheduler processes write them to
        the Prometheus multiprocess directory SGLang sets up; the tokenizer manager's live in this process."""
        from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

        collectors: list[Any] = [PrefixCollector(REGISTRY, "sglang:")]
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            files = CollectorRegistry()
            multiprocess.MultiProcessCollector(files, path=directory)
            collectors.append(PrefixCollector(files, "sglang:"))
        return collectors

    def _start_output_loop(self) -> None:
        """Start SGLang's output loop on this event loop now, keeping the service's SIGTERM handling.

        SGLang's tokenizer manager starts its loop on the first request and, in the main thread, installs its
        own SIGTERM handler on the event loop then (drain, then kill the process tree), which would replace
        the service's graceful shutdown. Its SIGQUIT handler (a child process crashed: tear down) stays.
        """
        loop = asyncio.get_running_loop()
        with without_loop_signal_handler(loop, signal.SIGTERM):
            self._engine.tokenizer_manager.auto_create_handle_loop()

    async def stop(self) -> None:
        self._alive = False
        engine, self._engine = self._engine, None
        if engine is None:
            return
        # Kills the scheduler and detokenizer processes; blocks until they have released the GPU.
        await asyncio.to_thread(engine.shutdown)
        # SGLang's output loop and SIGTERM watcher are tasks on this loop; they would outlive the engine.
        for task in list(getattr(engine.tokenizer_manager, "asyncio_tasks", ())):
            task.cancel()

    def is_alive(self) -> bool:
        engine = self._engine
        if not self._alive or engine is None:
            return False
        if getattr(engine.tokenizer_manager, "gracefully_exit", False):
            return False
        return all(_process_alive(p) for p in self._children)

    def stats(self) -> EngineStats:
        # Our own in-flight choices: SGLang's scheduler counts live in its processes, and reading them from
        # here (a metrics scrape thread) would mean its zmq sockets from a second thread.
        return EngineStats(running=self._counts.running, waiting=self._counts.waiting)

    # ------------------------------------------------------------------------------ jobs

    def refuse(self, sampling: ResolvedSampling) -> None:
        refusal = seed_refusal(sampling, self._deterministic)
        if refusal is not None:
            raise refusal
        if sampling.ignore_eos and sampling.stop_token_ids:
            # SGLang's token-based finish check returns early under ignore_eos, so it would also ignore
            # stop_token_ids; refuse rather than silently generate past them.
            raise InvalidArgument(
                "sampling.stop_token_ids", "stop_token_ids cannot be combined with ignore_eos on this engine"
            )

    def compile_grammar(self, spec: GrammarSpec) -> GrammarSpec:
        """SGLang compiles grammars in its own backend (XGrammar by default); it gets the spec's text."""
        if spec.kind == "json_schema":
            check_schema_with_sglang(spec)
        return spec

    async def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        """One SGLang request per choice.

        Not SGLang's own `n`: its copies share one sampling_seed (n identical samples for a seeded request),
        and get rids SGLang makes up, so they could not be aborted one by one. Prefix reuse is kept: with the
        lpm policy SGLang's scheduler holds back same-prefix requests of one batch so that later ones hit the
        RadixAttention cache the first one fills.
        """
        engine = self._engine
        if engine is None:
            raise Unavailable("the engine is not running")
        counts = self._counts
        counts.waiting += 1
        running = False
        finished = False
        stream = CumulativeToTokens(want_logprobs=job.top_logprobs is not None)
        generator = None
        thinking = job.thinking
        extra: dict[str, Any] = {}
        if thinking is not None:
            extra["custom_logit_processor"] = thinking_processor()
        try:
            try:
                generator = await engine.async_generate(
                    input_ids=list(job.prompt_ids),
                    sampling_params=sampling_params(job.sampling, job.seed, job.grammar, thinking),
                    stream=True,
                    rid=job.rid,
                    return_logprob=job.top_logprobs is not None,
                    top_logprobs_num=job.top_logprobs or 0,
                    **extra,
                )
                async for raw in generator:
                    if not running:
                        running = True
                        counts.waiting -= 1
                        counts.running += 1
                    # Converted at once, before SGLang's live lists in `raw` grow with later output.
                    chunk = stream.feed(raw)
                    finished = stream.done
                    if chunk is not None:
                        yield chunk
                    if finished:
                        return
            except ValueError as e:
                # SGLang refuses requests it cannot take with ValueError (its HTTP server answers them with 400).
                raise InvalidArgument("input", f"the engine refused the request: {e}") from None
        finally:
            finished = stream.done  # also after an abort: SGLang has already let go of the request
            if running:
                counts.running -= 1
            else:
                counts.waiting -= 1
            if generator is not None:
                with contextlib.suppress(Exception):
                    await generator.aclose()
            if not finished and self._engine is not None:
                try:
                    # Idempotent in SGLang: a request already aborted or gone is skipped.
                    self._engine.tokenizer_manager.abort_request(job.rid)
                except Exception:
                    log.exception("could not abort %s in the engine", job.rid)

    def leftovers(self) -> dict[str, int]:
        """Choices this process still counts as in SGLang, and requests SGLang's tokenizer manager still holds."""
        engine = self._engine
        states = len(getattr(engine.tokenizer_manager, "rid_to_state", ())) if engine is not None else 0
        return {"engine_choices": self._counts.running + self._counts.waiting, "sglang_requests": states}

    def inject_fault(self) -> None:
        """Kill SGLang's scheduler process, as a crash would; the service notices and exits."""
        log.warning("fault injection: killing the engine's scheduler processes")
        for process in self._children:
            with contextlib.suppress(Exception):
                process.kill()


# ---------------------------------------------------------------------------------------------- helpers


def _child_processes(engine: Any) -> list[Any]:
    """SGLang's scheduler and detokenizer processes, to notice when one has died."""
    try:
        import psutil

        return [psutil.Process(pid) for pid in engine.get_all_child_pids()]
    except Exception:  # no psutil, or a stand-in engine without child processes
        log.debug("not watching the engine's child processes", exc_info=True)
        return []


def _process_alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
