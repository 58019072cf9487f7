"""The benchmark-only synthetic engine: rates, max_tokens, n, usage, cancellation, merging for slow readers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest

from service.config import ServiceConfig, parse_args
from service.domain import ChatInput, FinishReason, GenerateRequest, Message, SamplingParams, TextInput
from service.engines import EngineStats, choose_engine, create_engine
from service.engines.synthetic import CHARS_PER_TOKEN, SyntheticEngine
from service.engines.tool_calls import HermesFormat
from service.errors import InvalidArgument
from service.pipeline import Pipeline


def _request(max_tokens: int | None = 8, n: int = 1, text: str = "Hello there, engine!") -> GenerateRequest:
    return GenerateRequest(request_id="r", input=TextInput(text), sampling=SamplingParams(max_tokens=max_tokens), n=n)


async def _started(**kwargs) -> Pipeline:
    """The synthetic engine behind the request pipeline, as the service runs it."""
    engine = Pipeline(SyntheticEngine(ServiceConfig(engine="synthetic", **kwargs)), HermesFormat())
    await engine.start()
    return engine


async def _collect(engine: Pipeline, request: GenerateRequest):
    return [out async for out in engine.generate(request)]


async def test_emits_max_tokens_with_usage_and_length_finish():
    engine = await _started(synthetic_tokens_per_s=2000)
    before = engine.backend.produced_tokens  # the pipeline's warm-up
    try:
        outputs = await _collect(engine, _request(max_tokens=20))
    finally:
        await engine.stop()
    deltas = [d for out in outputs for d in out.choices]
    tokens = sum(len(d.token_ids) for d in deltas)
    assert tokens == 20
    assert len("".join(d.text for d in deltas)) == 20 * CHARS_PER_TOKEN
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(out.usage is None for out in outputs[:-1])
    usage = outputs[-1].usage
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == len("Hello there, engine!") // CHARS_PER_TOKEN
    assert engine.backend.produced_tokens - before == 20


async def test_per_stream_rate_is_kept():
    engine = await _started(synthetic_tokens_per_s=200)
    try:
        started = time.perf_counter()
        await _collect(engine, _request(max_tokens=41))
        elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    # The first token comes at once, the other 40 at 200/s: 0.2 s (generous bounds for a busy CI machine).
    assert 0.15 < elapsed < 0.6


async def test_total_rate_is_shared_by_streams():
    engine = await _started(synthetic_tokens_per_s=0, synthetic_total_tokens_per_s=400)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(_collect(engine, _request(max_tokens=21)) for _ in range(4)))
        elapsed = time.perf_counter() - started
    finally:
        await engine.stop()
    # 4 streams x 20 tokens after the first, at 400 tokens/s in all: 0.2 s.
    assert 0.15 < elapsed < 0.6


async def test_n_choices_each_get_max_tokens():
    engine = await _started(synthetic_tokens_per_s=5000)
    try:
        outputs = await _collect(engine, _request(max_tokens=5, n=3))
    finally:
        await engine.stop()
    per_choice = {}
    for out in outputs:
        for d in out.choices:
            per_choice[d.index] = per_choice.get(d.index, 0) + len(d.token_ids)
    assert per_choice == {0: 5, 1: 5, 2: 5}
    assert outputs[-1].usage.completion_tokens == 15


async def test_slow_reader_gets_merged_outputs():
    engine = await _started(synthetic_tokens_per_s=1000)
    try:
        outputs = []
        async for out in engine.generate(_request(max_tokens=100)):
            outputs.append(out)
            await asyncio.sleep(0.03)  # ~30 tokens are produced while the reader sleeps
    finally:
        await engine.stop()
    sizes = [len(out.choices[0].token_ids) for out in outputs]
    assert sum(sizes) == 100
    assert len(outputs) < 20 and max(sizes) >= 10


async def test_closing_the_stream_frees_it():
    engine = await _started(synthetic_tokens_per_s=100)
    try:
        stream = engine.generate(_request(max_tokens=1000))
        async with contextlib.aclosing(stream):
            async for _ in stream:
                assert engine.stats().running == 1
                break
        assert engine.stats().running == 0
        assert engine.stats().waiting == 0
    finally:
        await engine.stop()


async def test_cancel_while_waiting_for_first_token():
    engine = await _started(synthetic_tokens_per_s=100, synthetic_ttft_s=10.0)
    try:
        task = asyncio.create_task(_collect(engine, _request()))
        async with asyncio.timeout(5):
            while engine.stats().waiting == 0:  # the task has not reached the engine yet
                await asyncio.sleep(0)
        assert engine.stats().waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.stats() == EngineStats(running=0, waiting=0)
    finally:
        await engine.stop()


async def test_validation_and_chat_prompt_counting():
    engine = await _started()
    try:
        with pytest.raises(InvalidArgument):
            await _collect(engine, _request(max_tokens=0))
        chat = ChatInput((Message("system", "x" * 400), Message("user", "y" * 40)))
        assert await engine.count_tokens(chat) == 440 // CHARS_PER_TOKEN + 2 * 4 + 3
    finally:
        await engine.stop()


def test_needs_a_rate():
    with pytest.raises(ValueError):
        SyntheticEngine(ServiceConfig(engine="synthetic", synthetic_tokens_per_s=0, synthetic_total_tokens_per_s=0))


def test_flags_registration_and_never_auto():
    config = parse_args(["--engine", "synthetic", "--synthetic-tokens-per-s", "0", "--synthetic-total-tokens-per-s", "20000"])
    assert config.synthetic_total_tokens_per_s == 20000 and config.synthetic_tokens_per_s == 0
    assert isinstance(create_engine(config), SyntheticEngine)
    assert choose_engine("auto") != "synthetic"
    assert parse_args([]).engine != "synthetic"


async def test_start_warns_that_it_is_for_benchmarks(caplog):
    with caplog.at_level(logging.WARNING, logger="service.engines.synthetic"):
        engine = await _started()
    await engine.stop()
    assert any("benchmark" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_tokens_per_step_sets_tokens_per_output():
    engine = await _started(synthetic_tokens_per_s=2000, synthetic_tokens_per_step=4)
    try:
        outputs = await _collect(engine, _request(max_tokens=23))
    finally:
        await engine.stop()
    sizes = [len(out.choices[0].token_ids) for out in outputs]
    # The first token comes alone at admission, then whole steps of 4, and a short last step.
    assert sum(sizes) == 23
    assert sizes[0] == 1 and all(size % 4 == 0 for size in sizes[1:-1]) and sizes[-1] <= 4 + 4
