"""The GPU engine: SGLang's offline `Engine` inside this process, with RadixAttention prefix caching.

The service renders and tokenizes prompts itself (the same `PromptRenderer` as every engine) and hands SGLang
token ids, so chat templates, `prompt_tokens` and validation agree across engines. SGLang streams cumulative
outputs (the whole text and id list so far); `CumulativeToDelta` turns them into the deltas the service
streams. Each choice of a request is its own SGLang request (see `SGLangEngine.generate` for why).

sglang is imported lazily, in `start`: this module imports, and its pure functions (`engine_kwargs`,
`sampling_params`, `CumulativeToDelta`) run, without sglang installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from service.engines.hf_model import model_name, sampling_defaults, token_bytes
from service.engines.text import partial_stop_len
from service.engines.tool_calls import ToolCallExtractor, tool_format
from service.errors import EngineFailure, InvalidArgument, Overloaded, ServiceError, Unavailable

if TYPE_CHECKING:
    from service.config import ServiceConfig
    from service.engines.grammar import GrammarSpec

log = logging.getLogger(__name__)

# SGLang checks sampling_seed against the int64 range.
_SEED_RANGE = 2**63
# SGLang's top_k for "the whole vocabulary"; it refuses 0.
_NO_TOP_K = -1


# ---------------------------------------------------------------------------------------------- pure mapping


def engine_kwargs(config: ServiceConfig, model_path: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `sglang.Engine(...)` (the fields of SGLang's ServerArgs) for this config.

    Settings left unset in the config are left out, so SGLang picks its own defaults for the GPU it finds.
    RadixAttention stays on: `disable_radix_cache` is never passed.
    """
    path = model_path or config.model
    if not path:
        raise ValueError("the sglang engine needs a model folder")
    kwargs: dict[str, Any] = {
        "model_path": str(path),
        "served_model_name": config.served_model_name or model_name(Path(path)),
        "tp_size": config.tp_size,
        # Longest-prefix-match scheduling runs requests that share a cached prefix together (SGLang's default
        # is fcfs).
        "schedule_policy": config.schedule_policy or "lpm",
        "dtype": config.dtype,
        # CumulativeToDelta relies on SGLang's cumulative stream chunks; pin them in case the default moves.
        "incremental_streaming_output": False,
        "log_level": "info" if config.log_level.upper() == "DEBUG" else "warning",
        # SGLang's own Prometheus metrics (sglang:*), served on the service's /metrics beside ours.
        "enable_metrics": True,
        # Compact JSON under a schema, as the transformers engine's grammars (service/engines/grammar.py): with any
        # whitespace allowed, a small model can spend its whole budget on newlines inside the object.
        "constrained_json_disable_any_whitespace": True,
    }
    optional = {
        "context_length": config.context_length,
        "mem_fraction_static": config.mem_fraction_static,
        "chunked_prefill_size": config.chunked_prefill_size,
        "max_running_requests": config.max_running_requests,
        "quantization": config.quantization,
    }
    if config.nnodes > 1:
        if config.node_rank != 0:
            # Only rank 0 takes requests; the other nodes run SGLang's own worker (sglang.launch_server).
            raise ValueError("the service runs on node rank 0; start the other nodes with sglang.launch_server")
        optional.update(nnodes=config.nnodes, node_rank=0, dist_init_addr=config.dist_init_addr)
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if config.kv_cache_tokens is not None:
        kwargs["max_total_tokens"] = config.kv_cache_tokens
    return kwargs


