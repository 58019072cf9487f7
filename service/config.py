"""The service's configuration: one frozen dataclass, built from flags whose defaults come from the environment."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from common import flags
from service.engines.reasoning import PARSERS
from service.engines.tool_calls import FORMATS


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
    tool_parser: str = "auto"
    # A Jinja chat template file used instead of the model's own.
    chat_template: str | None = None
    # How the model's reasoning is told from its answer (service/engines/reasoning.py); auto reads the template.
    reasoning_parser: str = "auto"
    # Chat-template variables every chat gets unless it sets them itself, e.g. (("enable_thinking", False),).
    chat_template_kwargs: tuple[tuple[str, object], ...] = ()
    # A reasoning model's thinking is closed after this many tokens unless a request says otherwise; None: no cap.
    max_reasoning_tokens: int | None = None
    # Compute threads of the CPU engines (torch intra-op threads); None: one per core this process may use.
    threads: int | None = None
    # KV cache size in tokens; None: the engine's default (transformers 32768, SGLang on CPU sized from memory).
    kv_cache_tokens: int | None = None
    # transformers engine
    page_size: int = 32
    max_batch_tokens: int = 1024
    max_running: int = 64
    # varlen: each sequence of a batch attends to its own keys (service/engines/varlen_attention.py); sdpa:
    # transformers' own path, one SDPA call with a block-diagonal mask over the whole batch.
    attention: str = "varlen"
    # compiled: our own continuous batching over a compiled decoder (service/engines/compiled/), for the
    # architectures it knows; transformers: the library's own continuous batching; auto: compiled where it can.
    runner: str = "auto"
    # Compile the decoder with torch.compile (Inductor); off: the same decoder run op by op.
    compile: bool = True
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


def build_parser() -> argparse.ArgumentParser:
    d = ServiceConfig()
    p = argparse.ArgumentParser(
        prog="python -m service",
        description="The gRPC generation service (generate.v1.Generate).\n"
        "Each flag's default can be set with the environment variable in [brackets], named after the flag.",
        formatter_class=flags.Formatter,
    )
    add = flags.add
    add(p, "--grpc-host", "--host", dest="host", default=d.host, help="address to listen on for gRPC")
    add(p, "--grpc-port", "--port", dest="port", type=int, default=d.port, help="gRPC port; 0 picks a free one")
    add(p, "--port-file", help="write the bound gRPC port to this file once listening")
    add(p, "--engine", choices=["auto", "transformers", "sglang", "synthetic"], default=d.engine,
        help="auto: sglang with a CUDA GPU and the sglang package, else transformers on the CPU; "
        "synthetic: no model, tokens at a set rate, for benchmarking the serving stack only (never the default)")
    add(p, "--model", help="local Hugging Face model folder (default: SmolLM2-135M-Instruct, embedded: tiny, English)")
    add(p, "--served-model-name", help="the name clients use (default: the model folder's name)")
    add(p, "--context-length", type=int, help="override the model's context window, in tokens")
    add(p, "--max-output-tokens", type=int, default=d.max_output_tokens, help="most tokens one answer may have")
    add(p, "--dtype", default=d.dtype, help="weights: auto, float32, bfloat16 or float16 (auto: on CPUs bfloat16 where the CPU has bf16 "
        "units - avx512_bf16 or AMX - else float32; the model's own on GPUs)")
    add(p, "--tool-parser", choices=["auto", *sorted(FORMATS)], default=d.tool_parser,
        help="the model's tool-call syntax: hermes is <tool_call>{...}</tool_call> (Hermes, Qwen2.5, Qwen3, and the "
        "default model, which is prompted with it); qwen3_coder is the XML <function=...><parameter=...> of "
        "Qwen3-Coder and Qwen3.5+; auto reads the model's chat template")
    add(p, "--chat-template", type=_template_file, help="a Jinja chat template file to use instead of the model's own (for both engines: "
        "the service renders every prompt itself)")
    add(p, "--reasoning-parser", choices=PARSERS, default=d.reasoning_parser,
        help="how the model's thinking is told from its answer (reasoning_content): qwen3 (<think>...</think> at the "
        "start), qwen3-thinking (Qwen3-2507 Thinking: the output starts inside it), none; auto reads the chat template")
    add(p, "--chat-template-kwargs", type=_template_kwargs, default={},
        help='chat-template variables every chat gets unless it sets them, as a JSON object, e.g. \'{"enable_thinking": false}\'')
    add(p, "--max-reasoning-tokens", type=int, help="close a reasoning model's thinking after this many tokens, so "
        "its answer always comes (a request's max_reasoning_tokens overrides it; default: no cap)")
    add(p, "--threads", type=int, help="compute threads of the CPU engines (default: one per core this process may "
        "use; on a machine shared with other busy processes, fewer is faster)")
    add(p, "--kv-cache-tokens", type=int, help="KV cache size in tokens (default: transformers 32768; sglang on CPU: "
        "10%% of the memory available at start, 4096-65536; sglang on GPU: from --mem-fraction-static)")
    g = p.add_argument_group("transformers engine")
    add(g, "--page-size", type=int, default=d.page_size, help="tokens per KV cache page (prefix sharing works in whole pages)")
    add(g, "--max-batch-tokens", type=int, default=d.max_batch_tokens, help="tokens per forward pass (chunked prefill size)")
    add(g, "--max-running", type=int, default=d.max_running, help="sequences per batch")
    add(g, "--attention", choices=["varlen", "sdpa"], default=d.attention,
        help="varlen: each sequence attends to its own keys (default); sdpa: transformers' own masked batch attention "
        "(the transformers runner only)")
    add(g, "--runner", choices=["auto", "compiled", "transformers"], default=d.runner,
        help="compiled: the decoder compiled as one graph, with our own continuous batching (Llama, Mistral, Qwen2, "
        "Qwen3); transformers: the library's continuous batching; auto: compiled where the architecture allows")
    add(g, "--compile", action=argparse.BooleanOptionalAction, default=d.compile,
        help="compile the decoder with torch.compile (compiled runner; artifacts cached on disk)")
    g = p.add_argument_group("sglang engine")
    add(g, "--device", choices=["auto", "cuda", "cpu"], default=d.device,
        help="auto: cuda when a CUDA GPU is visible, else cpu (SGLang's CPU engine, see README)")
    add(g, "--sglang-arg", dest="sglang_args", action="append", type=_sglang_arg, default=[], metavar="KEY=VALUE",
        env=False, help="any other sglang ServerArgs field, e.g. --sglang-arg enable_deterministic_inference=true "
        "(repeatable; values read as JSON where they parse)")
    add(g, "--tp-size", type=int, default=d.tp_size, help="tensor parallel size (GPUs per replica, over all its nodes)")
    add(g, "--nnodes", type=int, default=d.nnodes, help="nodes one replica spans (multi-node tensor parallelism)")
    add(g, "--node-rank", type=int, default=d.node_rank, help="this node's rank; the service serves on rank 0")
    add(g, "--dist-init-addr", help="host:port of rank 0 for multi-node setup")
    add(g, "--mem-fraction-static", type=float, help="share of GPU memory for weights and KV cache (SGLang's default)")
    add(g, "--chunked-prefill-size", type=int, help="tokens per prefill chunk (SGLang's default)")
    add(g, "--max-running-requests", type=int, help="requests per batch (SGLang's default)")
    add(g, "--schedule-policy", default=d.schedule_policy, help="lpm (longest prefix match, favours RadixAttention hits) or fcfs")
    add(g, "--quantization", help="sglang: e.g. fp8, awq, gptq; transformers (compiled runner): int8 (weight-only), "
        "none, or unset to measure at start whether int8 is faster on this CPU")
    g = p.add_argument_group("synthetic engine (benchmarks only: emits placeholder tokens, never serves a model)")
    add(g, "--synthetic-tokens-per-s", type=float, default=d.synthetic_tokens_per_s, help="tokens per second per stream; 0: no per-stream limit (then set the total)")
    add(g, "--synthetic-total-tokens-per-s", type=float, default=d.synthetic_total_tokens_per_s, help="tokens per second shared by all streams (0: no shared cap), e.g. 20000 across 256 streams")
    add(g, "--synthetic-ttft", type=float, default=d.synthetic_ttft_s, old_env="SYNTHETIC_TTFT_S", help="seconds before a request's first token (a stand-in for prefill)")
    add(g, "--synthetic-tokens-per-step", type=int, default=d.synthetic_tokens_per_step, help="tokens per stream per step, i.e. per output message (1: one token a message)")
    g = p.add_argument_group("admission and shutdown")
    add(g, "--max-inflight", type=int, default=d.max_inflight, help="generations admitted at once")
    add(g, "--max-queue", type=int, default=d.max_queue, help="generations that may wait for admission; beyond, RESOURCE_EXHAUSTED (HTTP 429)")
    add(g, "--stream-interval-ms", type=float, default=d.stream_interval_ms, help="under load, the least time in milliseconds between two messages of a stream (0: send every token at once)")
    add(g, "--coalesce-min-streams", type=int, default=d.coalesce_min_streams, help="streams in flight from which --stream-interval-ms applies")
    add(g, "--shutdown-grace", type=float, default=d.shutdown_grace_s, old_env="SHUTDOWN_GRACE_S", help="seconds in-flight generations get to finish on SIGTERM")
    g = p.add_argument_group("operations")
    add(g, "--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port; 0 picks a free one, -1 disables")
    add(g, "--metrics-host", default=d.metrics_host, help="address the metrics port listens on")
    add(g, "--metrics-port-file", help="write the bound metrics port to this file")
    add(g, "--auth-token-file", help="require this bearer token (the file's content) in every call's metadata (CHATSERVE_AUTH_TOKEN also sets it)")
    add(g, "--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    add(g, "--log-json", action="store_true", default=False, help="one JSON object per log line")
    add(g, "--enable-fault-injection", action="store_true", default=False, env=False, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> ServiceConfig:
    p = build_parser()
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
        chat_template=a.chat_template,
        reasoning_parser=a.reasoning_parser,
        chat_template_kwargs=tuple(sorted(a.chat_template_kwargs.items())),
        max_reasoning_tokens=a.max_reasoning_tokens,
        threads=a.threads,
        kv_cache_tokens=a.kv_cache_tokens,
        page_size=a.page_size,
        max_batch_tokens=a.max_batch_tokens,
        max_running=a.max_running,
        attention=a.attention,
        runner=a.runner,
        compile=a.compile,
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


def _template_kwargs(text: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        raise argparse.ArgumentTypeError("not JSON: give a JSON object, e.g. '{\"enable_thinking\": false}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def _template_file(path: str) -> str:
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path
