"""The gateway's configuration: one frozen dataclass, built from flags whose defaults come from the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CHATSERVE_{name}", default)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    port_file: str | None = None
    # The gRPC service: host:port, a comma-separated list, and/or dns:///name:port for every address of a name.
    backend: str = "127.0.0.1:50051"
    # How requests are spread over replicas: prefix (cache-aware), round_robin or least_loaded.
    routing: str = "prefix"
    # Bounded-load factor of prefix routing: a replica over this multiple of the average load is passed over.
    routing_load_factor: float = 1.25
    # API keys accepted in `Authorization: Bearer <key>`; never logged.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    # A file of API keys, one per line; reloaded on SIGHUP and when it changes.
    api_keys_file: str | None = None
    # Per-key limits (0: none); a key's line in the keys file may override them ("sk-... rpm=60 tpm=100000").
    rpm_per_key: int = 0
    tpm_per_key: int = 0
    # Serve without API keys (local development only).
    allow_no_auth: bool = False
    # Token the service requires in call metadata, if it requires one.
    backend_token: str | None = dataclasses.field(default=None, repr=False)
    # A whole call, stream included, may take this long before the gateway gives up (gRPC deadline).
    request_timeout_s: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    # Whether /metrics and /health need an API key.
    open_health: bool = True
    open_metrics: bool = True
    # On SIGTERM: how long open streams get to finish.
    shutdown_grace_s: float = 30.0
    log_level: str = "INFO"
    log_json: bool = False

    def redacted(self) -> dict[str, object]:
        defaults = GatewayConfig()
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = f"<{len(value)} keys>" if f.name == "api_keys" else ("***" if f.name == "backend_token" else value)
        return out


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    d = GatewayConfig()
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="OpenAI-compatible HTTP gateway in front of the gRPC Generate service. "
        "Flags default to CHATSERVE_* environment variables; API keys come from API_KEYS.",
    )
    p.add_argument("--host", default=_env("HOST", d.host))
    p.add_argument("--port", type=int, default=int(_env("PORT", str(d.port))), help="HTTP port; 0 picks a free one")
    p.add_argument("--port-file", default=_env("GATEWAY_PORT_FILE"), help="write the bound port to this file")
    p.add_argument("--backend", default=_env("BACKEND", d.backend), help="the gRPC service: host:port, a comma-separated list, or dns:///name:port (every address of the name)")
    p.add_argument("--routing", choices=["prefix", "round_robin", "least_loaded"], default=_env("ROUTING", d.routing), help="how requests are spread over replicas")
    p.add_argument("--routing-load-factor", type=float, default=float(_env("ROUTING_LOAD_FACTOR", str(d.routing_load_factor))))
    p.add_argument("--api-keys-file", default=_env("API_KEYS_FILE"), help="file with one API key per line")
    p.add_argument("--rpm-per-key", type=int, default=int(_env("RPM_PER_KEY", "0")), help="requests per minute per key (0: unlimited)")
    p.add_argument("--tpm-per-key", type=int, default=int(_env("TPM_PER_KEY", "0")), help="prompt+completion tokens per minute per key (0: unlimited)")
    p.add_argument("--allow-no-auth", action="store_true", default=_env("ALLOW_NO_AUTH", "") in ("1", "true"), help="serve without API keys (development only)")
    p.add_argument("--backend-token-file", default=_env("BACKEND_TOKEN_FILE"), help="token the gRPC service requires")
    p.add_argument("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT_S", str(d.request_timeout_s))))
    p.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(d.max_body_bytes))))
    p.add_argument("--cors-origins", default=_env("CORS_ORIGINS", ""), help="comma-separated origins allowed to call from browsers ('*' for any)")
    p.add_argument("--protect-health", action="store_true", default=_env("PROTECT_HEALTH", "") in ("1", "true"), help="require an API key for /health")
    p.add_argument("--protect-metrics", action="store_true", default=_env("PROTECT_METRICS", "") in ("1", "true"), help="require an API key for /metrics")
    p.add_argument("--shutdown-grace", type=float, default=float(_env("SHUTDOWN_GRACE_S", str(d.shutdown_grace_s))))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    p.add_argument("--log-json", action="store_true", default=_env("LOG_JSON", "") in ("1", "true"))
    a = p.parse_args(argv)
    backend_token = os.environ.get("CHATSERVE_BACKEND_TOKEN") or None
    if a.backend_token_file:
        with open(a.backend_token_file, encoding="utf-8") as f:
            backend_token = f.read().strip() or None
    config = GatewayConfig(
        host=a.host,
        port=a.port,
        port_file=a.port_file,
        backend=a.backend,
        routing=a.routing,
        routing_load_factor=a.routing_load_factor,
        api_keys=_split(os.environ.get("API_KEYS")),
        api_keys_file=a.api_keys_file,
        rpm_per_key=a.rpm_per_key,
        tpm_per_key=a.tpm_per_key,
        allow_no_auth=a.allow_no_auth,
        backend_token=backend_token,
        request_timeout_s=a.request_timeout,
        max_body_bytes=a.max_body_bytes,
        cors_origins=_split(a.cors_origins),
        open_health=not a.protect_health,
        open_metrics=not a.protect_metrics,
        shutdown_grace_s=a.shutdown_grace,
        log_level=a.log_level,
        log_json=a.log_json,
    )
    if not (config.api_keys or config.api_keys_file or config.allow_no_auth):
        p.error("no API keys: set API_KEYS (comma-separated) or --api-keys-file, or pass --allow-no-auth for development")
    return config