def resolve_device(requested: str) -> str:
    """`auto` is cuda where torch sees a CUDA GPU, else cpu (SGLang's CPU engine, service/engines/sglang_cpu.py)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_refusal(s: ResolvedSampling, deterministic: bool) -> InvalidArgument | None:
    """SGLang samples with `sampling_seed` only under `enable_deterministic_inference` (which needs a GPU attention
    backend: fa3, flashinfer, triton); otherwise it ignores the seed and the same request gives other text. A seed
    that would be ignored is refused rather than silently dropped; under greedy decoding it changes nothing."""
    if s.seed is None or s.greedy or deterministic:
        return None
    return InvalidArgument(
        "sampling.seed",
        "seed cannot be honoured by this server's sglang engine: SGLang samples reproducibly only with "
        "--sglang-arg enable_deterministic_inference=true, which needs a GPU attention backend; "
        "leave seed out, or use temperature 0",
    )


def sampling_params(s: ResolvedSampling, choice: int = 0, grammar: GrammarSpec | None = None) -> dict[str, Any]:
    """SGLang's `sampling_params` dict for one choice: every field of ResolvedSampling, in SGLang's keys.

    Choice i samples with seed + i, so the choices of a seeded request differ from each other and repeat
    exactly between calls (as with the transformers engine). A grammar (structured output, tool calls) goes
    to SGLang's grammar backend under its own key: `json_schema` (a JSON string), `regex` or `ebnf`.
    """
    if s.ignore_eos and s.stop_token_ids:
        # SGLang's token-based finish check returns early under ignore_eos, so it would also ignore
        # stop_token_ids; refuse rather than silently generate past them.
        raise InvalidArgument(
            "sampling.stop_token_ids", "stop_token_ids cannot be combined with ignore_eos on this engine"
        )
    params = {
        "max_new_tokens": s.max_tokens,
        "min_new_tokens": s.min_tokens,
        "temperature": s.temperature,  # 0 is greedy: SGLang turns it into top_k=1
        "top_p": s.top_p,
        "top_k": s.top_k if s.top_k > 0 else _NO_TOP_K,
        "min_p": s.min_p,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "repetition_penalty": s.repetition_penalty,
        "stop": list(s.stop) or None,
        "stop_token_ids": list(s.stop_token_ids) or None,
        "ignore_eos": s.ignore_eos,
        "skip_special_tokens": s.skip_special_tokens,
        # SGLang's logit_bias is Dict[str, float]: token ids as strings (they cross its msgpack IPC as keys).
        "logit_bias": {str(token): float(bias) for token, bias in s.logit_bias.items()} or None,
        "sampling_seed": None if s.seed is None else (s.seed + choice) % _SEED_RANGE,
    }
    if grammar is not None:
        params[grammar.kind] = grammar.text
    return params


def abort_error(finish_reason: Mapping[str, Any]) -> ServiceError:
    """The service error for SGLang's `{"type": "abort", "message", "status_code"}` finish reason."""
    status = finish_reason.get("status_code")
    message = str(finish_reason.get("message") or "aborted")
    log.warning("the engine aborted a request (status %s): %s", status, message)
    if status == 400:
        # SGLang's 400 aborts describe the request (too long for the KV cache, bad grammar, ...).
        return InvalidArgument("input", f"the engine refused the request: {message}")
    if status == 429:
        return Overloaded("the engine has too many requests queued; retry later")
    if status == 503:
        return Unavailable("the engine is not taking requests right now")
    return EngineFailure("the engine aborted this request")


