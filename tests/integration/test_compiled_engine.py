"""The compiled runner (service/engines/compiled/) on the real default model, behind the request pipeline, in this
process: the same greedy tokens as transformers' own forward pass, chunked prefill, the prefix cache, preemption
when the KV cache runs out, and nothing left behind. Run in float32 without torch.compile (the e2e stack serves
compiled, and counts its compiles)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from service.config import ServiceConfig
from service.domain import ChatInput, FinishReason, GenerateRequest, Message, SamplingParams, TextInput
from service.engines.compiled.engine import CompiledEngine
from service.engines.tool_calls import HermesFormat
from service.pipeline import Pipeline

PROMPT = "The history of bread is as old as farming. People in the Fertile Crescent ground wild grain"


async def settled(engine: CompiledEngine, timeout: float = 5.0) -> dict[str, int]:
    """The engine's leftovers once they are all zero (a cancel reaches the runner at its next step), or at timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while any(engine.leftovers().values()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return engine.leftovers()


def engine_config(**overrides) -> ServiceConfig:
    return ServiceConfig(dtype="float32", quantization="none", compile=False, runner="compiled", **overrides)


async def collect(pipeline: Pipeline, request: GenerateRequest) -> dict[int, dict]:
    choices: dict[int, dict] = {}
    async for output in pipeline.generate(request):
        for c in output.choices:
            got = choices.setdefault(c.index, {"ids": [], "text": "", "finish": None, "cached": None})
            got["ids"] += c.token_ids
            got["text"] += c.text
            got["finish"] = c.finish_reason or got["finish"]
        if output.usage is not None:
            for got in choices.values():
                got["cached"] = output.usage.cached_tokens
    return choices


@pytest.fixture(scope="module")
async def pipeline():
    pipeline = Pipeline(CompiledEngine(engine_config(page_size=16, max_batch_tokens=64)), HermesFormat())
    await pipeline.start()
    yield pipeline
    await pipeline.stop()


def reference_greedy(prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' own forward pass, no cache, float32: the tokens greedy decoding must produce."""
    from transformers import AutoModelForCausalLM

    from service.engines.default_model import ensure_default_model

    model = AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


async def test_greedy_tokens_equal_transformers_own_forward_pass_with_chunked_prefill(pipeline):
    # A prompt longer than max_batch_tokens (64) is prefilled in chunks that attend to the pages before them.
    text = " ".join([PROMPT] * 5)
    request = GenerateRequest("ref", TextInput(text), sampling=SamplingParams(max_tokens=12, temperature=0.0,
                                                                               ignore_eos=True))
    prompt_ids = pipeline._backend.codec.prompt_ids(TextInput(text))
    assert len(prompt_ids) > 64
    got = (await collect(pipeline, request))[0]
    assert got["ids"] == reference_greedy(prompt_ids, 12)


async def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_answer(pipeline):
    chat = ChatInput((Message("system", PROMPT * 2), Message("user", "Say something about bread.")))
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    first = (await collect(pipeline, GenerateRequest("p1", chat, sampling=sampling)))[0]
    second = (await collect(pipeline, GenerateRequest("p2", chat, sampling=sampling)))[0]
    assert first["cached"] == 0
    # Whole 16-token pages of the prompt (all but its last token) come from the cache.
    prompt_len = len(pipeline._backend.codec.prompt_ids(chat))
    assert second["cached"] == (prompt_len - 1) // 16 * 16 > 0
    assert second["ids"] == first["ids"]


async def test_concurrent_choices_beyond_the_kv_cache_are_preempted_and_still_finish():
    # 8 pages of 16 tokens: four 40-token answers to a ~30-token prompt cannot all hold their pages at once.
    engine = CompiledEngine(engine_config(page_size=16, kv_cache_tokens=128))
    pipeline = Pipeline(engine, HermesFormat())
    await pipeline.start()
    try:
        sampling = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        alone = (await collect(pipeline, GenerateRequest("alone", TextInput(PROMPT), sampling=sampling)))[0]
        results = await asyncio.gather(*[
            collect(pipeline, GenerateRequest(f"c{i}", TextInput(PROMPT), sampling=sampling)) for i in range(4)])
        assert engine._runner.preemptions > 0
        for got in results:
            assert got[0]["finish"] == FinishReason.LENGTH
            assert len(got[0]["ids"]) == 40
            # Recomputed after preemption, the tokens already streamed stay as they were and the answer goes on.
            # (Not compared token for token with `alone`: a batch of another shape can tip a late greedy choice even
            # in float32.)
            assert got[0]["ids"][:8] == alone["ids"][:8]
        assert not any((await settled(engine)).values())
    finally:
        await pipeline.stop()


async def test_a_closed_stream_frees_its_sequence(pipeline):
    request = GenerateRequest("closed", TextInput(PROMPT), sampling=SamplingParams(max_tokens=400, ignore_eos=True))
    stream = pipeline.generate(request)
    await anext(stream)
    await stream.aclose()
    engine = pipeline._backend
    assert not any((await settled(engine)).values())
    assert engine.stats().running == 0
