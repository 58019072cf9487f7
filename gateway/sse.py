"""Server-sent events framing for OpenAI streams: `data: <json>\n\n` events, `data: [DONE]\n\n` at the end,
and a failure after the stream started as one in-band error event (the OpenAI SDK raises on it)."""

from __future__ import annotations

from gateway.errors import ApiError

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    # Reverse proxies (nginx) must not buffer a token stream.
    "X-Accel-Buffering": "no",
}


def events(payloads: list[str]) -> bytes:
    """Frame JSON payloads as SSE events, ready for one write."""
    return "".join(f"data: {p}\n\n" for p in payloads).encode()


def error_event(error: ApiError) -> bytes:
    return b"data: " + error.body_bytes() + b"\n\n"