class CumulativeToDelta:
    """Turns the cumulative stream chunks of one SGLang request into the ChoiceDeltas of one choice.

    Each chunk holds the whole text and the whole id list so far. The text's tail is not final until the
    request ends: a token holding part of a multi-byte character decodes as U+FFFD until the rest arrives,
    and a stop string is trimmed off only in the last chunk. So this emits only a stable prefix, holding back
    trailing U+FFFD and any tail that could still become a stop string, and never emits text it would have to
    take back. The last chunk's text is final and flushes what was held.

    Ids: every chunk's `output_ids` may be SGLang's live list, mutated as more output arrives; only slices of
    it are kept. A matched EOS or stop token ends the choice and is not part of the output (its text is not in
    SGLang's text either), though it counts in `completion_tokens`.
    """

    def __init__(
        self,
        index: int,
        stops: tuple[str, ...] = (),
        stop_token_ids: frozenset[int] = frozenset(),
        want_logprobs: bool = False,
        token_repr: Callable[[int], tuple[str, bytes]] | None = None,
    ) -> None:
        self.index = index
        self._stops = stops
        self._stop_token_ids = stop_token_ids
        self._want_logprobs = want_logprobs
        self._token_repr = token_repr or _plain_token_repr
        self._emitted = ""  # text sent so far; always a prefix of SGLang's text
        self._ids_sent = 0
        self._logprobs_sent = 0
        self.done = False
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0
        self.cached_tokens: int | None = None

    def feed(self, chunk: Mapping[str, Any]) -> ChoiceDelta | None:
        """The delta this chunk adds, or None when it adds nothing yet. Raises ServiceError for an abort."""
        if self.done:
            return None
        meta = chunk.get("meta_info") or {}
        finish = meta.get("finish_reason")
        ids = chunk.get("output_ids") or ()
        self.completion_tokens = int(meta.get("completion_tokens", len(ids)))
        if meta.get("prompt_tokens") is not None:
            self.prompt_tokens = int(meta["prompt_tokens"])
        if meta.get("cached_tokens") is not None:
            self.cached_tokens = int(meta["cached_tokens"])
        if finish is not None and finish.get("type") == "abort":
            self.done = True
            raise abort_error(finish)

        delta = ChoiceDelta(index=self.index)
        if finish is not None:
            self.done = True
            self._finish(delta, finish)

        # Ids: all of them but a matched end token.
        end = len(ids)
        if delta.finish_reason is FinishReason.STOP and _matched_token(finish) is not None:
            if end and ids[end - 1] == finish["matched"]:
                end -= 1
        if self._want_logprobs:
            token_logprobs = meta.get("output_token_logprobs") or ()
            top_logprobs = meta.get("output_top_logprobs") or ()
            if not self.done:
                # Keep ids and their log probabilities in the same delta.
                end = min(end, len(token_logprobs))
            delta.logprobs = [
                self._logprob(token_logprobs[i], top_logprobs[i] if i < len(top_logprobs) else None)
                for i in range(self._logprobs_sent, min(end, len(token_logprobs)))
            ]
            self._logprobs_sent = max(self._logprobs_sent, min(end, len(token_logprobs)))
        if end > self._ids_sent:
            delta.token_ids = list(ids[self._ids_sent : end])
            self._ids_sent = end

        delta.text = self._text_delta(chunk.get("text") or "", delta)
        if not delta.text and not delta.token_ids and not delta.logprobs and delta.finish_reason is None:
            return None
        return delta

    def _finish(self, delta: ChoiceDelta, finish: Mapping[str, Any]) -> None:
        kind = finish.get("type")
        if kind == "length":
            delta.finish_reason = FinishReason.LENGTH
            return
        if kind != "stop":
            log.warning("unknown finish reason from the engine: %r; reporting it as a stop", finish)
        delta.finish_reason = FinishReason.STOP
        matched = finish.get("matched")
        if isinstance(matched, str) and matched in self._stops:
            delta.stop_string = matched
        elif _matched_token(finish) in self._stop_token_ids:
            delta.stop_token_id = matched
        # Anything else (EOS, SGLang's own "NaN happened" stop, grammar end) is a plain stop.

    def _text_delta(self, text: str, delta: ChoiceDelta) -> str:
        emitted = self._emitted
        if not text.startswith(emitted):
            # Not expected from SGLang (it only appends); never take text back, wait for a consistent chunk.
            log.warning(
                "choice %d: the engine's text changed before the %d characters already sent",
                self.index,
                len(emitted),
            )
            return ""
        if delta.finish_reason is None:
            stable = text.rstrip("\ufffd")
            stable = stable[: len(stable) - partial_stop_len(stable[len(emitted) :], self._stops)]
        else:
            stable = text
            if delta.stop_string is not None:
                # SGLang trims the stop string off the last chunk; make sure, should it not.
                at = stable.find(delta.stop_string, len(emitted))
                if at != -1:
                    stable = stable[:at]
        if len(stable) <= len(emitted):
            return ""
        self._emitted = stable
        return stable[len(emitted) :]

    def _logprob(self, entry: Any, top: Any) -> TokenLogprob:
        # SGLang's entries are (logprob, token_id, text or None); top is None or a list of such entries.
        logprob, token_id, _ = entry
        text, raw = self._token_repr(int(token_id))
        alternatives = []
        for t_logprob, t_id, _ in top or ():
            t_text, t_raw = self._token_repr(int(t_id))
            alternatives.append(
                TopLogprob(token_id=int(t_id), token=t_text, logprob=float(t_logprob), token_bytes=t_raw)
            )
        return TokenLogprob(
            token_id=int(token_id), token=text, logprob=float(logprob), token_bytes=raw, top=alternatives
        )


