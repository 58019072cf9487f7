"""The four ways a request can reach a model, each timed the same way from the client's side:

- `gateway`: OpenAI chat completions over HTTP/SSE, through the gateway, gRPC and the service;
- `grpc`: the service's own gRPC `Generate` stream, no gateway;
- `inprocess`: an `Engine` object driven directly in this process, no network (the floor);
- `peer`: `transformers serve`, Hugging Face's OpenAI-compatible server, over HTTP/SSE.

Every target records, per request, when it started, when each message carrying tokens arrived and how many
tokens it carried, and the usage the server reported. SSE chunks do not say how many tokens they hold (a
chunk may carry several when the server merges them), so a chunk's tokens are the request's completion
tokens shared out by the length of each chunk's text; with the synthetic engine (4 characters a token) that
is exact.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import aiohttp
import grpc
from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc

from bench.workload import Work

REQUEST_TIMEOUT_S = 600.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(slots=True)
class Result:
    start: float
    shared: bool
    first: float | None = None  # arrival of the first message with tokens
    end: float | None = None  # the stream ended normally
    times: list[float] = field(default_factory=list)  # arrival of each message with tokens
    tokens: list[int] = field(default_factory=list)  # tokens in each of those messages
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None

    def arrived(self, now: float, choices) -> None:
        """Record a message (gRPC or in-process output) by the token ids its choices carry."""
        tokens = sum(len(choice.token_ids) for choice in choices)
        if tokens:
            if self.first is None:
                self.first = now
            self.times.append(now)
            self.tokens.append(tokens)

    def take_usage(self, usage) -> None:
        """The usage of the gRPC Usage message or the engine's Usage (same field names)."""
        self.completion_tokens = usage.completion_tokens
        self.prompt_tokens = usage.prompt_tokens
        self.cached_tokens = usage.cached_tokens


class Target:
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def request(self, work: Work) -> Result: ...

    def pids(self) -> dict[str, int]:
        """The processes whose CPU time this target's runs should report (besides the benchmark itself)."""
        return {}


# ------------------------------------------------------------------------------------------------ HTTP/SSE


class SseTarget(Target):
    """An OpenAI-compatible chat endpoint, streamed. `extras` go into every body (our API's extra fields)."""

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None, usage_option: bool,
                 extras: bool, pids: dict[str, int]) -> None:
        self.name = name
        self._url = f"{base_url}/v1/chat/completions"
        self._model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._usage_option = usage_option
        self._extras = extras
        self._pids = pids
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No connection limit: every concurrent stream gets its own keep-alive connection, as separate
        # clients would have.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def pids(self) -> dict[str, int]:
        return self._pids

    def body(self, work: Work) -> bytes:
        body: dict = {
            "model": self._model,
            "messages": [{"role": r, "content": c} for r, c in work.messages()],
            "max_tokens": work.max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if self._usage_option:
            body["stream_options"] = {"include_usage": True}
        if self._extras and work.ignore_eos:
            body["ignore_eos"] = True
        return json.dumps(body).encode()

    async def request(self, work: Work) -> Result:
        assert self._session is not None
        result = Result(start=time.perf_counter(), shared=work.shared)
        chars: list[int] = []
        try:
            async with self._session.post(self._url, data=self.body(work), headers=self._headers) as response:
                if response.status != 200:
                    result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return result
                buffer = b""
                done = finished = False
                async for data in response.content.iter_any():
                    now = time.perf_counter()
                    buffer += data
                    *events, buffer = buffer.split(b"\n\n")
                    n_chars = 0
                    for event in events:
                        if not event.startswith(b"data: "):
                            continue
                        payload = event[6:]
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            result.error = f"stream error: {str(chunk['error'])[:200]}"
                            return result
                        for choice in chunk.get("choices") or ():
                            n_chars += len((choice.get("delta") or {}).get("content") or "")
                            finished = finished or choice.get("finish_reason") is not None
                        usage = chunk.get("usage")
                        if usage:
                            result.completion_tokens = usage.get("completion_tokens", 0)
                            result.prompt_tokens = usage.get("prompt_tokens")
                            details = usage.get("prompt_tokens_details") or {}
                            result.cached_tokens = details.get("cached_tokens")
                    if n_chars:
                        if result.first is None:
                            result.first = now
                        result.times.append(now)
                        chars.append(n_chars)
                    if done:
                        break
                result.end = time.perf_counter()
                # `transformers serve` ends its streams without [DONE]: a finish reason and the end of the body.
                if not done and not finished:
                    result.error = "the stream ended without [DONE] or a finish reason"
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            result.error = f"{type(e).__name__}: {e}"
        finally:
            if not result.completion_tokens:
                result.completion_tokens = len(chars)  # no usage: count one token a chunk
            result.tokens = _share_out(result.completion_tokens, chars)
        return result


def _share_out(total: int, weights: list[int]) -> list[int]:
    """Split `total` tokens over messages in proportion to their text length (largest remainder)."""
    if not weights:
        return []
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    left = total - sum(shares)
    for i in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[:left]:
        shares[i] += 1
    return shares


# ------------------------------------------------------------------------------------------------ gRPC


class GrpcTarget(Target):
    def __init__(self, target: str, model: str, pids: dict[str, int]) -> None:
        self.name = "grpc"
        self._target = target
        self._model = model
        self._pids = pids
        self._channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerateStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def pids(self) -> dict[str, int]:
        return self._pids

    @staticmethod
    def message(work: Work, model: str = "") -> pb.GenerateRequest:
        return pb.GenerateRequest(
            model=model,
            input=pb.Input(
                chat=pb.Chat(messages=[pb.ChatMessage(role=r, content=[pb.ContentPart(text=c)]) for r, c in work.messages()])
            ),
            sampling=pb.SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=work.ignore_eos),
        )

    async def request(self, work: Work) -> Result:
        result = Result(start=time.perf_counter(), shared=work.shared)
        call = self._stub.Generate(self.message(work, self._model), timeout=REQUEST_TIMEOUT_S)
        try:
            async for response in call:
                result.arrived(time.perf_counter(), response.choices)
                if response.HasField("usage"):
                    result.take_usage(response.usage)
            result.end = time.perf_counter()
        except grpc.aio.AioRpcError as e:
            result.error = f"gRPC {e.code().name}: {e.details()}"
        finally:
            call.cancel()
        return result


# ------------------------------------------------------------------------------------------------ in-process


class InProcessTarget(Target):
    """The request pipeline over an engine, in this process: what the model (or the synthetic engine) costs with no
    transport."""

    def __init__(self, engine) -> None:
        self.name = "inprocess"
        self.engine = engine

    async def open(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        await self.engine.stop()

    async def request(self, work: Work) -> Result:
        from service.domain import ChatInput, GenerateRequest, Message, SamplingParams
        from service.errors import ServiceError

        request = GenerateRequest(
            request_id=f"bench-{id(work):x}",
            input=ChatInput(tuple(Message(r, c) for r, c in work.messages())),
            sampling=SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=work.ignore_eos),
        )
        result = Result(start=time.perf_counter(), shared=work.shared)
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as outputs:
                async for output in outputs:
                    result.arrived(time.perf_counter(), output.choices)
                    if output.usage is not None:
                        result.take_usage(output.usage)
            result.end = time.perf_counter()
        except ServiceError as e:
            result.error = f"{type(e).__name__}: {e}"
        return result
