"""The gateway's configuration: one frozen dataclass, built from flags whose defaults come from the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from common import flags


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
    # A connection with no request in flight is closed after this long (aiohttp's own default is an hour).
    keepalive_timeout_s: float = 75.0
    # Open connections at once; beyond, a new one is closed as it arrives (each holds memory and a descriptor).
    max_connections: int = 4096
    # The Responses API's stored responses (store: true): an SQLite file, or ":memory:" (gone at restart).
    responses_store: str = "~/.local/state/chatserve/responses.sqlite3"
    # Stored responses are kept this long (OpenAI keeps them 30 days), and at most this many (the oldest go first).
    responses_max_age_days: float = 30.0
    responses_max_count: int = 100_000
    # The chat playground at GET / (static files in the package; API calls use the key entered in the page).
    playground: bool = True
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


def build_parser() -> argparse.ArgumentParser:
    d = GatewayConfig()
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="OpenAI-compatible HTTP gateway in front of the gRPC Generate service.\n"
        "Each flag's default can be set with the environment variable in [brackets], named after the flag; API keys "
        "come from API_KEYS (comma-separated) and/or --api-keys-file.",
        formatter_class=flags.Formatter,
    )
    add = flags.add
    add(p, "--host", default=d.host, help="address to listen on for HTTP")
    add(p, "--port", type=int, default=d.port, help="HTTP port; 0 picks a free one")
    add(p, "--gateway-port-file", "--port-file", dest="port_file", help="write the bound HTTP port to this file once listening")
    add(p, "--backend", default=d.backend, help="the gRPC service: host:port, a comma-separated list, or dns:///name:port (every address of the name)")
    add(p, "--routing", choices=["prefix", "round_robin", "least_loaded"], default=d.routing, help="how requests are spread over replicas")
    add(p, "--routing-load-factor", type=float, default=d.routing_load_factor, help="prefix routing passes over a replica carrying more than this multiple of the average load")
    add(p, "--api-keys-file", help="file with one API key per line, optionally followed by limits (rpm=, tpm=); reloaded on change and SIGHUP")
    add(p, "--rpm-per-key", type=int, default=d.rpm_per_key, help="requests per minute per key (0: unlimited)")
    add(p, "--tpm-per-key", type=int, default=d.tpm_per_key, help="prompt+completion tokens per minute per key (0: unlimited)")
    add(p, "--allow-no-auth", action="store_true", default=False, help="serve without API keys (development only)")
    add(p, "--backend-token-file", help="token the gRPC service requires (the file's content; CHATSERVE_BACKEND_TOKEN also sets it)")
    add(p, "--request-timeout", type=float, default=d.request_timeout_s, old_env="REQUEST_TIMEOUT_S", help="seconds a whole call, stream included, may take before the gateway gives up (its gRPC deadline)")
    add(p, "--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body in bytes; larger gets 413")
    add(p, "--cors-origins", default="", help="comma-separated origins allowed to call from browsers ('*' for any)")
    add(p, "--protect-health", action="store_true", default=False, help="require an API key for /health")
    add(p, "--protect-metrics", action="store_true", default=False, help="require an API key for /metrics")
    add(p, "--shutdown-grace", type=float, default=d.shutdown_grace_s, old_env="SHUTDOWN_GRACE_S", help="seconds open streams get to finish on SIGTERM")
    add(p, "--keepalive-timeout", type=float, default=d.keepalive_timeout_s, help="seconds an idle connection (none of its requests in flight, or none sent yet) stays open")
    add(p, "--max-connections", type=int, default=d.max_connections, help="open client connections at once; more are closed as they arrive")
    add(p, "--responses-store", default=d.responses_store, help="SQLite file of the Responses API's stored responses (\":memory:\": none kept across restarts); several gateway replicas need a shared store (see README)")
    add(p, "--responses-max-age-days", type=float, default=d.responses_max_age_days, help="stored responses are dropped after this many days")
    add(p, "--responses-max-count", type=int, default=d.responses_max_count, help="at most this many stored responses; the oldest go first")
    add(p, "--playground", action=argparse.BooleanOptionalAction, default=d.playground, help="serve the chat playground at / (its API calls need a key as any other)")
    add(p, "--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    add(p, "--log-json", action="store_true", default=False, help="one JSON object per log line")
    return p


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    p = build_parser()
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
        keepalive_timeout_s=a.keepalive_timeout,
        max_connections=a.max_connections,
        responses_store=a.responses_store,
        responses_max_age_days=a.responses_max_age_days,
        responses_max_count=a.responses_max_count,
        playground=a.playground,
        log_level=a.log_level,
        log_json=a.log_json,
    )
    if not (config.api_keys or config.api_keys_file or config.allow_no_auth):
        p.error("no API keys: set API_KEYS (comma-separated) or --api-keys-file, or pass --allow-no-auth for development")
    return config
