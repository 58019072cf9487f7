"""The request pipeline's rules (service/pipeline.py), on exact token sequences of the real tokenizer: characters
split across tokens and chunks, stop strings across chunk boundaries, end tokens, log probabilities, the n-way
merge, usage, failures, and what is left behind. And the scripted-engine test: the same token sequence through
every backend adapter gives the caller the same outputs."""

from __future__ import annotations

import asyncio
import random

import pytest

from service.domain import ChatInput, FinishReason, GenerateRequest, Message, SamplingParams, TextInput, Tool, ToolChoice
from service.engines.default_model import prepared_path
from service.engines.tool_calls import HermesFormat
from service.errors import EngineFailure, InvalidArgument, Unavailable
from service.pipeline import Pipeline
from tests.helpers.scripted import Script, ScriptedBackend, scripted_sglang, scripted_transformers

MODEL = prepared_path()
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="run `make model` first")

TEXT = "Grüße 🙂, 東京 — the END is near; done"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def eos(tokenizer) -> int:
    return tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


async def started(tokenizer, script: Script, eos: int) -> Pipeline:
    pipeline = Pipeline(ScriptedBackend(tokenizer, script, eos), HermesFormat())
    await pipeline.start()
    return pipeline


def request(**sampling) -> GenerateRequest:
    n = sampling.pop("n", 1)
    top_logprobs = sampling.pop("top_logprobs", None)
    sampling.setdefault("max_tokens", 64)
    return GenerateRequest("r", TextInput("x"), SamplingParams(**sampling), n=n, top_logprobs=top_logprobs)


async def collect(pipeline: Pipeline, req: GenerateRequest) -> dict:
    """Per choice: text, ids, logprob tokens, finish, stop string or token, tool calls; and usage."""
    outputs = [o async for o in pipeline.generate(req)]
    assert all(o.usage is None for o in outputs[:-1]) and outputs[-1].usage is not None
    choices: dict = {}
    for o in outputs:
        assert [c.index for c in o.choices] == sorted({c.index for c in o.choices})
        for c in o.choices:
            got = choices.setdefault(c.index, {"text": "", "ids": [], "logprobs": [], "finish": None, "calls": []})
            assert got["finish"] is None, "nothing after a choice's finish"
            got["text"] += c.text
            got["ids"] += c.token_ids
            got["logprobs"] += [(lp.token_id, lp.logprob, lp.token_bytes, [(t.token_id, t.logprob) for t in lp.top])
                                for lp in c.logprobs or []]
            got["calls"] += [(t.index, t.id is not None, t.name, t.arguments) for t in c.tool_calls]
            if c.finish_reason is not None:
                got["finish"] = (c.finish_reason, c.stop_string, c.stop_token_id)
    u = outputs[-1].usage
    return {"choices": choices, "usage": (u.prompt_tokens, u.completion_tokens, u.cached_tokens)}


# ---------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
async def test_split_characters_stream_whole_whatever_the_chunking(tokenizer, eos, chunk):
    ids = encode(tokenizer, TEXT)
    pipeline = await started(tokenizer, Script(ids, chunk=chunk), eos)
    seen = ""
    async for o in pipeline.generate(request()):
        for c in o.choices:
            assert "\ufffd" not in c.text
            seen += c.text
            assert TEXT.startswith(seen)
    assert seen == TEXT


async def test_an_end_token_ends_the_choice_uncounted_in_text_but_counted_in_usage(tokenizer, eos):
    ids = encode(tokenizer, "Hello there")
    pipeline = await started(tokenizer, Script([*ids, eos], end="eos"), eos)
    got = await collect(pipeline, request(top_logprobs=1))
    (choice,) = got["choices"].values()
    assert choice["text"] == "Hello there" and choice["ids"] == ids
    assert choice["finish"] == (FinishReason.STOP, None, None)
    assert [lp[0] for lp in choice["logprobs"]] == ids
    assert got["usage"][1] == len(ids) + 1


