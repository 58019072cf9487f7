"""Starting the processes a benchmark measures: the service, the gateway and the peer (`transformers serve`),
each on an ephemeral port read back from a port file (or the peer's own log line), logs captured to files,
readiness by health checks, and their CPU time read from /proc for the report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import procs
from common.procs import scrape, stop_process  # noqa: F401  (scrape: used as bench.procs.scrape)

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 30) -> int | None:
        return stop_process(self.process, timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads and its live child processes so far (SGLang's engine
    computes in its scheduler, a child of the service)."""
    total = 0.0
    for p in (pid, *_descendants(pid)):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its closing parenthesis are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(c) for c in children.read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "wb")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    return Proc(name, process, log_path)


def wait_for_file(path: Path, proc: Proc, timeout: float = 120) -> str:
    return procs.wait_for_file(path, proc.process, proc.name, timeout, interval=0.02, context=proc.log)


def wait_serving(target: str, proc: Proc | None = None, timeout: float = 300, interval: float = 0.02) -> float:
    """Poll the gRPC health check until SERVING; returns the monotonic time it first answered SERVING."""
    return procs.wait_serving(target, proc and proc.process, proc.name if proc else "service", timeout, interval,
                              proc and proc.log)


def wait_http_ok(url: str, proc: Proc | None = None, timeout: float = 120, interval: float = 0.05) -> float:
    return procs.wait_http_ok(url, proc and proc.process, proc.name if proc else "process", timeout, interval,
                              proc and proc.log)


@dataclass
class Service:
    proc: Proc
    target: str
    metrics_url: str
    ready_s: float  # from spawn to SERVING


def start_service(workdir: Path, service_args: list[str], name: str = "service", timeout: float = 300,
                  env: dict[str, str] | None = None, module: str = "service", python: str | None = None) -> Service:
    """`module` lets an experiment start the service through a shim (bench.variants); `env` adds variables;
    `python` runs it in another environment (the sglang engine's)."""
    port_file, metrics_file = workdir / f"{name}.port", workdir / f"{name}.metrics"
    for f in (port_file, metrics_file):
        f.unlink(missing_ok=True)
    proc = spawn(
        name,
        [python or sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file), "--metrics-port", "0",
         "--metrics-port-file", str(metrics_file), *service_args],
        workdir,
        env,
    )
    target = f"127.0.0.1:{wait_for_file(port_file, proc, timeout)}"
    metrics_port = wait_for_file(metrics_file, proc, timeout)
    serving_at = wait_serving(target, proc, timeout)
    return Service(proc, target, f"http://127.0.0.1:{metrics_port}/metrics", serving_at - proc.started_at)


@dataclass
class Gateway:
    proc: Proc
    base_url: str  # http://127.0.0.1:PORT (no /v1)
    api_key: str
    ready_s: float


def start_gateway(workdir: Path, backend: str, api_key: str, name: str = "gateway", extra: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Gateway:
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = spawn(
        name,
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
         "--backend", backend, *(extra or [])],
        workdir,
        {"API_KEYS": api_key, **(env or {})},
    )
    base = f"http://127.0.0.1:{wait_for_file(port_file, proc)}"
    ready_at = wait_http_ok(f"{base}/livez", proc)
    return Gateway(proc, base, api_key, ready_at - proc.started_at)


@dataclass
class Peer:
    proc: Proc
    base_url: str
    model: str  # the id it is pinned to (the model folder)
    ready_s: float


# Uvicorn prints the port it really bound, also for --port 0.
_UVICORN_PORT = re.compile(r"Uvicorn running on http://[^:]+:(\d+)")


def peer_command() -> list[str]:
    script = Path(sys.executable).parent / "transformers"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]


def start_peer(workdir: Path, model: str, dtype: str, page_size: int, kv_cache_tokens: int, max_batch_tokens: int,
               timeout: float = 300) -> Peer:
    """`transformers serve` pinned to the same model folder, on the CPU, in the same dtype, with continuous
    batching and the same KV cache geometry as our transformers engine (its own default page is 256 tokens,
    which would share a 1,000-token system prompt in 3 pages instead of 31)."""
    proc = spawn(
        "peer",
        [*peer_command(), "serve", model, "--continuous-batching", "--device", "cpu", "--dtype", dtype,
         "--host", "127.0.0.1", "--port", "0", "--cb-block-size", str(page_size),
         "--cb-num-blocks", str(max(1, kv_cache_tokens // page_size)), "--cb-max-batch-tokens", str(max_batch_tokens),
         "--log-level", "warning"],
        workdir,
    )
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        match = _UVICORN_PORT.search(proc.log(tail=100_000))
        if match:
            port = int(match.group(1))
            break
        if not proc.alive():
            raise RuntimeError(f"the peer exited with {proc.process.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the peer did not start within {timeout} s:\n{proc.log()}")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    ready_at = wait_http_ok(f"{base}/health", proc, timeout)
    return Peer(proc, base, model, ready_at - proc.started_at)