def _matched_token(finish: Mapping[str, Any] | None) -> int | None:
    if finish is None:
        return None
    matched = finish.get("matched")
    return matched if isinstance(matched, int) and not isinstance(matched, bool) else None


class PrefixCollector:
    """Re-exports the metric families of another registry whose names start with `prefix`."""

    def __init__(self, registry: Any, prefix: str) -> None:
        self._registry = registry
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        for family in self._registry.collect():
            if family.name.startswith(self._prefix):
                yield family


def _plain_token_repr(token: int) -> tuple[str, bytes]:
    return "", b""


# ---------------------------------------------------------------------------------------------- the engine


@dataclass(slots=True)
class _Choice:
    index: int
    rid: str
    params: dict[str, Any]
    stream: CumulativeToDelta
    task: asyncio.Task | None = None
    generator: Any = None
    finished: bool = False


@dataclass(slots=True)
class _Counts:
    # Choices submitted to SGLang that have no output yet (queued or in prefill), and those producing output.
    waiting: int = 0
    running: int = 0
    # One queue per request in flight, so stop() can wake its reader.
    queues: set[asyncio.Queue] = field(default_factory=set)


class SGLangEngine:
    def __init__(self, config: ServiceConfig, engine_factory: Callable[..., Any] | None = None) -> None:
        """`engine_factory` builds the SGLang engine from `engine_kwargs(...)`; `sglang.Engine` unless a test
        hands in a stand-in."""
        self._config = config
        self._factory = engine_factory
        self._engine: Any = None
        self._info: ModelInfo | None = None
        self._alive = False
        self._children: list[Any] = []
        self._counts = _Counts()
        self._token_text: dict[int, tuple[str, bytes]] = {}
        self._tool_format = tool_format(config.tool_parser)
        self._extra_args = dict(config.sglang_args)
        self._deterministic = bool(self._extra_args.get("enable_deterministic_inference"))

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def info(self) -> ModelInfo:
        assert self._info is not None, "engine not started"
        return self._info

    async def start(self) -> None:
        # Loading takes minutes (weights, CUDA graphs); off the event loop, health checks keep answering.
        await asyncio.to_thread(self._load)
        self._start_output_loop()
        self._alive = True
        await self._warm_up()

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from service.engines.default_model import ensure_default_model
        from service.engines.prompt import PromptRenderer

        config = self._config
        path = Path(config.model) if config.model else ensure_default_model()
        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._renderer = PromptRenderer(self._tokenizer, self._tool_format)
        self._defaults = sampling_defaults(_generation_config(path))
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
        with _keeping_root_logging(kwargs["log_level"]):
            self._engine = factory(**kwargs)
        manager = self._engine.tokenizer_manager
        # SGLang's own view of the window (config override, or what the model supports).
        context_length = int(manager.context_len)
        self._info = ModelInfo(
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
        with _without_loop_signal_handler(loop, signal.SIGTERM):
            self._engine.tokenizer_manager.auto_create_handle_loop()

    async def _warm_up(self) -> None:
        """One tiny generation through the whole path, so a broken engine fails at start, not on a caller."""
        from service.domain import SamplingParams, TextInput

        request = GenerateRequest(
            request_id="warmup",
            input=TextInput("Hello"),
            sampling=SamplingParams(max_tokens=2, temperature=0.0),
        )
        async for _ in self.generate(request):
            pass

    async def stop(self) -> None:
        self._alive = False
        engine, self._engine = self._engine, None
        for queue in list(self._counts.queues):
            queue.put_nowait((-1, Unavailable("the engine is shutting down")))
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

    # ------------------------------------------------------------------------------ requests

    def count_tokens(self, input: Input) -> int:
        return len(self._renderer.token_ids(input))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """One SGLang request per choice, merged into one stream.

        Not SGLang's own `n`: its copies share one sampling_seed (n identical samples for a seeded request),
        and get rids SGLang makes up, so they could not be aborted one by one. Prefix reuse is kept: with the
        lpm policy SGLang's scheduler holds back same-prefix requests of one batch so that later ones hit the
        RadixAttention cache the first one fills.
        """
        if not self.is_alive():
            raise Unavailable("the engine is not running")
        info = self.info
        validate_request(request, info)
        # Chat template and tokenizer: milliseconds, or seconds for a long prompt; off the event loop, so the
        # streams in flight keep flowing meanwhile.
        prompt_ids = await asyncio.to_thread(self._renderer.token_ids, request.input)
        resolved = resolve(request.sampling, self._defaults, len(prompt_ids), info)
        refusal = seed_refusal(resolved, self._deterministic)
        if refusal is not None:
            raise refusal
        want_logprobs = request.top_logprobs is not None
        grammar = None
        if request.constraint is not None or request.tools:
            from service.engines.grammar import grammar_for  # xgrammar comes with sglang

            grammar = await asyncio.to_thread(grammar_for, request, self._tool_format)
            if grammar is not None and grammar.kind == "json_schema":
                _check_schema_with_sglang(grammar)
        tools = ToolCallExtractor(self._tool_format, request.tools, request.n) if request.tools else None
        choices = [
            _Choice(
                index=i,
                # Engine-side ids are unique even when callers reuse theirs (SGLang aborts by rid prefix, so
                # the random part is long); the caller's id stays in front for debugging.
                rid=f"{request.request_id}/{i}/{uuid.uuid4().hex}",
                params=sampling_params(resolved, i, grammar),
                stream=CumulativeToDelta(
                    i,
                    stops=resolved.stop,
                    stop_token_ids=frozenset(resolved.stop_token_ids),
                    want_logprobs=want_logprobs,
                    token_repr=self._token_repr,
                ),
            )
            for i in range(request.n)
        ]
        queue: asyncio.Queue = asyncio.Queue()
        self._counts.queues.add(queue)
        try:
            for c in choices:
                c.task = asyncio.create_task(self._pump(c, prompt_ids, request.top_logprobs, queue))
            live = len(choices)
            while live:
                ready = [await queue.get()]
                # Whatever else arrived meanwhile goes into the same output: a slow reader gets fewer, larger
                # messages instead of an ever-growing backlog.
                while not queue.empty():
                    ready.append(queue.get_nowait())
                merged: dict[int, ChoiceDelta] = {}
                for index, item in ready:
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        live -= 1
                    if index in merged:
                        merged[index].merge(item)
                    else:
                        merged[index] = item
                usage = None
                if not live:
                    streams = [c.stream for c in choices]
                    cached = [s.cached_tokens for s in streams if s.cached_tokens is not None]
                    usage = Usage(
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=sum(s.completion_tokens for s in streams),
                        # The least any choice found cached: what was cached before this request, not what
                        # one choice found in the cache a sibling had just filled.
                        cached_tokens=min(cached, default=0),
                    )
                deltas = [merged[i] for i in sorted(merged)]
                if tools is not None:
                    deltas = [tools.apply(d) for d in deltas]
                yield GenerateOutput(deltas, usage)
        finally:
            self._counts.queues.discard(queue)
            await self._close(choices)

    async def _pump(
        self, c: _Choice, prompt_ids: list[int], top_logprobs: int | None, queue: asyncio.Queue
    ) -> None:
        """Reads one choice's SGLang stream into `queue` as (index, delta) or (index, error)."""
        counts = self._counts
        counts.waiting += 1
        running = False
        try:
            c.generator = await self._engine.async_generate(
                input_ids=list(prompt_ids),
                sampling_params=c.params,
                stream=True,
                rid=c.rid,
                return_logprob=top_logprobs is not None,
                top_logprobs_num=top_logprobs or 0,
            )
            async for chunk in c.generator:
                if not running:
                    running = True
                    counts.waiting -= 1
                    counts.running += 1
                # Converted at once, before SGLang's live lists in `chunk` grow with later output.
                delta = c.stream.feed(chunk)
                if delta is not None:
                    queue.put_nowait((c.index, delta))
                if c.stream.done:
                    c.finished = True
                    return
            raise EngineFailure("the engine ended a stream without a finish reason")
        except asyncio.CancelledError:
            raise
        except ServiceError as e:
            c.finished = c.stream.done
            queue.put_nowait((c.index, e))
        except ValueError as e:
            # SGLang refuses requests it cannot take with ValueError (its HTTP server answers them with 400).
            queue.put_nowait((c.index, InvalidArgument("input", f"the engine refused the request: {e}")))
        except Exception:
            log.exception("the engine failed choice %d (%s)", c.index, c.rid)
            queue.put_nowait((c.index, EngineFailure("the engine failed while generating this request")))
        finally:
            if running:
                counts.running -= 1
            else:
                counts.waiting -= 1

    async def _close(self, choices: list[_Choice]) -> None:
        """Stop reading every choice and abort, in SGLang, each one that has not finished there."""
        tasks = [c.task for c in choices if c.task is not None and not c.task.done()]
        for task in tasks:
            # A cancelled read aborts its request in SGLang (its generate_request aborts on any exception).
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        engine = self._engine
        for c in choices:
            if c.generator is not None:
                with contextlib.suppress(Exception):
                    await c.generator.aclose()
            if not c.finished and engine is not None:
                try:
                    # Idempotent in SGLang: a request already aborted or gone is skipped.
                    engine.tokenizer_manager.abort_request(c.rid)
                except Exception:
                    log.exception("could not abort %s in the engine", c.rid)

    def _token_repr(self, token: int) -> tuple[str, bytes]:
        cached = self._token_text.get(token)
        if cached is None:
            raw = token_bytes(self._tokenizer, token)
            cached = (raw.decode("utf-8", errors="replace"), raw)
            self._token_text[token] = cached
        return cached


# ---------------------------------------------------------------------------------------------- helpers


def _check_schema_with_sglang(spec: GrammarSpec) -> None:
    """SGLang refuses a JSON schema with keywords its XGrammar backend may not enforce (a longer list than ours: it
    covers older XGrammar releases). Ask it first, so that the refusal names the field instead of aborting as
    "input" from inside SGLang."""
    try:
        from sglang.srt.constrained.json_schema_validation import (
            UnsupportedJSONSchemaFeature,
            validate_xgrammar_json_schema,
        )
    except ImportError:  # another sglang version: SGLang still checks it, it only names the field less precisely
        return
    try:
        validate_xgrammar_json_schema(json.loads(spec.text))
    except UnsupportedJSONSchemaFeature as e:
        raise InvalidArgument(spec.field, f"the JSON schema cannot be used: {e}") from None


def _generation_config(path: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model sets no sampling defaults
        return GenerationConfig()


@contextlib.contextmanager
def _keeping_root_logging(sglang_level: str) -> Iterator[None]:
    """SGLang's engine reconfigures the root logger (`logging.basicConfig(force=True)` at its own level), which would
    drop the service's handlers (JSON lines, request ids) and its INFO lines for the rest of the process. Keep ours;
    SGLang's level applies to its own loggers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("sglang").setLevel(sglang_level.upper())


@contextlib.contextmanager
def _without_loop_signal_handler(loop: asyncio.AbstractEventLoop, sig: int) -> Iterator[None]:
    """While inside, `loop.add_signal_handler(sig, ...)` does nothing, so the handler already set stays."""
    original = loop.add_signal_handler

    def add_signal_handler(signum: int, callback: Callable[..., object], *args: Any) -> None:
        if signum == sig:
            log.debug("kept the service's handler for signal %d", signum)
            return
        original(signum, callback, *args)

    try:
        loop.add_signal_handler = add_signal_handler  # type: ignore[method-assign]
    except AttributeError:  # a loop type whose methods cannot be shadowed (uvloop)
        log.warning(
            "cannot keep the service's SIGTERM handler on %s; SGLang's replaces it", type(loop).__name__
        )
        yield
        return
    try:
        yield
    finally:
        del loop.add_signal_handler


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
