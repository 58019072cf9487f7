"""Starting the real processes for tests: ephemeral ports, logs captured to files, readiness by health checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import procs
from common.procs import scrape, stop_process
from tests.helpers.engines import python_for, service_args

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self) -> str:
        return self.log()[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return stop_process(self.process, timeout, sig)


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None, python: str | None = None) -> Proc:
    log_file = open(log_path, "wb")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(
        [python or sys.executable, *args], cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
    )
    return Proc(process, log_path)


def wait_for_file(path: Path, proc: Proc, timeout: float = 120) -> str:
    return procs.wait_for_file(path, proc.process, timeout=timeout, context=proc.tail)


def wait_serving(target: str, proc: Proc | None = None, timeout: float = 180) -> None:
    procs.wait_serving(target, proc and proc.process, timeout=timeout, context=proc and proc.tail)


def wait_http_ok(url: str, proc: Proc | None = None, timeout: float = 60) -> None:
    procs.wait_http_ok(url, proc and proc.process, timeout=timeout, context=proc and proc.tail)


@dataclass
class Service:
    proc: Proc
    target: str
    metrics_url: str

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)


def start_service(
    tmp: Path, *extra: str, name: str = "service", port: int = 0, env: dict[str, str] | None = None,
    engine: str | None = None, timeout: float = 180, compile: bool = False,
) -> Service:
    """A real `python -m service` on an ephemeral port (or `port`); returns it once SERVING. `engine` runs that
    engine in its own environment (tests/helpers/engines.py); None leaves the service's default.

    The transformers engine runs its decoder uncompiled here unless `compile`: these services test the process
    (signals, limits, secrets, logs), and a compiled start costs ~15 s more each. The compiled decoder is what the
    e2e stacks serve with (tests/conftest.py), and what its own tests start."""
    port_file, metrics_file = tmp / f"{name}.port", tmp / f"{name}.metrics"
    port_file.unlink(missing_ok=True)
    metrics_file.unlink(missing_ok=True)
    proc = spawn(
        ["-m", "service", "--port", str(port), "--port-file", str(port_file), "--metrics-port", "0",
         "--metrics-port-file", str(metrics_file), *(service_args(engine) if engine else ()), *extra],
        tmp / f"{name}.log",
        env if compile else {"CHATSERVE_COMPILE": "false", **(env or {})},
        python_for(engine) if engine else None,
    )
    bound = wait_for_file(port_file, proc, timeout)
    target = f"127.0.0.1:{bound}"
    metrics_port = wait_for_file(metrics_file, proc, timeout)
    wait_serving(target, proc, timeout)
    return Service(proc, target, f"http://127.0.0.1:{metrics_port}/metrics")


def start_gateway(tmp: Path, backend: str, *extra: str, keys: str, name: str = "gateway", env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """A real `python -m gateway` on an ephemeral port; returns it once it answers, with its base URL."""
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = spawn(
        ["-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file), "--backend", backend, *extra],
        tmp / f"{name}.log",
        # Stored responses in the test's own folder, not the user's.
        {"API_KEYS": keys, "CHATSERVE_RESPONSES_STORE": str(tmp / f"{name}-responses.sqlite3"), **(env or {})},
    )
    port = wait_for_file(port_file, proc)
    wait_http_ok(f"http://127.0.0.1:{port}/livez", proc)
    return proc, f"http://127.0.0.1:{port}"


def wait_until(predicate, timeout: float = 30, interval: float = 0.1, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{message} not met within {timeout} s")
