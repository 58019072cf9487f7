"""Reliability with real processes on real sockets and the real model: cancellation, deadlines, overload,
graceful shutdown, engine failure, service restarts, key rotation and service tokens. Deadlines and the
service's SIGTERM drain run on every engine in tests/e2e/test_engine_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import grpc
import openai
import pytest

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc
from common.procs import scrape
from tests.helpers.procs import start_gateway, start_service, wait_serving, wait_until

KEY = "sk-integration-" + "x" * 20
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def sdk(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def model_of(base: str) -> str:
    return sdk(base).models.list().data[0].id


async def post(session: aiohttp.ClientSession, base: str, body: dict, key: str = KEY) -> aiohttp.ClientResponse:
    return await session.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service and gateway shared by the tests that leave them running."""
    tmp = tmp_path_factory.mktemp("reliability")
    service = start_service(tmp)
    gateway, base = start_gateway(tmp, service.target, keys=KEY)
    yield service, base
    gateway.stop()
    service.proc.stop()


def idle(service) -> bool:
    m = service.metrics()
    return m["chatserve_requests_inflight"] == 0 and m["chatserve_engine_running_sequences"] == 0 \
        and m["chatserve_engine_waiting_sequences"] == 0


async def test_cancellation_storm_leaves_nothing_running(shared):
    service, base = shared
    model = model_of(base)
    body = {"model": model, "messages": PROMPT, "max_tokens": 400, "stream": True}

    async def impatient(session, i):
        # Half stream and hang up after the first bytes, half give up before any answer.
        try:
            async with asyncio.timeout(0.05 + (i % 10) * 0.1):
                response = await post(session, base, {**body, "stream": i % 2 == 0})
                await response.content.readany()
                await asyncio.sleep(10)
        except TimeoutError:
            pass

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(impatient(session, i) for i in range(200)))
    before = service.metrics()
    assert before['chatserve_requests_total{outcome="cancelled"}'] > 100
    await asyncio.to_thread(wait_until, lambda: idle(service), 30, 0.2, "service idle after the storm")
    started = time.monotonic()
    reply = sdk(base).chat.completions.create(model=model, messages=PROMPT, max_tokens=8)
    assert reply.choices[0].message.content and time.monotonic() - started < 10


def test_overload_is_429_with_retry_after(tmp_path):
    service = start_service(tmp_path, "--max-inflight", "1", "--max-queue", "0")
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        model = model_of(base)

        async def scenario():
            async with aiohttp.ClientSession() as session:
                first = await post(session, base, {"model": model, "messages": PROMPT, "max_tokens": 200, "stream": True})
                assert first.status == 200
                await first.content.readany()
                second = await post(session, base, {"model": model, "messages": PROMPT, "max_tokens": 4})
                body = await second.json()
                first.close()
                return second.status, second.headers, body

        status, headers, body = asyncio.run(scenario())
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "server_overloaded"
        wait_until(lambda: idle(service), 10)
        assert sdk(base).chat.completions.create(model=model, messages=PROMPT, max_tokens=2).choices
    finally:
        gateway.stop()
        service.proc.stop()


def test_gateway_sigterm_finishes_open_streams(tmp_path):
    service = start_service(tmp_path)
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        model = model_of(base)
        stream = sdk(base).chat.completions.create(model=model, messages=PROMPT, max_tokens=30, stream=True)
        next(stream)
        gateway.process.send_signal(signal.SIGTERM)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert gateway.process.wait(30) == 0
        with pytest.raises(openai.APIConnectionError):
            sdk(base).models.list()
    finally:
        gateway.stop()
        service.proc.stop()


def test_engine_failure_fails_calls_turns_unhealthy_and_exits(tmp_path):
    service = start_service(tmp_path, "--enable-fault-injection")
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        model = model_of(base)
        client = sdk(base)
        stream = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=300, stream=True)
        next(stream)
        service.proc.process.send_signal(signal.SIGUSR1)
        with pytest.raises(openai.APIError) as caught:
            list(stream)
        assert "engine" in str(caught.value)
        assert service.proc.process.wait(30) == 3
        log = service.proc.log()
        assert "the engine stopped working" in log
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as unavailable:
            client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
        assert unavailable.value.status_code == 503 and time.monotonic() - started < 5
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{base}/health", timeout=5)
        assert health.value.code == 503
    finally:
        gateway.stop()
        service.proc.stop()


def test_gateway_survives_a_service_restart(tmp_path):
    service = start_service(tmp_path)
    port = int(service.target.rsplit(":", 1)[1])
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        model = model_of(base)
        client = sdk(base)
        assert client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2).choices
        service.proc.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
        assert caught.value.status_code == 503 and time.monotonic() - started < 3
        assert caught.value.response.headers["Retry-After"] == "1"
        service = start_service(tmp_path, name="service-2", port=port)
        wait_until(lambda: _ok(client, model), 20, 0.2, "gateway reconnected")
        assert gateway.process.poll() is None
    finally:
        gateway.stop()
        service.proc.stop()