async def test_a_callers_stop_token_is_reported_and_ends_the_choice_even_mid_chunk(tokenizer, eos):
    ids = encode(tokenizer, "one two three four")
    stop = ids[2]
    pipeline = await started(tokenizer, Script(ids, chunk=4), eos)
    got = await collect(pipeline, request(stop_token_ids=(stop,)))
    choice = got["choices"][0]
    assert choice["ids"] == ids[:2] and choice["finish"] == (FinishReason.STOP, None, stop)
    assert got["usage"][1] == 3
    assert pipeline.backend.open == set()  # the engine's stream was closed at once


@pytest.mark.parametrize("chunk", [1, 2, 5])
async def test_a_stop_string_is_never_streamed_and_ends_the_engines_work(tokenizer, eos, chunk):
    ids = encode(tokenizer, TEXT)
    pipeline = await started(tokenizer, Script(ids, chunk=chunk, end="hang"), eos)
    sent = []
    async for o in pipeline.generate(request(stop=("END",))):
        sent += [c for c in o.choices]
    text = "".join(c.text for c in sent)
    assert text == TEXT[: TEXT.index("END")] and all("E" not in c.text for c in sent[-1:])
    assert sent[-1].finish_reason is FinishReason.STOP and sent[-1].stop_string == "END"
    assert pipeline.backend.open == set()
    assert not any(pipeline.leftovers().values())


async def test_held_back_text_that_is_not_a_stop_is_released(tokenizer, eos):
    pipeline = await started(tokenizer, Script(encode(tokenizer, "an END? no, ENDING"), chunk=1), eos)
    got = await collect(pipeline, request(stop=("END!",)))
    assert got["choices"][0]["text"] == "an END? no, ENDING"
    assert got["choices"][0]["finish"] == (FinishReason.LENGTH, None, None)


async def test_random_stop_strings_and_chunking_never_take_text_back(tokenizer, eos):
    rng = random.Random(11)
    ids = encode(tokenizer, TEXT)
    for _ in range(25):
        at = rng.randrange(1, len(TEXT) - 3)
        stop = TEXT[at : at + rng.randrange(1, 4)]
        pipeline = await started(tokenizer, Script(ids, chunk=rng.randrange(1, 6)), eos)
        got = await collect(pipeline, request(stop=(stop, "zzz")))
        assert got["choices"][0]["text"] == TEXT[: TEXT.index(stop)]


# ---------------------------------------------------------------------------------------------- choices, usage, errors


async def test_n_choices_get_their_own_seeds_and_usage_counts_all(tokenizer, eos):
    ids = encode(tokenizer, "a b c d e f")
    pipeline = await started(tokenizer, Script(ids, chunk=2), eos)
    got = await collect(pipeline, request(n=3, seed=2**63 - 2, max_tokens=4))
    assert sorted(got["choices"]) == [0, 1, 2]
    assert [j.seed for j in pipeline.backend.jobs] == [2**63 - 2, 2**63 - 1, 0]
    assert len({j.rid for j in pipeline.backend.jobs}) == 3
    assert got["usage"] == (1, 12, 4)


async def test_the_backends_refusal_and_bad_input_come_before_any_job(tokenizer, eos):
    pipeline = await started(tokenizer, Script([1, 2]), eos)
    with pytest.raises(InvalidArgument) as refused:
        await collect(pipeline, request(min_p=0.5))
    assert refused.value.field == "sampling.min_p"
    with pytest.raises(InvalidArgument):
        await collect(pipeline, request(max_tokens=10_000))
    assert pipeline.backend.jobs == []


async def test_an_unexpected_engine_error_becomes_a_fixed_failure_and_stops_the_siblings(tokenizer, eos):
    pipeline = await started(tokenizer, Script(encode(tokenizer, "some text"), end="fail"), eos)
    with pytest.raises(EngineFailure) as failed:
        await collect(pipeline, request(n=2))
    assert "secret" not in failed.value.message and "exploded" not in failed.value.message
    assert not any(pipeline.leftovers().values())


