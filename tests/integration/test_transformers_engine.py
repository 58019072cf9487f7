"""The transformers engine's library runner (transformers' own continuous batching, `--runner transformers`, what
architectures the compiled runner does not know get), on the real model in float32 in this process, behind the
request pipeline as the service runs it: stop strings, n > 1, log probabilities, seeds, a failing engine, and what requests
leave behind inside it after they end early (the caller closes the stream, a stop string ends it, a deadline)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from service.config import ServiceConfig
from service.domain import ChatInput, FinishReason, GenerateRequest, Message, SamplingParams, TextInput
from service.engines.tool_calls import HermesFormat
from service.engines.transformers_engine import TransformersEngine
from service.errors import EngineFailure, Unavailable
from service.pipeline import Pipeline

STORY = ChatInput((Message("user", "Write a long story about a dragon who learns to cook."),))
# Runs to its length (200 tokens, ~8 s here) unless something ends it early.
LONG = SamplingParams(max_tokens=200, ignore_eos=True)
EMPTY = {"open_requests": 0, "stranded_outputs": 0, "result_handlers": 0, "sampling_plans": 0}


@pytest.fixture(scope="module")
async def engine():
    engine = Pipeline(TransformersEngine(ServiceConfig(runner="transformers", dtype="float32")), HermesFormat())
    await engine.start()
    yield engine
    await engine.stop()


async def settled(engine: Pipeline, timeout: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        left = engine.leftovers()
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


async def run(engine: Pipeline, request: GenerateRequest):
    """Every output of a request, and each choice's text, ids and finish."""
    outputs = [o async for o in engine.generate(request)]
    choices: dict[int, dict] = {}
    for o in outputs:
        for c in o.choices:
            got = choices.setdefault(c.index, {"text": "", "ids": [], "logprobs": [], "finish": None, "delta": None})
            got["text"] += c.text
            got["ids"] += c.token_ids
            got["logprobs"] += c.logprobs or []
            if c.finish_reason is not None:
                got["finish"], got["delta"] = c.finish_reason, c
    return outputs, choices


async def test_a_stop_string_ends_the_choice_and_is_never_output(engine):
    free = GenerateRequest("free", STORY, sampling=SamplingParams(max_tokens=40, temperature=0.0))
    text = (await run(engine, free))[1][0]["text"]
    # A stop string from the middle of what the model writes anyway.
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    outputs, choices = await run(
        engine, GenerateRequest("stop", STORY, sampling=SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,)))
    )
    got = choices[0]
    assert got["finish"] is FinishReason.STOP and got["delta"].stop_string == stop
    assert got["text"] == text[: text.index(stop)] and stop not in got["text"]
    assert outputs[-1].usage.completion_tokens < 40
    assert await settled(engine) == EMPTY


async def test_n_choices_are_merged_by_index_with_their_own_seeds(engine):
    request = GenerateRequest(
        "n", STORY, n=3, sampling=SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    )
    outputs, choices = await run(engine, request)
    assert sorted(choices) == [0, 1, 2]
    for o in outputs:
        assert [c.index for c in o.choices] == sorted({c.index for c in o.choices})
    texts = [choices[i]["text"] for i in range(3)]
    assert len(set(texts)) > 1  # seed + index: the choices differ...
    again = await run(engine, request)
    assert [again[1][i]["text"] for i in range(3)] == texts  # ...and repeat exactly
    usage = outputs[-1].usage
    assert usage.completion_tokens == 36 and all(choices[i]["finish"] is FinishReason.LENGTH for i in range(3))


async def test_logprobs_are_the_sampled_tokens_with_their_alternatives(engine):
    request = GenerateRequest("lp", STORY, top_logprobs=3, sampling=SamplingParams(max_tokens=8, temperature=0.0))
    _, choices = await run(engine, request)
    got = choices[0]
    assert [lp.token_id for lp in got["logprobs"]] == got["ids"]
    for lp in got["logprobs"]:
        assert lp.logprob <= 0 and len(lp.top) == 3
        # Greedy: the chosen token is a most likely one (in bfloat16, the default on CPUs with bf16 units, two tokens
        # can tie exactly, and either may be listed first).
        assert math.isclose(lp.top[0].logprob, lp.logprob, abs_tol=1e-4)
        assert lp.token_id in [t.token_id for t in lp.top if math.isclose(t.logprob, lp.logprob, abs_tol=1e-4)]
        assert lp.token_bytes.decode("utf-8", errors="replace") == lp.token or "\ufffd" in lp.token


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
    assert await settled(engine) == EMPTY
    # And it still answers.
    final = [o async for o in engine.generate(GenerateRequest("after", TextInput("Hi"), sampling=SamplingParams(max_tokens=4)))]
    assert final[-1].usage.completion_tokens > 0


async def test_a_failing_engine_fails_its_requests_and_then_refuses_new_ones():
    """Last in this module: it breaks its own engine (the shared one stays healthy)."""
    engine = Pipeline(TransformersEngine(ServiceConfig(runner="transformers", dtype="float32")), HermesFormat())
    await engine.start()
    try:
        outputs = engine.generate(GenerateRequest("doomed", STORY, sampling=LONG))
        await anext(outputs)
        engine.inject_fault()  # the generation loop raises at its next step, as a crash inside it would
        with pytest.raises(EngineFailure) as failed:
            async for _ in outputs:
                pass
        assert "injected" not in failed.value.message  # the cause stays in the log
        deadline = time.monotonic() + 10
        while engine.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not engine.is_alive()
        with pytest.raises(Unavailable):
            await anext(engine.generate(GenerateRequest("late", TextInput("Hi"))))
        assert engine.leftovers()["open_requests"] == 0
    finally:
        await engine.stop()
