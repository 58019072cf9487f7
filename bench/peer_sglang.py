"""SGLang's own server on this CPU, set up exactly as the product's SGLang engine sets up SGLang (for `bench.peers`).

    .venv-sglang/bin/python -m bench.peer_sglang --model DIR --port P [--grpc] [--dtype auto]

The CPU plan (service/engines/sglang_cpu.py: dtype from the CPU's bf16 units, torch_native attention with the
import-only sgl_kernel stand-in, sleep on idle, the KV cache size, threads) and longest-prefix-match scheduling are
applied, then this process becomes `python -m sglang.launch_server` with them: its HTTP server (OpenAI API), or
with `--grpc` its gRPC server for SGLang's Rust gateway SMG. Runs in the sglang environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace


def launch_argv(model: str, port: int, name: str, kwargs: dict, grpc: bool) -> list[str]:
    argv = ["--model-path", model, "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            "--schedule-policy", "lpm", "--log-level", "warning"]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    if grpc:
        argv.append("--grpc-mode")
    return argv


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grpc", action="store_true", help="SGLang's gRPC server (for SMG) instead of its HTTP server")
    a = p.parse_args(argv)
    from service.engines import sglang_cpu

    config = SimpleNamespace(dtype=a.dtype, threads=a.threads, kv_cache_tokens=a.kv_cache_tokens)
    plan = sglang_cpu.plan_for(config, Path(a.model), {})
    sglang_cpu.apply(plan)  # the environment the exec'd server and its child processes inherit
    print(plan.describe(), flush=True)
    args = launch_argv(a.model, a.port, a.name, plan.kwargs, a.grpc)
    os.execv(sys.executable, [sys.executable, "-m", "sglang.launch_server", *args])


if __name__ == "__main__":
    main()
