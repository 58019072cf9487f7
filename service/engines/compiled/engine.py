"""The transformers engine's compiled runner: the model loaded by transformers, run as one compiled graph.

transformers loads the checkpoint, tokenizer and chat template (everything `TransformersEngine` shares); the
forward pass is the compiled decoder (decoder.py) under our own continuous batching (runner.py) with a paged,
prefix-cached KV cache (blocks.py, attention.py). At start it settles the weight format for this CPU (precision.py),
compiles, and warms up every graph the runner will use, so serving never waits for a compile; compiles after that
are counted (`chatserve_engine_compiles_total{phase="serving"}`) and should stay at zero.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch

from service.domain import FinishReason
from service.engines.base import ChoiceJob, EngineStats, RawLogprob, TokenChunk
from service.engines.compiled import precision
from service.engines.compiled.attention import BatchPlan, KVCache, SequenceSpan, batch_context
from service.engines.compiled.blocks import BlockManager
from service.engines.compiled.decoder import INT8_MAX_ROWS, Decoder
from service.engines.compiled.runner import Runner, Sequence
from service.engines.cpu_features import cpu_flags
from service.engines.sampling import SamplingPlan
from service.engines.transformers_engine import DEFAULT_KV_CACHE_TOKENS, TransformersEngine
from service.errors import EngineFailure

if TYPE_CHECKING:
    from service.config import ServiceConfig

log = logging.getLogger(__name__)


class CompiledEngine(TransformersEngine):
    """A `Backend` (service/engines/base.py): each choice is one sequence of the runner's batch."""

    def __init__(self, config: ServiceConfig) -> None:
        super().__init__(config)
        self._runner: Runner | None = None
        self._decoder: Decoder | None = None
        self._open: dict[str, Sequence] = {}
        self.compiles = {"warmup": 0, "serving": 0}
        self._warm = False
        self.choice: precision.Choice | None = None

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future = concurrent.futures.Future()

        def model_thread() -> None:
            # Loading, compiling, warming up and every model step happen on this one thread (Runner.serve says why).
            try:
                self._load()
                self._runner.attach(loop, threading.current_thread())
            except BaseException as e:
                ready.set_exception(e)
                return
            ready.set_result(None)
            self._runner.serve()

        threading.Thread(target=model_thread, name="model-runner", daemon=True).start()
        await asyncio.wrap_future(ready)
        self._alive = True

    def _load(self) -> None:
        config = self._config
        started = time.monotonic()
        flags = cpu_flags()
        # Loaded once in float32; the chosen format is made from it (the probe compares formats on this copy).
        model = self._load_model(torch.float32)
        context = self.info.context_length
        self.choice = precision.choose(model, config.dtype, config.quantization, flags, self._path)
        dtype = precision.DTYPES[self.choice.dtype]
        model.to(dtype)
        decoder = Decoder(model, max_positions=context + 1).eval()
        if self.choice.int8:
            decoder.quantize_int8()
        self._model = None  # the decoder holds what it needs (shared or fused copies of the weights)
        del model
        self._decoder = decoder
        page = config.page_size
        blocks = max(2, (config.kv_cache_tokens or DEFAULT_KV_CACHE_TOKENS) // page)
        # One page more than the block manager hands out: its first slot takes the pad row of one-row batches.
        cache = KVCache(decoder.layers, (blocks + 1) * page, decoder.kv_heads, decoder.head_dim, dtype)
        forward, forward_small = decoder.forward, decoder.forward_int8 if decoder.int8 else None
        if config.compile:
            forward = self._compile(decoder.forward, freeze=False)
            forward_small = forward_small and self._compile(forward_small, freeze=True)
        with torch.inference_mode():
            self._warm_up(forward, cache, (INT8_MAX_ROWS + 1, 17) if forward_small else (2, 3, 17))
            if forward_small:
                self._warm_up(forward_small, cache, (2, 3, INT8_MAX_ROWS))
        self._warm = True
        self._runner = Runner(forward, decoder.logits, cache, BlockManager(blocks, page), decoder.scale,
                              max_batch_tokens=config.max_batch_tokens, max_running=config.max_running,
                              context_length=context, scratch_slot=blocks * page, forward_small=forward_small,
                              small_rows=INT8_MAX_ROWS)
        log.info(
            "loaded %s: compiled runner, %s%s weights (%s), %s, %d graphs compiled at start; KV cache %d tokens "
            "(%.0f MB); ready in %.1f s",
            self._path, self.choice.dtype, " + int8" if self.choice.int8 else "", self.choice.reason,
            "torch.compile" if config.compile else "eager (--no-compile)", self.compiles["warmup"],
            blocks * page, cache.nbytes() / 1e6, time.monotonic() - started,
        )

    def _compile(self, function, freeze: bool):
        import torch._inductor.config as inductor

        # Compiled artifacts live on disk, keyed by what they depend on, so a second start loads instead of
        # compiling (Inductor's FX graph cache and AOTAutograd cache both key below this folder).
        folder = precision.cache_folder("compile", self._path, self.choice, torch.__version__)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        engine = self

        def counting_backend(gm, example_inputs):
            engine.compiles["serving" if engine._warm else "warmup"] += 1
            if engine._warm:
                log.warning("the decoder was compiled again while serving (shapes %s)",
                            [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)][:2])
            from torch._inductor.compile_fx import compile_fx

            # Freezing folds the weights into the graph as constants. Measured on SmolLM2 (Xeon, AMX, 2 cores): with
            # int8 weights one stream 36 -> 46 tokens/s. Not for dense weights: Inductor then prepacks them for
            # oneDNN, and a graph holding prepacked weights is never found in the disk cache again (a 44 s compile
            # at every start), for a gain only in bf16 decode, which the int8 graph serves where it is fastest.
            with inductor.patch(freezing=freeze):
                return compile_fx(gm, example_inputs)

        return torch.compile(function, backend=counting_backend, dynamic=True, fullgraph=True)

    def _warm_up(self, forward, cache: KVCache, sizes: tuple[int, ...]) -> None:
        """Compile a graph the runner uses and run it at a few sizes: every batch in its range of rows (two or
        more: the runner pads one-row batches) runs this one dynamic graph. The cache slots written here belong to
        no sequence."""
        started = time.monotonic()
        for rows in sizes:
            plan = BatchPlan(slots=torch.arange(rows), prefills=[SequenceSpan(0, rows, 0, rows, None)])
            with batch_context(cache, plan, self._decoder.scale):
                hidden = forward(torch.zeros(rows, dtype=torch.long), torch.arange(rows))
            self._decoder.logits(hidden[-1:])
        log.info("decoder warm-up: %.1f s, %d graphs", time.monotonic() - started, self.compiles["warmup"])

    async def stop(self) -> None:
        self._alive = False
        if self._runner is not None:
            await asyncio.to_thread(self._runner.stop)

    def inject_fault(self) -> None:
        """Crash the runner at its next step (only reachable with --enable-fault-injection)."""
        log.warning("fault injection: the engine loop will fail at its next step")
        self._runner.fault = "injected engine fault"

    def is_alive(self) -> bool:
        return self._alive and self._runner is not None and self._runner.is_alive()

    def stats(self) -> EngineStats:
        if self._runner is None:
            return EngineStats(running=0, waiting=0)
        running, waiting = self._runner.counts()
        return EngineStats(running=running, waiting=waiting)

    def leftovers(self) -> dict[str, int]:
        return {"open_sequences": len(self._open), "runner_sequences": self._runner.held() if self._runner else 0}

    def metrics_collectors(self) -> list:
        return [_CompileCollector(self)]

    # ------------------------------------------------------------------------------ jobs

    async def generate(self, job: ChoiceJob) -> AsyncIterator[TokenChunk]:
        if not self.is_alive():
            raise EngineFailure("the engine is not running")
        plan = SamplingPlan.build(job.sampling, list(job.end_ids), job.prompt_ids, job.top_logprobs, job.seed,
                                  job.grammar, job.thinking)
        seq = Sequence(rid=job.rid, tokens=list(job.prompt_ids),
                       max_new_tokens=job.sampling.max_tokens, end_ids=frozenset(job.end_ids), plan=plan)
        self._open[job.rid] = seq
        seen = 0
        try:
            self._runner.submit(seq)
            while True:
                await seq.wake.wait()
                seq.wake.clear()
                if seq.error is not None:
                    raise EngineFailure(seq.error)
                finished = seq.finished
                count = len(seq.generated)
                chunk = TokenChunk(token_ids=seq.generated[seen:count],
                                   finished=FinishReason.LENGTH if finished else None,
                                   cached_tokens=seq.cached_tokens)
                if job.top_logprobs is not None:
                    chunk.logprobs = [RawLogprob(r.logprob, list(zip(r.top_ids, r.top_logprobs)))
                                      for r in plan.records[seen:count]]
                seen = count
                if chunk.token_ids or finished:
                    yield chunk
                if finished:
                    return
        finally:
            if not seq.finished and seq.error is None:
                # The caller went away or the pipeline ended the choice: free its sequence and KV pages now.
                self._runner.cancel(seq)
            self._open.pop(job.rid, None)


class _CompileCollector:
    """`chatserve_engine_compiles_total{phase}`: decoder graphs compiled at start (warmup) and after (serving)."""

    def __init__(self, engine: CompiledEngine) -> None:
        self._engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("chatserve_engine_compiles", "Decoder graphs compiled, by phase (serving "
                                     "should stay at 0: every shape is compiled during warm-up)", labels=["phase"])
        for phase, count in self._engine.compiles.items():
            family.add_metric([phase], count)
        yield family
