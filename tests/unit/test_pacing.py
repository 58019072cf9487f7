"""Stream pacing under load, through a real in-process gRPC server and the benchmark engine.

The synthetic engine stands in for a model here because pacing is about message timing, which needs an engine that
makes tokens at a known, steady rate."""

from __future__ import annotations

import grpc

from proto.generate.v1 import generate_pb2 as pb
from proto.generate.v1 import generate_pb2_grpc as pb_grpc
from service.admission import Admission
from service.config import ServiceConfig
from service.engines.synthetic import SyntheticEngine
from service.metrics import ServiceMetrics
from service.engines.tool_calls import HermesFormat
from service.pipeline import Pipeline
from service.servicer import GenerateServicer, Pacing


def test_pause_applies_only_from_the_stream_threshold():
    pacing = Pacing(interval_s=0.04, min_streams=64)
    assert pacing.pause(63) == 0.0
    assert pacing.pause(64) == 0.04
    assert Pacing().pause(10_000) == 0.0
    assert Pacing(interval_s=0.0, min_streams=0).pause(1) == 0.0


async def _messages(pacing: Pacing, max_tokens: int, rate: float = 400) -> list[int]:
    """Tokens per message of one stream of `max_tokens` tokens."""
    engine = Pipeline(SyntheticEngine(ServiceConfig(engine="synthetic", synthetic_tokens_per_s=rate)), HermesFormat())
    await engine.start()
    metrics = ServiceMetrics()
    server = grpc.aio.server()
    pb_grpc.add_GenerateServicer_to_server(
        GenerateServicer(engine, Admission(8, 8, metrics), metrics, None, pacing), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.GenerateRequest(input=pb.Input(text="Hello there, engine!"), sampling=pb.SamplingParams(max_tokens=max_tokens))
            sizes = []
            usage = None
            async for response in pb_grpc.GenerateStub(channel).Generate(request):
                if response.choices:
                    sizes.append(sum(len(c.token_ids) for c in response.choices))
                if response.HasField("usage"):
                    usage = response.usage
    finally:
        await server.stop(None)
        await engine.stop()
    assert usage is not None and usage.completion_tokens == max_tokens
    return sizes


async def test_paced_stream_sends_fewer_fuller_messages_and_loses_no_token():
    sizes = await _messages(Pacing(interval_s=0.05, min_streams=1), max_tokens=60)
    assert sum(sizes) == 60
    assert sizes[0] == 1, "the first token is never held back"
    # 60 tokens at 400/s take 150 ms; one message per 50 ms leaves room for a handful, not sixty.
    assert len(sizes) <= 8, sizes
    assert max(sizes) > 1


async def test_below_the_threshold_every_token_goes_out_at_once():
    sizes = await _messages(Pacing(interval_s=0.05, min_streams=2), max_tokens=30, rate=100)
    assert sum(sizes) == 30
    # A token every 10 ms: paced, that would be about six messages; unpaced, nearly one per token (a busy machine
    # may still merge a few that the reader had not taken yet).
    assert len(sizes) >= 20, sizes
