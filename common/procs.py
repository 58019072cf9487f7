"""Waiting for a started process to be ready, and stopping it: shared by `make run` (deploy/run_local.py), the
test suite and the benchmarks, which all start the real service and gateway as child processes.

Each wait polls until the condition holds, fails at once when the process has exited, and fails after
`timeout` seconds. `context` (optional) is called for text to add to the error, such as the tail of the
process's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


ROOT = Path(__file__).resolve().parents[1]


def engine_python(engine: str) -> str:
    """The interpreter that runs a service with this engine: SGLang has an environment of its own (sglang pins its
    own torch and transformers; `make` builds it as .venv-sglang, CHATSERVE_SGLANG_PYTHON names another), every
    other engine runs in this one. A missing sglang environment is an error, never a silent fallback."""
    if engine != "sglang":
        return sys.executable
    python = os.environ.get("CHATSERVE_SGLANG_PYTHON") or str(ROOT / ".venv-sglang" / "bin" / "python")
    if not Path(python).exists():
        raise RuntimeError(f"the sglang engine's environment is missing ({python}); `make test-sglang` builds it")
    return python


class ProcessExited(RuntimeError):
    """The process being waited for exited before it was ready."""


def _check_alive(process: subprocess.Popen | None, name: str, context: Callable[[], str] | None) -> None:
    if process is not None and process.poll() is not None:
        raise ProcessExited(_message(f"the {name} exited with code {process.returncode} while starting", context))


def _message(text: str, context: Callable[[], str] | None) -> str:
    extra = context() if context is not None else ""
    return f"{text}:\n{extra}" if extra else text


def wait_for_file(
    path: Path,
    process: subprocess.Popen | None,
    name: str = "process",
    timeout: float = 120,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> str:
    """The stripped contents of `path` once it is non-empty (a port file the process writes once bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return text
        _check_alive(process, name, context)
        time.sleep(interval)
    raise TimeoutError(_message(f"the {name} did not write {path} within {timeout:.0f} s", context))


def wait_serving(
    target: str,
    process: subprocess.Popen | None = None,
    name: str = "service",
    timeout: float = 300,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> float:
    """Poll the standard gRPC health check until SERVING; returns the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            _check_alive(process, name, context)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic()
            except grpc.RpcError:
                pass
            time.sleep(interval)
    raise TimeoutError(_message(f"the {name} at {target} was not SERVING within {timeout:.0f} s", context))


def wait_http_ok(
    url: str,
    process: subprocess.Popen | None = None,
    name: str = "gateway",
    timeout: float = 120,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> float:
    """Poll `url` until it answers 200; returns the monotonic time it first did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(process, name, context)
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(_message(f"the {name} did not answer {url} with 200 within {timeout:.0f} s", context))


def stop_process(process: subprocess.Popen, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
    """Send `sig` (SIGTERM: drain and exit), kill after `timeout` seconds; returns the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples as {'name{label="v",...}': value} (unlabelled ones as just 'name')."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
