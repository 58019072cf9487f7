"""`python -m service`: start the gRPC generation service."""

from __future__ import annotations

import asyncio
import logging
import sys

from common.logs import setup_logging
from service.config import parse_args
from service.server import serve


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_json)
    logging.getLogger("service").info("starting with %s", config.redacted() or "the default settings")
    sys.exit(int(asyncio.run(serve(config))))


if __name__ == "__main__":
    main()
