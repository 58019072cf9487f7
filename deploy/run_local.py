"""Run the whole stack on one machine: the gRPC service, then the gateway in front of it (`make run`).

Prints the base URL and the API key once both are ready, and stops both cleanly on Ctrl-C or SIGTERM. If
either process dies, the other is stopped too and the launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.procs import ProcessExited, stop_process, wait_for_file, wait_http_ok, wait_serving

READY_TIMEOUT_S = 600.0


def _public_address() -> str:
    """The address other machines would use to reach this one (best effort, no traffic is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (None: it can, or port 0 picks a free one)."""
    if port == 0:
        return None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gateway-port", type=int, default=int(os.environ.get("CHATSERVE_PORT", 8000)))
    p.add_argument("--gateway-host", default=os.environ.get("CHATSERVE_HOST", "0.0.0.0"))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("CHATSERVE_GRPC_PORT", 50051)))
    p.add_argument("--grpc-host", default=os.environ.get("CHATSERVE_GRPC_HOST", "127.0.0.1"))
    p.add_argument("--gateway-args", default="", help="extra flags for the gateway, as one string (make run GATEWAY_ARGS=...)")
    p.add_argument("--ready-file", help="write the base URL, gRPC target and API key here (JSON) once ready")
    p.add_argument("service_args", nargs="*", help="extra flags for the service (after --), e.g. -- --model /models/x")
    args = p.parse_args()

    # The gateway starts only once the model has loaded: find a taken gateway port now, not minutes later. (The
    # service checks its own gRPC and metrics ports before it loads the model.)
    busy = _port_taken(args.gateway_host, args.gateway_port)
    if busy:
        print(f"port {args.gateway_port} on {args.gateway_host} is in use ({busy}): the gateway's HTTP port; "
              f"choose another with GATEWAY_PORT=... (make run) or --gateway-port", file=sys.stderr)
        return 1

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
        grpc_port = int(wait_for_file(service_port_file, service, "service", READY_TIMEOUT_S, interval=0.1))
        grpc_target = f"127.0.0.1:{grpc_port}"
        wait_serving(grpc_target, service, "service", READY_TIMEOUT_S, interval=0.2)
        gateway = subprocess.Popen(
            [python, "-m", "gateway", "--host", args.gateway_host, "--port", str(args.gateway_port),
             "--port-file", str(gateway_port_file), "--backend", grpc_target, *shlex.split(args.gateway_args)],
            env=env,
        )
        http_port = int(wait_for_file(gateway_port_file, gateway, "gateway", 60, interval=0.1))
        wait_http_ok(f"http://127.0.0.1:{http_port}/livez", gateway, "gateway", 60, interval=0.1)
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
    except (ProcessExited, TimeoutError) as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        # The gateway goes first so that it finishes its open streams while the service still serves them.
        if gateway is not None:
            stop_process(gateway, 40)
        stop_process(service, 40)


if __name__ == "__main__":
    sys.exit(main())
