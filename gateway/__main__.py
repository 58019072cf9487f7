"""`python -m gateway`: start the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import os

# aiohttp's C request parser refuses methods that are not upper case ("400 Invalid method encountered"), and
# the curl example users copy says `-X Post`. The pure-Python parser accepts it (and reports "POST"); responses
# are still written by the same code, so the cost is only in parsing request heads. Must precede the import.
os.environ.setdefault("AIOHTTP_NO_EXTENSIONS", "1")

import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from aiohttp import web  # noqa: E402

from common.logs import setup_logging  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import GatewayConfig, parse_args  # noqa: E402
from gateway.state import KEYS  # noqa: E402

log = logging.getLogger("gateway")


async def run(config: GatewayConfig) -> int:
    app = create_app(config)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the gRPC call and so
    # the generation, even for a non-streaming request that has not written a byte yet.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_grace_s,
        keepalive_timeout=config.keepalive_timeout_s,
    )
    await runner.setup()
    _cap_connections(runner.server, config.max_connections)
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as e:
        log.error(
            "cannot listen on %s:%d (%s): another process may hold the port; choose another with --port "
            "(CHATSERVE_PORT; make run GATEWAY_PORT=...)", config.host, config.port, e.strerror or e,
        )
        await runner.cleanup()
        return 1
    port = runner.addresses[0][1]
    if config.port_file:
        Path(config.port_file).write_text(str(port))
    log.info("OpenAI API on http://%s:%d/v1 (backend %s)", config.host, port, config.backend)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[KEYS].reload)
    await stop.wait()
    log.info("shutting down: open streams get up to %.0f s to finish", config.shutdown_grace_s)
    # Stops accepting connections, lets running handlers finish within the grace period, then closes the channel.
    await runner.cleanup()
    log.info("stopped")
    return 0


def _cap_connections(server: web.Server, cap: int) -> None:
    """Close a new connection at once while `cap` are open, so idle or slow clients cannot exhaust the process.

    aiohttp has no such setting; every connection registers with the server as it is made, so that is where the
    count is kept. (Headers are bounded by aiohttp itself: 8,190 bytes a line, 128 fields.)"""
    made = server.connection_made
    warned = 0.0

    def connection_made(handler, transport) -> None:
        nonlocal warned
        made(handler, transport)
        if len(server.connections) > cap:
            transport.close()
            if time.monotonic() - warned > 60:  # once a minute at most: a flood must not flood the log too
                warned = time.monotonic()
                log.warning("%d connections are open, the most allowed (--max-connections): closing new ones", cap)

    server.connection_made = connection_made  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_json)
    log.info("starting with %s", config.redacted() or "the default settings")
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(run(config)))
    sys.exit(uvloop.run(run(config)))


if __name__ == "__main__":
    main()
