"""Backends that replay a fixed token sequence, for tests of the request pipeline's rules.

Test doubles, and only for what a real model cannot be made to produce on demand: an exact token sequence (a
character split across tokens and chunks, a stop string spanning chunk boundaries, an end token at a chosen
place), a failure at a chosen step. Each replays a `Script`:

- `ScriptedBackend` implements the `Backend` protocol directly;
- `scripted_sglang` and `scripted_transformers` are the real SGLang and transformers adapters
  (service/engines/sglang_engine.py, transformers_engine.py) over a stand-in for the library underneath them,
  which delivers the script in the library's own shapes (SGLang's cumulative stream chunks; transformers'
  cumulative outputs through result handlers, log probabilities through the adapter's sampling plan).

The same script through each must give the caller the same outputs (tests/unit/test_pipeline.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from service.config import ServiceConfig
from service.domain import FinishReason, ModelInfo, ResolvedSampling, SamplingDefaults
from service.engines.base import ChoiceJob, EngineStats, RawLogprob, TokenChunk
from service.engines.hf_model import HFCodec
from service.engines.tool_calls import HermesFormat
from service.errors import InvalidArgument
from service.pipeline import Pipeline

VOCAB = 49152


@dataclass
class Script:
    """What the engine generates for every choice: `ids` in chunks of `chunk` tokens; `end` says how it ends.

    end: "eos" (the last id is an end token the engine stopped on), "length" (max_tokens or the ids run out),
    "hang" (nothing more after the ids, until closed), "fail" (the engine raises after the ids)."""

    ids: list[int]
    chunk: int = 3
    end: str = "length"
    cached_tokens: int = 4
    failure: BaseException = field(default_factory=lambda: RuntimeError("kernel exploded at /srv/secret/path.py"))

    def logprob(self, position: int, top: int) -> RawLogprob:
        token = self.ids[position]
        return RawLogprob(-0.125 * (position % 8), [(token, -0.125 * (position % 8)), (7, -9.5)][:top])

    def plan(self, max_tokens: int) -> tuple[list[int], bool]:
        """The ids the engine gives a choice with this max_tokens, and whether it then finishes."""
        ids = self.ids[:max_tokens]
        return ids, self.end in ("eos", "length") or len(ids) == max_tokens


def info() -> ModelInfo:
    return ModelInfo(name="scripted", engine="scripted", context_length=2048, max_output_tokens=512,
                     vocab_size=VOCAB, created=0)


class ScriptedBackend:
    """The `Backend` protocol itself, replaying a script (see the module docstring for why a double)."""

    name = "scripted"

    def __init__(self, tokenizer: Any, script: Script, eos: int) -> None:
        self.script = script
        self.info = info()
        self.codec = HFCodec(tokenizer, HermesFormat())
        self.defaults = SamplingDefaults()
        self.end_ids = (eos,)
        self.open: set[str] = set()
        self.jobs: list[ChoiceJob] = []
        self.alive = True

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.alive = False

    def refuse(self, sampling: ResolvedSampling) -> None:
        if sampling.min_p == 0.5:
            raise InvalidArgument("sampling.min_p", "this engine refuses min_p 0.5")

    def compile_grammar(self, spec: Any) -> Any:
        return spec

    async def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        if not job.rid.startswith("warmup/"):
            self.jobs.append(job)
        self.open.add(job.rid)
        script = self.script
        ids, finishes = script.plan(job.sampling.max_tokens)
        try:
            for start in range(0, len(ids), script.chunk):
                await asyncio.sleep(0)
                part = ids[start : start + script.chunk]
                last = start + script.chunk >= len(ids)
                chunk = TokenChunk(list(part), cached_tokens=script.cached_tokens)
                if job.top_logprobs is not None:
                    chunk.logprobs = [script.logprob(p, job.top_logprobs) for p in range(start, start + len(part))]
                if last and finishes:
                    chunk.finished = FinishReason.STOP if script.end == "eos" else FinishReason.LENGTH
                yield chunk
            if script.end == "fail":
                raise script.failure
            if script.end == "hang":
                await asyncio.Event().wait()
        finally:
            self.open.discard(job.rid)

    def is_alive(self) -> bool:
        return self.alive

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.open), waiting=0)

    def leftovers(self) -> dict[str, int]:
        return {"open_jobs": len(self.open)}

    def metrics_collectors(self) -> list:
        return []

    def inject_fault(self) -> None:
        self.alive = False


# ---------------------------------------------------------------------------------------------- SGLang underneath


class _ScriptedSGLang:
    """Stands in for `sglang.Engine`, streaming the script as SGLang 0.5.23's cumulative chunks: the whole id list
    so far (the same live list object until the end), the whole logprob lists, `finish_reason` at the end."""

    def __init__(self, script: Script, eos: int, **server_args: Any) -> None:
        self.script = script
        self.eos = eos
        self.aborted: list[str] = []
        manager = SimpleNamespace(context_len=2048, model_config=SimpleNamespace(vocab_size=VOCAB),
                                  gracefully_exit=False, asyncio_tasks=set(), rid_to_state={})
        manager.abort_request = lambda rid="", abort_all=False: self.aborted.append(rid)
        manager.auto_create_handle_loop = lambda: None
        self.tokenizer_manager = manager

    async def async_generate(self, input_ids=None, sampling_params=None, stream=False, rid=None,
                             return_logprob=False, top_logprobs_num=0, **_: Any):
        return self._stream(sampling_params, return_logprob, top_logprobs_num)

    async def _stream(self, params: dict, logprobs: bool, top: int):
        script = self.script
        ids, finishes = script.plan(params["max_new_tokens"])
        live: list[int] = []
        token_logprobs: list[tuple] = []
        top_logprobs: list[list[tuple]] = []
        for start in range(0, len(ids), script.chunk):
            await asyncio.sleep(0)
            part = ids[start : start + script.chunk]
            live.extend(part)
            for p in range(start, start + len(part)):
                raw = script.logprob(p, top)
                token_logprobs.append((raw.logprob, ids[p], None))
                top_logprobs.append([(lp, t, None) for t, lp in raw.top])
            last = start + script.chunk >= len(ids)
            finish = None
            if last and finishes:
                finish = {"type": "stop", "matched": self.eos} if script.end == "eos" else {"type": "length", "length": len(ids)}
            meta = {"id": "rid", "finish_reason": finish, "prompt_tokens": 1, "completion_tokens": len(live),
                    "cached_tokens": script.cached_tokens}
            if logprobs:
                meta["output_token_logprobs"] = token_logprobs
                meta["output_top_logprobs"] = top_logprobs
            yield {"text": "(SGLang's text, unused)", "output_ids": list(live) if finish else live, "meta_info": meta}
        if script.end == "fail":
            raise script.failure
        if script.end == "hang":
            await asyncio.Event().wait()

    def shutdown(self) -> None: ...

    def get_all_child_pids(self) -> list[int]:
        return []


async def scripted_sglang(model: str, script: Script, eos: int) -> Pipeline:
    from service.engines.sglang_engine import SGLangEngine

    config = ServiceConfig(model=model, engine="sglang", device="cuda", max_output_tokens=512)
    backend = SGLangEngine(config, engine_factory=lambda **kwargs: _ScriptedSGLang(script, eos, **kwargs))
    pipeline = Pipeline(backend, HermesFormat())
    await pipeline.start()
    return pipeline


# ---------------------------------------------------------------------------------------------- transformers underneath


class _ScriptedManager:
    """Stands in for transformers' continuous batching manager: a thread that delivers the script's cumulative
    outputs through the result handlers, as the library's generation thread does, and records log probabilities
    and cached tokens in the adapter's sampling plan, as its logits processor (service/engines/sampling.py) does."""

    def __init__(self, script: Script, sampler: Any) -> None:
        self.script = script
        self.sampler = sampler
        self.output_router = SimpleNamespace(_lock=threading.Lock(), result_handlers={}, output_queue=queue.Queue())
        self.background_thread_status = SimpleNamespace(fatal_error=None)
        self.batch_processor = None
        self.cancelled: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.running = True

    def is_running(self) -> bool:
        return self.running

    def stop(self, **_: Any) -> None:
        self.running = False

    def register_result_handler(self, rid: str, handler) -> None:
        self.output_router.result_handlers[rid] = handler

    def cancel_request(self, rid: str) -> None:
        self.cancelled.add(rid)

    def add_request(self, prompt_ids, request_id: str, max_new_tokens: int, streaming: bool, eos_token_id) -> None:
        threading.Thread(target=self._run, args=(request_id, max_new_tokens), daemon=True).start()

    def _run(self, rid: str, max_new_tokens: int) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        from service.engines.sampling import TokenRecord

        script = self.script
        plan = self.sampler._plans.get(rid)
        ids, finishes = script.plan(max_new_tokens)
        generated: list[int] = []
        for start in range(0, len(ids), script.chunk):
            time.sleep(0.001)
            if rid in self.cancelled:
                return
            for p in range(start, min(start + script.chunk, len(ids))):
                if plan is not None:
                    plan.cached_tokens = script.cached_tokens
                    if plan.top_logprobs is not None:
                        raw = script.logprob(p, plan.top_logprobs)
                        plan.records.append(TokenRecord(ids[p], raw.logprob, [t for t, _ in raw.top], [lp for _, lp in raw.top]))
                generated.append(ids[p])
            last = start + script.chunk >= len(ids)
            status = RequestStatus.FINISHED if last and finishes else RequestStatus.DECODING
            if last and script.end == "fail" and not finishes:
                status = RequestStatus.FAILED
            self._deliver(rid, SimpleNamespace(status=status, generated_tokens=list(generated), error="boom"))

    def _deliver(self, rid: str, output: Any) -> None:
        def deliver() -> None:
            handler = self.output_router.result_handlers.get(rid)
            if handler is None:
                self.output_router.output_queue.put(output)
            else:
                handler(output)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(deliver)


async def scripted_transformers(tokenizer: Any, script: Script, eos: int) -> Pipeline:
    from service.engines.transformers_engine import TransformersEngine

    backend = TransformersEngine(ServiceConfig(max_output_tokens=512))

    def load() -> None:  # instead of loading a model: the stand-in manager and what the adapter reads
        backend._tokenizer = tokenizer
        backend.codec = HFCodec(tokenizer, HermesFormat())
        backend.defaults = SamplingDefaults()
        backend.end_ids = (eos,)
        backend.info = info()
        import xgrammar as xgr

        backend._grammars = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB))
        backend._manager = _ScriptedManager(script, backend._sampler)

    backend._load = load
    pipeline = Pipeline(backend, HermesFormat())
    await pipeline.start()
    return pipeline