async def test_stop_wakes_readers_still_waiting(tokenizer, eos):
    pipeline = await started(tokenizer, Script(encode(tokenizer, "a b"), end="hang"), eos)
    stream = pipeline.generate(request())
    await anext(stream)
    reader = asyncio.create_task(anext(stream))  # waiting, or about to wait: stop() wakes it either way
    await pipeline.stop()
    with pytest.raises(Unavailable):
        await reader
    await stream.aclose()
    with pytest.raises(Unavailable):
        await anext(pipeline.generate(request()))
    assert not any(pipeline.leftovers().values())


async def test_before_start_everything_is_unavailable(tokenizer, eos):
    pipeline = Pipeline(ScriptedBackend(tokenizer, Script([1]), eos), HermesFormat())
    with pytest.raises(Unavailable):
        pipeline.info
    with pytest.raises(Unavailable):
        await anext(pipeline.generate(request()))
    with pytest.raises(Unavailable):
        await pipeline.count_tokens(TextInput("x"))


async def test_a_slow_reader_gets_everything_merged(tokenizer, eos):
    ids = encode(tokenizer, TEXT)
    pipeline = await started(tokenizer, Script(ids, chunk=1), eos)
    stream = pipeline.generate(request())
    first = await anext(stream)
    await asyncio.sleep(0.05)  # the engine finishes meanwhile
    rest = [o async for o in stream]
    assert len(rest) == 1 and rest[0].usage is not None
    assert "".join(c.text for o in (first, *rest) for c in o.choices) == TEXT


# ---------------------------------------------------------------------------------------------- every adapter alike


CASES = {
    "plain": (Script([], chunk=3), {}),
    "eos+logprobs": (Script([], chunk=2, end="eos"), {"top_logprobs": 2}),
    "stop string, n=2": (Script([], chunk=4, end="hang"), {"stop": ("END",), "n": 2}),
    "length": (Script([], chunk=5), {"max_tokens": 6, "top_logprobs": 0}),
    "failure": (Script([], chunk=3, end="fail"), {}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_the_same_tokens_through_every_adapter_give_the_same_outputs(tokenizer, eos, case):
    script, sampling = CASES[case]
    script.ids = encode(tokenizer, TEXT) + ([eos] if script.end == "eos" else [])
    pipelines = {
        "scripted": await started(tokenizer, script, eos),
        "sglang": await scripted_sglang(str(MODEL), script, eos),
        "transformers": await scripted_transformers(tokenizer, script, eos),
    }
    results = {}
    for name, pipeline in pipelines.items():
        try:
            results[name] = await collect(pipeline, request(**dict(sampling)))
        except EngineFailure as e:
            results[name] = ("failed", e.message)
        assert not any(pipeline.leftovers().values()), (name, pipeline.leftovers())
        await pipeline.stop()
    assert results["sglang"] == results["scripted"] == results["transformers"], case
    if script.end == "fail":
        assert results["scripted"][0] == "failed"
    else:
        assert results["scripted"]["choices"][0]["text"]


async def test_tool_calls_are_read_after_the_merge_the_same_way_everywhere(tokenizer, eos):
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    script = Script(encode(tokenizer, call) + [eos], chunk=3, end="eos")
    tools = (Tool("get_time", "", '{"type": "object", "properties": {"tz": {"type": "string"}}}'),)
    req = GenerateRequest("t", ChatInput((Message("user", "time?"),), tools=tools, tool_choice=ToolChoice("auto")),
                          SamplingParams(max_tokens=64))
    results = []
    for make in (lambda: started(tokenizer, script, eos), lambda: scripted_sglang(str(MODEL), script, eos),
                 lambda: scripted_transformers(tokenizer, script, eos)):
        pipeline = await make()
        results.append(await collect(pipeline, req))
        await pipeline.stop()
    assert results[0] == results[1] == results[2]
    choice = results[0]["choices"][0]
    assert choice["text"] == "" and choice["finish"][0] is FinishReason.TOOL_CALLS
    assert choice["calls"][0][:3] == (0, True, "get_time")
    assert "".join(c[3] for c in choice["calls"]) == '{"tz": "UTC"}'
