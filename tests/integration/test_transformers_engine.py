"""The transformers engine itself, on the real model in this process: what requests leave behind inside it after
they end early (the caller closes the stream, a stop string ends it, a deadline passes)."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.config import ServiceConfig
from service.domain import ChatInput, GenerateRequest, Message, SamplingParams, TextInput
from service.engines.transformers_engine import TransformersEngine

STORY = ChatInput((Message("user", "Write a long story about a dragon who learns to cook."),))
# Runs to its length (200 tokens, ~8 s here) unless something ends it early.
LONG = SamplingParams(max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
async def engine():
    engine = TransformersEngine(ServiceConfig())
    await engine.start()
    yield engine
    await engine.stop()


async def settled(engine: TransformersEngine, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        left = engine.leftovers()
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


async def test_a_cancellation_storm_leaves_nothing_behind(engine):
    async def close_early(i: int) -> None:
        outputs = engine.generate(GenerateRequest(f"early-{i}", STORY, sampling=LONG))
        await anext(outputs)
        await outputs.aclose()

    async def stop_string(i: int) -> None:
        request = GenerateRequest(f"stop-{i}", STORY, sampling=SamplingParams(max_tokens=200, stop=(" ",)))
        outputs = [o async for o in engine.generate(request)]
        assert outputs[-1].usage is not None

    async def deadline(i: int) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                async for _ in engine.generate(GenerateRequest(f"late-{i}", STORY, sampling=LONG)):
                    pass

    for i in range(10):  # one after another: each close races the output the library is about to deliver
        outputs = engine.generate(GenerateRequest(f"one-{i}", STORY, sampling=LONG))
        await anext(outputs)
        await anext(outputs)
        await outputs.aclose()
    for i in range(5):
        await stop_string(i)
    await asyncio.gather(*(close_early(i) for i in range(10)))
    await asyncio.gather(*(stop_string(i) for i in range(5)))
    await asyncio.gather(*(deadline(i) for i in range(5)))
    assert await settled(engine) == {"stranded_outputs": 0, "result_handlers": 0, "sampling_plans": 0}
    # And it still answers.
    final = [o async for o in engine.generate(GenerateRequest("after", TextInput("Hi"), sampling=SamplingParams(max_tokens=4)))]
    assert final[-1].usage.completion_tokens > 0
