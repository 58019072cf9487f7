"""What the service needs to know of SGLang's API, as pure functions: the engine's arguments (ServerArgs fields),
sampling keys, cumulative stream chunks, abort reasons, metrics, and its process-wide habits (root logging,
SIGTERM handler). Nothing here imports sglang at module level, so all of it runs and is tested without sglang.
tests/contract_sglang/ checks these mappings against the real package.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.domain import FinishReason, ResolvedSampling
from service.engines.base import RawLogprob, TokenChunk
from service.engines.hf_model import model_name
from service.errors import EngineFailure, InvalidArgument, Overloaded, ServiceError, Unavailable

if TYPE_CHECKING:
    from service.config import ServiceConfig
    from service.engines.grammar import GrammarSpec

log = logging.getLogger("service.engines.sglang_engine")

# SGLang's top_k for "the whole vocabulary"; it refuses 0.
_NO_TOP_K = -1


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
        # Lets the service cap a model's thinking (max_reasoning_tokens) with SGLang's own thinking-budget processor.
        # Only the service reaches this engine (it runs in-process, no HTTP server), so no caller can send code.
        "enable_custom_logit_processor": True,
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


def sampling_params(
    s: ResolvedSampling, seed: int | None = None, grammar: GrammarSpec | None = None, thinking: Any = None
) -> dict[str, Any]:
    """SGLang's `sampling_params` dict for one choice: every field of ResolvedSampling, in SGLang's keys, with the
    choice's own seed (the pipeline's: the request's seed + the choice's index).

    Stop strings go to SGLang too, so its scheduler stops computing as soon as one appears; what the caller sees
    is still decided by the pipeline. A grammar (structured output, tool calls) goes to SGLang's grammar backend
    under its own key: `json_schema` (a JSON string), `regex` or `ebnf`.
    """
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
        "sampling_seed": seed,
        # Read by the thinking-budget logit processor the engine passes with such a request (sglang_thinking.py).
        "custom_params": {"chatserve_thinking": dataclasses.asdict(thinking)} if thinking is not None else None,
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


class CumulativeToTokens:
    """Turns the cumulative stream chunks of one SGLang request into the `TokenChunk`s of one choice.

    Each chunk holds the whole id list so far (`output_ids`, possibly SGLang's live list, mutated as more output
    arrives: only slices of it are kept) and, with logprobs, the whole logprob lists so far. SGLang's own text
    is not used: the pipeline detokenizes the ids, the same way for every engine. Ids wait for their log
    probabilities, so each id goes out with its own. A finished chunk's ids include the end token SGLang stopped
    on (the pipeline leaves it out of the text).
    """

    def __init__(self, want_logprobs: bool = False) -> None:
        self._want_logprobs = want_logprobs
        self._sent = 0
        self.done = False

    def feed(self, chunk: Mapping[str, Any]) -> TokenChunk | None:
        """The tokens this chunk adds, or None when it adds nothing yet. Raises ServiceError for an abort."""
        if self.done:
            return None
        meta = chunk.get("meta_info") or {}
        finish = meta.get("finish_reason")
        if finish is not None and finish.get("type") == "abort":
            self.done = True
            raise abort_error(finish)
        ids = chunk.get("output_ids") or ()
        end = len(ids)
        out = TokenChunk(token_ids=[], cached_tokens=_int_or_none(meta.get("cached_tokens")))
        if finish is not None:
            self.done = True
            out.finished = _finish_reason(finish)
        if self._want_logprobs:
            token_logprobs = meta.get("output_token_logprobs") or ()
            top_logprobs = meta.get("output_top_logprobs") or ()
            end = min(end, len(token_logprobs))
            out.logprobs = [
                _raw_logprob(token_logprobs[i], top_logprobs[i] if i < len(top_logprobs) else None)
                for i in range(self._sent, end)
            ]
        if end > self._sent:
            out.token_ids = list(ids[self._sent : end])
            self._sent = end
        if not out.token_ids and out.finished is None:
            return None
        return out


def _finish_reason(finish: Mapping[str, Any]) -> FinishReason:
    kind = finish.get("type")
    if kind == "length":
        return FinishReason.LENGTH
    if kind != "stop":
        log.warning("unknown finish reason from the engine: %r; reporting it as a stop", finish)
    # EOS, a stop token or string, SGLang's own "NaN happened" stop, a grammar's end.
    return FinishReason.STOP


def _raw_logprob(entry: Any, top: Any) -> RawLogprob:
    # SGLang's entries are (logprob, token_id, text or None); top is None or a list of such entries.
    logprob, _, _ = entry
    return RawLogprob(float(logprob), [(int(t_id), float(t_logprob)) for t_logprob, t_id, _ in top or ()])


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


class PrefixCollector:
    """Re-exports the metric families of another registry whose names start with `prefix`."""

    def __init__(self, registry: Any, prefix: str) -> None:
        self._registry = registry
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        for family in self._registry.collect():
            if family.name.startswith(self._prefix):
                yield family


# ---------------------------------------------------------------------------------------------- helpers


def check_schema_with_sglang(spec: GrammarSpec) -> None:
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


def generation_config(path: Path) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model sets no sampling defaults
        return GenerationConfig()


@contextlib.contextmanager
def keeping_root_logging(sglang_level: str) -> Iterator[None]:
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
def without_loop_signal_handler(loop: asyncio.AbstractEventLoop, sig: int) -> Iterator[None]:
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


def thinking_processor() -> str:
    """The serialized logit processor that applies a request's thinking budget inside SGLang's scheduler."""
    from service.engines.sglang_thinking import ThinkingBudgetProcessor

    return ThinkingBudgetProcessor.to_str()
