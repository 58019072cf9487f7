"""Which engine a benchmark runs, and starting the targets for it: one service (the gateway and the direct
gRPC target share it), one gateway, the peer, and an in-process engine built from the same settings."""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.targets import GrpcTarget, InProcessTarget, SseTarget, Target

ALL_TARGETS = ("gateway", "grpc", "inprocess", "peer")


@dataclass(frozen=True)
class Variant:
    """How the stack's processes are started, for experiments that change no code: extra environment
    variables, and the service started through a shim module (see bench/variants.py)."""

    label: str = "as shipped"
    service_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    service_module: str = "service"


@dataclass(frozen=True)
class EngineSpec:
    kind: str = "synthetic"  # synthetic | transformers | sglang
    # synthetic engine
    tokens_per_s: float = 50.0
    total_tokens_per_s: float = 0.0
    ttft_s: float = 0.0
    tokens_per_step: int = 1
    # transformers engine (the service's own defaults; the peer is given the same KV cache geometry)
    model: str | None = None
    dtype: str = "auto"  # the service's default: bf16 where the CPU has bf16 units, else float32
    page_size: int = 32
    kv_cache_tokens: int = 32768
    max_batch_tokens: int = 1024

    def model_path(self) -> str:
        if self.model:
            return self.model
        from service.engines.default_model import ensure_default_model

        return str(ensure_default_model())

    def service_args(self) -> list[str]:
        if self.kind == "synthetic":
            return ["--engine", "synthetic", "--synthetic-tokens-per-s", f"{self.tokens_per_s:g}",
                    "--synthetic-total-tokens-per-s", f"{self.total_tokens_per_s:g}", "--synthetic-ttft", f"{self.ttft_s:g}",
                    "--synthetic-tokens-per-step", str(self.tokens_per_step)]
        if self.kind == "sglang":
            # SGLang's own CPU settings (service/engines/sglang_cpu.py): dtype from the CPU's bf16 units unless set.
            return ["--engine", "sglang", "--model", self.model_path(), "--dtype", self.dtype,
                    "--kv-cache-tokens", str(self.kv_cache_tokens)]
        return ["--engine", self.kind, "--model", self.model_path(), "--dtype", self.dtype,
                "--page-size", str(self.page_size), "--kv-cache-tokens", str(self.kv_cache_tokens),
                "--max-batch-tokens", str(self.max_batch_tokens)]

    def service_config(self):
        from service.config import ServiceConfig

        if self.kind == "synthetic":
            return ServiceConfig(engine="synthetic", synthetic_tokens_per_s=self.tokens_per_s,
                                 synthetic_total_tokens_per_s=self.total_tokens_per_s, synthetic_ttft_s=self.ttft_s,
                                 synthetic_tokens_per_step=self.tokens_per_step, metrics_port=None)
        return ServiceConfig(engine=self.kind, model=self.model_path(), dtype=self.dtype, page_size=self.page_size,
                             kv_cache_tokens=self.kv_cache_tokens, max_batch_tokens=self.max_batch_tokens, metrics_port=None)

    def describe(self) -> str:
        if self.kind == "synthetic":
            per = "unlimited" if not self.tokens_per_s else f"{self.tokens_per_s:g}"
            total = f", {self.total_tokens_per_s:g} tokens/s shared" if self.total_tokens_per_s else ""
            ttft = f", first token after {self.ttft_s * 1000:g} ms" if self.ttft_s else ""
            step = f", {self.tokens_per_step} tokens per step" if self.tokens_per_step > 1 else ""
            return f"synthetic engine ({per} tokens/s per stream{total}{ttft}{step})"
        dtype = self.dtype
        if dtype == "auto":
            from service.engines.cpu_features import cpu_dtype, cpu_flags

            dtype = f"auto: {cpu_dtype('auto', cpu_flags())}"
        return f"{self.kind} engine, {Path(self.model_path()).name}, {dtype}, CPU"


@dataclass
class Stack:
    """The processes and targets of one benchmark invocation; `close()` stops everything it started."""

    targets: dict[str, Target] = field(default_factory=dict)
    service: procs.Service | None = None
    gateway: procs.Gateway | None = None
    peer: procs.Peer | None = None
    startup_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def processes(self) -> dict[str, procs.Proc]:
        out = {}
        for name, part in (("service", self.service), ("gateway", self.gateway), ("peer", self.peer)):
            if part is not None:
                out[name] = part.proc
        return out

    async def close(self) -> None:
        for target in self.targets.values():
            with contextlib.suppress(Exception):
                await target.close()
        for part in (self.gateway, self.service, self.peer):
            if part is not None:
                part.proc.stop()


async def start(spec: EngineSpec, names: list[str], workdir: Path, log=print, variant: Variant = Variant()) -> Stack:
    stack = Stack()
    try:
        await _start(stack, spec, names, workdir, log, variant)
    except BaseException:
        await stack.close()
        raise
    return stack


async def _start(stack: Stack, spec: EngineSpec, names: list[str], workdir: Path, log, variant: Variant) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if {"gateway", "grpc"} & set(names):
        log(f"starting the service ({spec.describe()})")
        from common.procs import engine_python

        stack.service = procs.start_service(workdir, spec.service_args(), env=variant.service_env,
                                            module=variant.service_module, python=engine_python(spec.kind),
                                            timeout=600)
        stack.startup_s["service"] = stack.service.ready_s
        model = await _served_model(stack.service.target)
    if "gateway" in names:
        key = "sk-bench-" + secrets.token_urlsafe(16)
        stack.gateway = procs.start_gateway(workdir, stack.service.target, key, env=variant.gateway_env)
        stack.startup_s["gateway"] = stack.gateway.ready_s
        pids = {"gateway": stack.gateway.proc.pid, "service": stack.service.proc.pid}
        stack.targets["gateway"] = SseTarget("gateway", stack.gateway.base_url, model, key, usage_option=True,
                                             extras=True, pids=pids)
    if "grpc" in names:
        stack.targets["grpc"] = GrpcTarget(stack.service.target, model, {"service": stack.service.proc.pid})
    if "inprocess" in names and spec.kind == "sglang":
        # sglang lives in an environment of its own, not this process's.
        stack.skipped["inprocess"] = "the sglang engine runs in its own environment, not in the harness's process"
    elif "inprocess" in names:
        from service.server import build_pipeline

        stack.targets["inprocess"] = InProcessTarget(build_pipeline(spec.service_config()))
    if "peer" in names:
        if spec.kind != "transformers":
            stack.skipped["peer"] = "the peer serves a real model: run it with --engine transformers"
        else:
            log("starting the peer (transformers serve)")
            from service.engines.cpu_features import cpu_dtype, cpu_flags

            stack.peer = procs.start_peer(workdir, spec.model_path(), cpu_dtype(spec.dtype, cpu_flags()), spec.page_size,
                                          spec.kv_cache_tokens, spec.max_batch_tokens)
            stack.startup_s["peer"] = stack.peer.ready_s
            stack.targets["peer"] = SseTarget("peer", stack.peer.base_url, stack.peer.model, None, usage_option=False,
                                              extras=False, pids={"peer": stack.peer.proc.pid})
    for name in names:
        if name in stack.targets:
            await stack.targets[name].open()


async def _served_model(target: str) -> str:
    import grpc
    from generate.v1 import generate_pb2 as pb
    from generate.v1 import generate_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        info = await pb_grpc.GenerateStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    return info.model
