"""The service's error boundary over a real gRPC server: nothing raised below the servicer reaches a caller unmapped
or with its internal text, every such failure is counted as an error, and calls before the engine is ready are
UNAVAILABLE (retryable), not an assertion.

The engine here is a scripted double (tests/helpers/scripted.py): a bug that raises an arbitrary exception, and an
engine frozen mid-start, are faults a real engine cannot be made to produce on demand.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_status import rpc_status

from generate.v1 import generate_pb2 as pb
from generate.v1 import generate_pb2_grpc as pb_grpc
from service.admission import Admission
from service.engines.default_model import prepared_path
from service.engines.tool_calls import HermesFormat
from service.metrics import ServiceMetrics
from service.pipeline import Pipeline
from service.servicer import GenerateServicer
from tests.helpers.scripted import Script, ScriptedBackend

MODEL = prepared_path()
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="run `make model` first")
SECRET = "sk-live-secret at /srv/models/private.bin"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


class Server:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.metrics = ServiceMetrics()

    async def __aenter__(self):
        self.server = grpc.aio.server()
        pb_grpc.add_GenerateServicer_to_server(
            GenerateServicer(self.pipeline, Admission(4, 4, self.metrics), self.metrics), self.server
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return pb_grpc.GenerateStub(self.channel)

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(0)

    def outcome(self, name: str) -> float:
        return self.metrics.registry.get_sample_value("chatserve_requests_total", {"outcome": name}) or 0.0


REQUEST = pb.GenerateRequest(input=pb.Input(text="Hello"), sampling=pb.SamplingParams(max_tokens=4))


async def test_an_unexpected_exception_is_internal_with_a_fixed_message_and_counted(tokenizer, caplog):
    backend = ScriptedBackend(tokenizer, Script([1, 2, 3]), tokenizer.eos_token_id)
    pipeline = Pipeline(backend, HermesFormat())
    await pipeline.start()

    def broken(input):  # a bug in prompt rendering: not a ServiceError
        raise RuntimeError(SECRET)

    backend.codec.prompt_ids = broken
    server = Server(pipeline)
    async with server as stub:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Generate(REQUEST):
                pass
        error = failed.value
        assert error.code() is grpc.StatusCode.INTERNAL
        assert "sk-live" not in error.details() and "RuntimeError" not in error.details()
        assert "has been logged" in error.details()
        assert server.outcome("error") == 1 and server.outcome("ok") == 0
        with pytest.raises(grpc.aio.AioRpcError) as counted:
            await stub.CountTokens(pb.CountTokensRequest(input=pb.Input(text="x")))
        assert counted.value.code() is grpc.StatusCode.INTERNAL and "sk-live" not in counted.value.details()
    # The traceback is in the log, for the operator.
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


async def test_an_engine_failure_mid_stream_is_internal_and_counted(tokenizer):
    script = Script(tokenizer.encode("one two three four five six"), chunk=2, end="fail")
    pipeline = Pipeline(ScriptedBackend(tokenizer, script, tokenizer.eos_token_id), HermesFormat())
    await pipeline.start()
    server = Server(pipeline)
    async with server as stub:
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for response in stub.Generate(pb.GenerateRequest(input=REQUEST.input)):
                received += len(response.choices)
        assert received > 0  # it failed after it started
        assert failed.value.code() is grpc.StatusCode.INTERNAL and "secret" not in failed.value.details()
        status = rpc_status.from_call(failed.value)
        assert status is not None and status.message == failed.value.details()
        assert server.outcome("error") == 1


async def test_calls_before_the_engine_is_ready_are_unavailable(tokenizer):
    pipeline = Pipeline(ScriptedBackend(tokenizer, Script([1]), tokenizer.eos_token_id), HermesFormat())
    server = Server(pipeline)  # never started: the engine is still loading
    async with server as stub:
        for call in (
            lambda: stub.GetModelInfo(pb.GetModelInfoRequest()),
            lambda: stub.CountTokens(pb.CountTokensRequest(input=pb.Input(text="x"))),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(REQUEST):
                pass
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.outcome("unavailable") == 1
        await pipeline.start()
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.model == "scripted"
        await pipeline.stop()
        with pytest.raises(grpc.aio.AioRpcError) as stopped:
            await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert stopped.value.code() is grpc.StatusCode.UNAVAILABLE
