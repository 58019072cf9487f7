"""Container health check for the chatserve images: Docker's HEALTHCHECK and compose call it; Kubernetes
does not (it has native gRPC and HTTP probes).

    chatserve-healthcheck grpc   the service answers SERVING on the standard grpc.health.v1 service
                                 (NOT_SERVING while the engine loads and while draining on SIGTERM)
    chatserve-healthcheck http   the gateway process answers 200 on /livez

Ports come from the variables the processes themselves read (CHATSERVE_GRPC_PORT, CHATSERVE_PORT). Exit status
0 means healthy, 1 not. Written as a file rather than a `python -c` one-liner so that it can be read and tested;
it needs only the standard library and grpcio, which both images carry.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check_grpc(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            print(f"gRPC health check of {target} failed: {e.code().name}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return serving


def check_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError) as e:
        print(f"GET {url} failed: {e}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "grpc":
        port = os.environ.get("CHATSERVE_GRPC_PORT") or "50051"
        return 0 if check_grpc(f"127.0.0.1:{port}") else 1
    if mode == "http":
        port = os.environ.get("CHATSERVE_PORT") or "8000"
        return 0 if check_http(f"http://127.0.0.1:{port}/livez") else 1
    print("usage: chatserve-healthcheck grpc|http", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
