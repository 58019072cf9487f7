"""Logging for both processes: every line carries the request id of the call it belongs to, as text or JSON."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

# The id of the request being handled by the current task; "-" outside any request.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# What a caller's request id may be: it goes into every log line of the request, so no spaces, quotes or control
# characters (log injection) and a bounded length.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def valid_request_id(candidate: str | None) -> str:
    """The caller's request id when it is safe to log, else a new one."""
    if candidate and _REQUEST_ID.fullmatch(candidate):
        return candidate
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, "fields", None)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def setup_logging(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every request or weight at INFO would drown the per-request lines.
    for noisy in ("aiohttp.access", "transformers", "ContinuousBatchingLogger", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