def _ok(client, model) -> bool:
    try:
        return bool(client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2).choices)
    except openai.APIStatusError:
        return False


def test_keys_file_rotation_and_per_key_limits(shared, tmp_path):
    service, _ = shared
    keys = tmp_path / "keys"
    keys.write_text("sk-first-key-00000000\nsk-limited-key-0000000 rpm=2\n")
    gateway, base = start_gateway(tmp_path, service.target, "--api-keys-file", str(keys), keys="")
    try:
        model = sdk(base, "sk-first-key-00000000").models.list().data[0].id
        keys.write_text("sk-second-key-0000000\nsk-limited-key-0000000 rpm=2\n")
        wait_until(lambda: _authorised(base, "sk-second-key-0000000"), 10, 0.2, "new key accepted")
        assert not _authorised(base, "sk-first-key-00000000")
        keys.write_text("sk-third-key-00000000\n")
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _authorised(base, "sk-third-key-00000000"), 5, 0.1, "SIGHUP reload")

        keys.write_text("sk-limited-key-0000000 rpm=2\n")
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _authorised(base, "sk-limited-key-0000000"), 5, 0.1, "limited key loaded")
        limited = sdk(base, "sk-limited-key-0000000")
        response = limited.chat.completions.with_raw_response.create(model=model, messages=PROMPT, max_tokens=1)
        assert response.headers["x-ratelimit-limit-requests"] == "2"
        limited.chat.completions.create(model=model, messages=PROMPT, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            limited.chat.completions.create(model=model, messages=PROMPT, max_tokens=1)
        assert caught.value.body["code"] == "rate_limit_exceeded"
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert "sk-limited-key-0000000" not in gateway.log() and "sk-first-key-00000000" not in gateway.log()
    finally:
        gateway.stop()


def _authorised(base: str, key: str) -> bool:
    try:
        sdk(base, key).models.list()
        return True
    except openai.AuthenticationError:
        return False


def test_service_token_on_the_grpc_port(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3rvice-token\n")
    service = start_service(tmp_path, "--auth-token-file", str(token_file))
    gateway, base = start_gateway(tmp_path, service.target, "--backend-token-file", str(token_file), keys=KEY)
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(pb.GenerateRequest(input=pb.Input(text="hi")), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            wait_serving(service.target)  # health stays open: probes carry no token
        model = model_of(base)
        assert sdk(base).chat.completions.create(model=model, messages=PROMPT, max_tokens=2).choices
        assert "s3rvice-token" not in service.proc.log() + gateway.log()
    finally:
        gateway.stop()
        service.proc.stop()


def test_mid_stream_error_is_one_event_then_done(tmp_path):
    """Raw SSE view of a failure after the stream started: one error event in OpenAI's shape, then [DONE]."""
    service = start_service(tmp_path, "--enable-fault-injection")
    gateway, base = start_gateway(tmp_path, service.target, keys=KEY)
    try:
        model = model_of(base)

        async def scenario():
            async with aiohttp.ClientSession() as session:
                response = await post(session, base, {"model": model, "messages": PROMPT, "max_tokens": 300, "stream": True})
                await response.content.readuntil(b"\n\n")
                service.proc.process.send_signal(signal.SIGUSR1)
                return (await response.read()).decode()

        text = asyncio.run(scenario())
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["type"] == "server_error"
        assert all("error" not in e for e in events[:-2])
    finally:
        gateway.stop()
        service.proc.stop()


async def test_tokens_of_a_stream_the_client_left_are_charged_to_its_key(shared):
    """A client that hangs up mid-stream (or whose stream fails) still pays for what it made the engine generate:
    otherwise per-key token limits could be dodged by never reading to the end."""
    service, base = shared
    model = model_of(base)

    def charged() -> float:
        return sum(v for k, v in scrape(base + "/metrics").items()
                   if k.startswith("chatserve_gateway_completion_tokens_total"))

    before = charged()
    body = {"model": model, "messages": PROMPT, "max_tokens": 300, "stream": True, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        response = await post(session, base, body)
        events = 0
        async for line in response.content:
            events += line.startswith(b"data: ")
            if events == 6:
                break
        response.close()
    await asyncio.to_thread(wait_until, lambda: charged() >= before + 5, 10, 0.1, "tokens charged after the hang-up")
    await asyncio.to_thread(wait_until, lambda: idle(service), 30, 0.2, "service idle")
    assert charged() - before < 300
