"""The service's configuration: one frozen dataclass, built from flags whose defaults come from the environment."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from service.engines.tool_calls import FORMATS


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"CHATSERVE_{name}", default)


def _env_int(name: str, default: int | None) -> int | None:
    value = _env(name, None)
    return int(value) if value not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    value = _env(name, None)
    return float(value) if value not in (None, "") else default


@dataclass(frozen=True)
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # Written with the bound port once serving (useful with --port 0).
    port_file: str | None = None
    engine: str = "auto"
    # A local Hugging Face model folder; None serves the embedded default (SmolLM2-135M-Instruct).
    model: str | None = None
    served_model_name: str | None = None
    context_length: int | None = None
    max_output_tokens: int = 8192
    dtype: str = "auto"
    # How the model writes tool calls (service/engines/tool_calls.py): its prompt, grammar and parser.
    tool_parser: str = "hermes"
    # Compute threads of the CPU engines (torch intra-op threads); None: one per core this process may use.
    threads: int | None = None
    # KV cache size in tokens; None: the engine's default (transformers 32768, SGLang on CPU sized from memory).
    kv_cache_tokens: int | None = None
    # transformers engine
    page_size: int = 32
    max_batch_tokens: int = 1024
    max_running: int = 64
    # sglang engine
    # auto: cuda when torch sees a CUDA GPU, else cpu (service/engines/sglang_cpu.py).
    device: str = "auto"
    # Further sglang ServerArgs fields, as given (--sglang-arg KEY=VALUE); later ones win.
    sglang_args: tuple[tuple[str, object], ...] = ()
    tp_size: int = 1
    # Multi-node SGLang (a model larger than one node): nodes, this node's rank, rank 0's address (host:port).
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    mem_fraction_static: float | None = None
    chunked_prefill_size: int | None = None
    max_running_requests: int | None = None
    schedule_policy: str = "lpm"
    quantization: str | None = None
    # synthetic engine (benchmarks only, never the default): tokens at a set rate without a model.
    # Per stream, and optionally a cap shared by all streams (0 = no cap), like a batch that slows as it grows.
    synthetic_tokens_per_s: float = 50.0
    synthetic_total_tokens_per_s: float = 0.0
    synthetic_ttft_s: float = 0.0
    # Tokens each stream gets per step (what one output carries): >1 stands in for a stream interval.
    synthetic_tokens_per_step: int = 1
    # admission control: generations admitted at once, and how many more may wait; beyond that, RESOURCE_EXHAUSTED
    max_inflight: int = 256
    max_queue: int = 512
    # Under load, a stream sends at most one message per interval, each carrying every token made meanwhile: the
    # cost of the gRPC and SSE hops follows messages, not tokens. The first message is never held back.
    stream_interval_ms: float = 40.0
    # Streams in flight from which the interval applies; below it every token is sent at once.
    coalesce_min_streams: int = 64
    # On SIGTERM: how long in-flight generations may run on before they are cancelled.
    shutdown_grace_s: float = 30.0
    metrics_port: int | None = 9090
    # Written with the bound metrics port once serving (useful with --metrics-port 0).
    metrics_port_file: str | None = None
    metrics_host: str = "127.0.0.1"
    # When set, every call must carry `authorization: Bearer <token>` metadata.
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    log_level: str = "INFO"
    log_json: bool = False
    # SIGUSR1 crashes the engine loop: for testing that a dead engine is noticed and the process restarted.
    enable_fault_injection: bool = False

    def redacted(self) -> dict[str, object]:
        """The settings that differ from the defaults, with secrets masked: what the service logs at start."""
        defaults = ServiceConfig()
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = "***" if f.name == "auth_token" else value
        return out


def _sglang_arg(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON where it is JSON (numbers, true/false, lists) and as a string otherwise."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--").replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_args(argv: list[str] | None = None) -> ServiceConfig:
    d = ServiceConfig()
    p = argparse.ArgumentParser(
        prog="python -m service",
        description="The gRPC generation service (generate.v1.Generate). Flags default to CHATSERVE_* environment variables.",
    )
    p.add_argument("--host", default=_env("GRPC_HOST", d.host), help="address to bind (CHATSERVE_GRPC_HOST)")
    p.add_argument("--port", type=int, default=_env_int("GRPC_PORT", d.port), help="gRPC port; 0 picks a free one")
    p.add_argument("--port-file", default=_env("PORT_FILE", None), help="write the bound port to this file")
    p.add_argument(
        "--engine",
        choices=["auto", "transformers", "sglang", "synthetic"],
        default=_env("ENGINE", d.engine),
        help="auto: sglang with a CUDA GPU and the sglang package, else transformers on the CPU; "
        "synthetic: no model, tokens at a set rate, for benchmarking the serving stack only (never the default)",
    )
    p.add_argument("--model", default=_env("MODEL", None), help="local Hugging Face model folder (default: SmolLM2-135M-Instruct, embedded)")
    p.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME", None), help="the name clients use (default: the model folder's name)")
    p.add_argument("--context-length", type=int, default=_env_int("CONTEXT_LENGTH", None), help="override the model's context window")
    p.add_argument("--max-output-tokens", type=int, default=_env_int("MAX_OUTPUT_TOKENS", d.max_output_tokens))
    p.add_argument("--dtype", default=_env("DTYPE", d.dtype), help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--tool-parser",
        choices=sorted(FORMATS),
        default=_env("TOOL_PARSER", d.tool_parser),
        help="the model's tool-call syntax: hermes is <tool_call>{...}</tool_call> (Hermes, Qwen2.5, Qwen3, and the "
        "default model, which is prompted with it) (CHATSERVE_TOOL_PARSER)",
    )
    p.add_argument("--threads", type=int, default=_env_int("THREADS", None), help="compute threads of the CPU engines (default: one per core this process may use) (CHATSERVE_THREADS)")
    p.add_argument("--kv-cache-tokens", type=int, default=_env_int("KV_CACHE_TOKENS", None), help="KV cache size in tokens (default: transformers 32768; sglang on CPU: 10%% of the memory available at start, 4096-65536; sglang on GPU: from --mem-fraction-static) (CHATSERVE_KV_CACHE_TOKENS)")
    g = p.add_argument_group("transformers engine")
    g.add_argument("--page-size", type=int, default=_env_int("PAGE_SIZE", d.page_size), help="tokens per KV cache page (prefix sharing works in whole pages)")
    g.add_argument("--max-batch-tokens", type=int, default=_env_int("MAX_BATCH_TOKENS", d.max_batch_tokens), help="tokens per forward pass (chunked prefill size)")
    g.add_argument("--max-running", type=int, default=_env_int("MAX_RUNNING", d.max_running), help="sequences per batch")
    g = p.add_argument_group("sglang engine")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=_env("DEVICE", d.device), help="auto: cuda when a CUDA GPU is visible, else cpu (SGLang's CPU engine, see README) (CHATSERVE_DEVICE)")
    g.add_argument("--sglang-arg", dest="sglang_args", action="append", type=_sglang_arg, default=[], metavar="KEY=VALUE", help="any other sglang ServerArgs field, e.g. --sglang-arg enable_deterministic_inference=true (repeatable; values read as JSON where they parse)")
    g.add_argument("--tp-size", type=int, default=_env_int("TP_SIZE", d.tp_size), help="tensor parallel size (GPUs per replica, over all its nodes)")
    g.add_argument("--nnodes", type=int, default=_env_int("NNODES", d.nnodes), help="nodes one replica spans (multi-node tensor parallelism)")
    g.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK", d.node_rank), help="this node's rank; the service serves on rank 0")
    g.add_argument("--dist-init-addr", default=_env("DIST_INIT_ADDR", None), help="host:port of rank 0 for multi-node setup")
    g.add_argument("--mem-fraction-static", type=float, default=_env_float("MEM_FRACTION_STATIC", 0) or None)
    g.add_argument("--chunked-prefill-size", type=int, default=_env_int("CHUNKED_PREFILL_SIZE", None))
    g.add_argument("--max-running-requests", type=int, default=_env_int("MAX_RUNNING_REQUESTS", None))
    g.add_argument("--schedule-policy", default=_env("SCHEDULE_POLICY", d.schedule_policy), help="lpm (longest prefix match, favours RadixAttention hits) or fcfs")
    g.add_argument("--quantization", default=_env("QUANTIZATION", None), help="e.g. fp8, awq, gptq")
    g = p.add_argument_group("synthetic engine (benchmarks only: emits placeholder tokens, never serves a model)")
    g.add_argument("--synthetic-tokens-per-s", type=float, default=_env_float("SYNTHETIC_TOKENS_PER_S", d.synthetic_tokens_per_s), help="tokens per second per stream; 0: no per-stream limit (then set the total)")
    g.add_argument("--synthetic-total-tokens-per-s", type=float, default=_env_float("SYNTHETIC_TOTAL_TOKENS_PER_S", d.synthetic_total_tokens_per_s), help="tokens per second shared by all streams (0: no shared cap), e.g. 20000 across 256 streams")
    g.add_argument("--synthetic-ttft", type=float, default=_env_float("SYNTHETIC_TTFT_S", d.synthetic_ttft_s), help="seconds before a request's first token (a stand-in for prefill)")
    g.add_argument("--synthetic-tokens-per-step", type=int, default=_env_int("SYNTHETIC_TOKENS_PER_STEP", d.synthetic_tokens_per_step), help="tokens per stream per step, i.e. per output message (1: one token a message)")
    g = p.add_argument_group("admission and shutdown")
    g.add_argument("--max-inflight", type=int, default=_env_int("MAX_INFLIGHT", d.max_inflight), help="generations admitted at once")
    g.add_argument("--max-queue", type=int, default=_env_int("MAX_QUEUE", d.max_queue), help="generations that may wait for admission")
    g.add_argument("--stream-interval-ms", type=float, default=_env_float("STREAM_INTERVAL_MS", d.stream_interval_ms), help="under load, the least time between two messages of a stream (0: send every token at once)")
    g.add_argument("--coalesce-min-streams", type=int, default=_env_int("COALESCE_MIN_STREAMS", d.coalesce_min_streams), help="streams in flight from which --stream-interval-ms applies")
    g.add_argument("--shutdown-grace", type=float, default=_env_float("SHUTDOWN_GRACE_S", d.shutdown_grace_s), help="seconds in-flight generations get to finish on SIGTERM")
    g = p.add_argument_group("operations")
    g.add_argument("--metrics-port", type=int, default=_env_int("METRICS_PORT", d.metrics_port), help="Prometheus /metrics port; -1 disables")
    g.add_argument("--metrics-host", default=_env("METRICS_HOST", d.metrics_host))
    g.add_argument("--metrics-port-file", default=_env("METRICS_PORT_FILE", None), help="write the bound metrics port to this file")
    g.add_argument("--auth-token-file", default=_env("AUTH_TOKEN_FILE", None), help="require this bearer token (file content) in call metadata")
    g.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    g.add_argument("--log-json", action="store_true", default=_env("LOG_JSON", "") in ("1", "true"))
    g.add_argument("--enable-fault-injection", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    auth_token = os.environ.get("CHATSERVE_AUTH_TOKEN") or None
    if a.auth_token_file:
        with open(a.auth_token_file, encoding="utf-8") as f:
            auth_token = f.read().strip() or None
    return ServiceConfig(
        host=a.host,
        port=a.port,
        port_file=a.port_file,
        engine=a.engine,
        model=a.model,
        served_model_name=a.served_model_name,
        context_length=a.context_length,
        max_output_tokens=a.max_output_tokens,
        dtype=a.dtype,
        tool_parser=a.tool_parser,
        threads=a.threads,
        kv_cache_tokens=a.kv_cache_tokens,
        page_size=a.page_size,
        max_batch_tokens=a.max_batch_tokens,
        max_running=a.max_running,
        device=a.device,
        sglang_args=tuple(a.sglang_args),
        tp_size=a.tp_size,
        nnodes=a.nnodes,
        node_rank=a.node_rank,
        dist_init_addr=a.dist_init_addr,
        mem_fraction_static=a.mem_fraction_static,
        chunked_prefill_size=a.chunked_prefill_size,
        max_running_requests=a.max_running_requests,
        schedule_policy=a.schedule_policy,
        quantization=a.quantization,
        synthetic_tokens_per_s=a.synthetic_tokens_per_s,
        synthetic_total_tokens_per_s=a.synthetic_total_tokens_per_s,
        synthetic_ttft_s=a.synthetic_ttft,
        synthetic_tokens_per_step=a.synthetic_tokens_per_step,
        max_inflight=a.max_inflight,
        max_queue=a.max_queue,
        stream_interval_ms=a.stream_interval_ms,
        coalesce_min_streams=a.coalesce_min_streams,
        shutdown_grace_s=a.shutdown_grace,
        metrics_port=None if a.metrics_port is not None and a.metrics_port < 0 else a.metrics_port,
        metrics_host=a.metrics_host,
        metrics_port_file=a.metrics_port_file,
        auth_token=auth_token,
        log_level=a.log_level,
        log_json=a.log_json,
        enable_fault_injection=a.enable_fault_injection,
    )
