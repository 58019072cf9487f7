"""Run the whole stack on one machine: the gRPC service, then the gateway in front of it (`make run`).

Prints the base URL and the API key once both are ready, and stops both cleanly on Ctrl-C or SIGTERM. If
either process dies, the other is stopped too and the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_S = 600.0


def _wait_for_port_file(path: Path, process: subprocess.Popen, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {name} exited with code {process.returncode} while starting")
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.1)
    raise SystemExit(f"the {name} did not bind a port within {timeout:.0f} s")


def _wait_for_serving(target: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the service exited with code {process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the service was not SERVING within {timeout:.0f} s")


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the gateway did not answer {url} within {timeout:.0f} s")


def _public_address() -> str:
    """The address other machines would use to reach this one (best effort, no traffic is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _stop(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gateway-port", type=int, default=int(os.environ.get("CHATSERVE_PORT", 8000)))
    p.add_argument("--gateway-host", default=os.environ.get("CHATSERVE_HOST", "0.0.0.0"))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("CHATSERVE_GRPC_PORT", 50051)))
    p.add_argument("--grpc-host", default=os.environ.get("CHATSERVE_GRPC_HOST", "127.0.0.1"))
    p.add_argument("--ready-file", help="write the base URL, gRPC target and API key here (JSON) once ready")
    p.add_argument("service_args", nargs="*", help="extra flags for the service (after --), e.g. -- --model /models/x")
    args = p.parse_args()

    api_keys = os.environ.get("API_KEYS", "").strip()
    if not api_keys:
        api_keys = "sk-local-" + secrets.token_urlsafe(24)
    first_key = api_keys.split(",")[0].strip()

    workdir = Path(tempfile.mkdtemp(prefix="chatserve-"))
    service_port_file, gateway_port_file = workdir / "grpc.port", workdir / "http.port"
    env = dict(os.environ, API_KEYS=api_keys)
    python = sys.executable

    stop = False

    def request_stop(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    service = subprocess.Popen(
        [python, "-m", "service", "--host", args.grpc_host, "--port", str(args.grpc_port),
         "--port-file", str(service_port_file), *args.service_args],
        env=env,
    )
    gateway = None
    try:
        grpc_port = _wait_for_port_file(service_port_file, service, "service", READY_TIMEOUT_S)
        grpc_target = f"127.0.0.1:{grpc_port}"
        _wait_for_serving(grpc_target, service, READY_TIMEOUT_S)
        gateway = subprocess.Popen(
            [python, "-m", "gateway", "--host", args.gateway_host, "--port", str(args.gateway_port),
             "--port-file", str(gateway_port_file), "--backend", grpc_target],
            env=env,
        )
        http_port = _wait_for_port_file(gateway_port_file, gateway, "gateway", 60)
        _wait_for_http(f"http://127.0.0.1:{http_port}/livez", gateway, 60)
        host = _public_address() if args.gateway_host in ("0.0.0.0", "::") else args.gateway_host
        base_url = f"http://{host}:{http_port}/v1"
        print(
            f"\nchatserve is ready.\n"
            f"  OpenAI base URL: {base_url}\n"
            f"  API key:         {first_key}\n"
            f"  gRPC:            {args.grpc_host}:{grpc_port} (generate.v1.Generate)\n"
            f"  Try: curl {base_url}/models -H 'Authorization: Bearer {first_key}'\n"
            f"Press Ctrl-C to stop.\n",
            flush=True,
        )
        if args.ready_file:
            Path(args.ready_file).write_text(
                json.dumps({"base_url": f"http://127.0.0.1:{http_port}/v1", "grpc_target": grpc_target, "api_key": first_key})
            )
        while not stop:
            if service.poll() is not None or gateway.poll() is not None:
                failed = "service" if service.poll() is not None else "gateway"
                print(f"the {failed} stopped unexpectedly; stopping the stack", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        # The gateway goes first so that it finishes its open streams while the service still serves them.
        if gateway is not None:
            _stop(gateway, 40)
        _stop(service, 40)


if __name__ == "__main__":
    sys.exit(main())
