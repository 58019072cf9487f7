"""A port that is already taken: each process says so in one line naming the port and the setting that moves it,
and exits before it loads a model (a second copy of `make run` beside the first)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.helpers.procs import ROOT


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"API_KEYS": "sk-ports-" + "p" * 20, "PATH": "/usr/bin:/bin"})


def assert_one_clear_line(result: subprocess.CompletedProcess, port: int, setting: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output and "Event loop is closed" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if str(port) in line and setting in line]
    assert len(lines) == 1, output[-2000:]
    # Refused before the model loads (each engine logs a line when its model is up).
    assert "engine up" not in output and "loaded " not in output and " engine (context" not in output


def test_service_metrics_port_taken(taken_port):
    result = run("-m", "service", "--port", "0", "--metrics-port", str(taken_port))
    assert_one_clear_line(result, taken_port, "--metrics-port")


def test_service_grpc_port_taken(taken_port):
    result = run("-m", "service", "--port", str(taken_port), "--metrics-port", "-1")
    assert_one_clear_line(result, taken_port, "--port")


def test_gateway_port_taken(taken_port):
    result = run("-m", "gateway", "--host", "127.0.0.1", "--port", str(taken_port))
    assert_one_clear_line(result, taken_port, "--port")


def test_make_run_checks_the_gateway_port_before_starting_the_service(taken_port):
    result = run("deploy/run_local.py", "--gateway-host", "127.0.0.1", "--gateway-port", str(taken_port),
                 "--grpc-port", "0", timeout=20)
    assert_one_clear_line(result, taken_port, "GATEWAY_PORT")
