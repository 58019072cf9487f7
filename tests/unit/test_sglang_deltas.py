"""The SGLang engine's pure parts, without sglang installed: cumulative chunks to new tokens, finish reasons,
the sampling and server-argument mappings, and the SGLang backend behind the request pipeline, driven by a
stand-in engine.

The chunks here follow SGLang 0.5.23's streaming shape (read from its tokenizer_manager.py): cumulative
`text`, `output_ids` as a live list that grows after it was handed out, `meta_info` with `finish_reason` None
until the end. tests/contract_sglang/ checks the same code against chunks produced by sglang's own code.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from types import MappingProxyType

import pytest

from service.config import ServiceConfig
from service.domain import (
    ChatInput,
    FinishReason,
    GenerateRequest,
    Message,
    ResolvedSampling,
    SamplingParams,
    TextInput,
)
from service.engines.default_model import prepared_path
from service.engines.sglang_compat import CumulativeToTokens, abort_error, engine_kwargs, sampling_params
from service.engines.sglang_engine import SGLangEngine
from service.engines.tool_calls import tool_format
from service.errors import EngineFailure, InvalidArgument, Overloaded, Unavailable
from service.pipeline import Pipeline

EOS = 2


class Stream:
    """Builds chunks the way SGLang's tokenizer manager does in its default (cumulative) streaming mode."""

    def __init__(self, prompt_tokens: int = 7, cached_tokens: int = 0) -> None:
        self.text = ""
        self.ids: list[int] = []  # the live list: every intermediate chunk hands out this same object
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.logprobs: list[tuple] = []
        self.top: list = []

    def chunk(self, text: str, ids: list[int], finish: dict | None = None, logprobs: bool = False) -> dict:
        self.text += text
        self.ids.extend(ids)
        meta = {
            "id": "rid",
            "finish_reason": finish,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.ids),
            "cached_tokens": self.cached_tokens,
        }
        if logprobs:
            for t in ids:
                self.logprobs.append((-0.25 * t, t, None))
                self.top.append([(-0.25 * t, t, None), (-9.0, 99, None)])
            meta["output_token_logprobs"] = self.logprobs
            meta["output_top_logprobs"] = self.top
        return {"text": self.text, "output_ids": self.ids.copy() if finish else self.ids, "meta_info": meta}

    def set_text(self, text: str, ids: list[int], finish: dict | None = None) -> dict:
        """A chunk whose whole text is `text` (its tail may differ from the previous chunk's)."""
        self.text = ""
        return self.chunk(text, ids, finish)


# ---------------------------------------------------------------------------------------------- chunks to tokens


def run(conv: CumulativeToTokens, chunks):
    """Makes and feeds one chunk at a time, as the engine reads them: SGLang's live id list grows after."""
    return [c for c in (conv.feed(make()) for make in chunks) if c is not None]


def test_cumulative_chunks_become_new_tokens_and_live_ids_are_copied():
    s = Stream()
    conv = CumulativeToTokens()
    first = conv.feed(s.chunk("Hello", [10]))
    # SGLang keeps appending to the list it handed out; the chunk must not see that.
    live = s.ids
    second = conv.feed(s.chunk(" world", [11, 12]))
    assert live is s.ids and live == [10, 11, 12]
    assert (first.token_ids, first.finished, first.cached_tokens) == ([10], None, 0)
    assert second.token_ids == [11, 12]
    last = conv.feed(s.chunk("!", [13], {"type": "length", "length": 4}))
    assert (last.token_ids, last.finished) == ([13], FinishReason.LENGTH)
    assert conv.done and conv.feed(s.chunk("more", [14])) is None


def test_the_end_token_sglang_stopped_on_stays_in_the_ids():
    s = Stream()
    (a, b) = run(CumulativeToTokens(), [lambda: s.chunk("a", [5]), lambda: s.chunk("", [EOS], {"type": "stop", "matched": EOS})])
    assert (a.token_ids, b.token_ids, b.finished) == ([5], [EOS], FinishReason.STOP)


@pytest.mark.parametrize("matched", ["END", "NaN happened", 50, None])
def test_every_sglang_stop_is_a_stop(matched):
    # SGLang finishes a request whose logits went NaN with FINISH_MATCHED_STR("NaN happened").
    s = Stream()
    (chunk,) = run(CumulativeToTokens(), [lambda: s.chunk("x", [1], {"type": "stop", "matched": matched})])
    assert chunk.finished is FinishReason.STOP


def test_logprobs_follow_the_ids_and_keep_sglang_tuple_order():
    s = Stream()
    chunks = run(
        CumulativeToTokens(want_logprobs=True),
        [
            lambda: s.chunk("ab", [3, 4], logprobs=True),
            lambda: s.chunk("c", [5], {"type": "length", "length": 3}, logprobs=True),
        ],
    )
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.logprob for lp in lps] == [-0.75, -1.0, -1.25]
    assert lps[0].top == [(3, -0.75), (99, -9.0)]
    assert [t for c in chunks for t in c.token_ids] == [3, 4, 5]


def test_ids_wait_for_their_logprobs():
    s = Stream()
    conv = CumulativeToTokens(want_logprobs=True)
    chunk = s.chunk("ab", [3, 4], logprobs=True)
    chunk["meta_info"]["output_token_logprobs"] = chunk["meta_info"]["output_token_logprobs"][:1]
    out = conv.feed(chunk)
    assert out.token_ids == [3] and len(out.logprobs) == 1
    rest = conv.feed(s.chunk("", [], logprobs=True))
    assert rest.token_ids == [4] and len(rest.logprobs) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidArgument),
        (429, Overloaded),
        (503, Unavailable),
        (500, EngineFailure),
        (None, EngineFailure),
    ],
)
def test_abort_chunks_without_token_counts_raise_by_status(status, error):
    s = Stream()
    conv = CumulativeToTokens()
    conv.feed(s.chunk("a", [1]))
    # _handle_abort_req's chunk: no prompt_tokens or cached_tokens in meta_info.
    abort = {
        "text": "a",
        "output_ids": [1],
        "meta_info": {
            "id": "rid",
            "finish_reason": {"type": "abort", "message": "Input is too long", "status_code": status},
            "completion_tokens": 1,
        },
    }
    with pytest.raises(error) as raised:
        conv.feed(abort)
    assert conv.done
    if error is InvalidArgument:
        assert raised.value.field == "input" and "too long" in raised.value.message
    else:
        assert "too long" not in raised.value.message


def test_abort_error_reads_http_status_enums():
    from http import HTTPStatus

    assert isinstance(abort_error({"type": "abort", "status_code": HTTPStatus.BAD_REQUEST}), InvalidArgument)


# ---------------------------------------------------------------------------------------------- mappings


def resolved(**overrides) -> ResolvedSampling:
    values = dict(
        max_tokens=16,
        min_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        min_p=0.05,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        repetition_penalty=1.1,
        stop=("\n\n",),
        stop_token_ids=(7,),
        ignore_eos=False,
        seed=41,
        logit_bias=MappingProxyType({5: -100.0, 6: 2.5}),
        skip_special_tokens=False,
    )
    values.update(overrides)
    return ResolvedSampling(**values)


def test_sampling_params_maps_every_field_in_sglang_keys():
    p = sampling_params(resolved(), seed=42)
    assert p == {
        "max_new_tokens": 16,
        "min_new_tokens": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.1,
        "stop": ["\n\n"],
        "stop_token_ids": [7],
        "ignore_eos": False,
        "skip_special_tokens": False,
        "logit_bias": {"5": -100.0, "6": 2.5},
        "sampling_seed": 42,
        "custom_params": None,
    }
    # Every field of ResolvedSampling has its SGLang key: a new field fails here until it is mapped.
    renamed = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "seed": "sampling_seed",
               "max_reasoning_tokens": "custom_params"}
    assert {renamed.get(f, f) for f in ResolvedSampling.__dataclass_fields__} == set(p)


def test_sampling_params_defaults_and_edges():
    p = sampling_params(
        resolved(stop=(), stop_token_ids=(), logit_bias=MappingProxyType({}), seed=None, top_k=40)
    )
    assert (p["stop"], p["stop_token_ids"], p["logit_bias"], p["sampling_seed"], p["top_k"]) == (
        None,
        None,
        None,
        None,
        40,
    )
    # The choice's seed is the pipeline's (the request's + the index, within int64); it is passed as given.
    assert sampling_params(resolved(seed=2**63 - 1), seed=0)["sampling_seed"] == 0
    assert "seed" not in p and "n" not in p


def test_ignore_eos_with_stop_token_ids_is_refused():
    backend = SGLangEngine(ServiceConfig(engine="sglang", sglang_args=(("enable_deterministic_inference", True),)))
    with pytest.raises(InvalidArgument) as raised:
        backend.refuse(resolved(ignore_eos=True))
    assert raised.value.field == "sampling.stop_token_ids"
    backend.refuse(resolved(ignore_eos=True, stop_token_ids=()))
    assert sampling_params(resolved(ignore_eos=True, stop_token_ids=()))["ignore_eos"] is True


def test_engine_kwargs():
    kwargs = engine_kwargs(ServiceConfig(model="/models/Qwen3-8B"))
    assert kwargs["model_path"] == "/models/Qwen3-8B"
    assert kwargs["served_model_name"] == "Qwen3-8B"
    assert kwargs["schedule_policy"] == "lpm"
    assert "disable_radix_cache" not in kwargs
    assert not {
        "context_length",
        "mem_fraction_static",
        "chunked_prefill_size",
        "max_running_requests",
        "quantization",
    } & set(kwargs)
    full = engine_kwargs(
        ServiceConfig(
            model="/m/x",
            served_model_name="x-chat",
            tp_size=2,
            context_length=8192,
            mem_fraction_static=0.8,
            chunked_prefill_size=4096,
            max_running_requests=64,
            schedule_policy="fcfs",
            quantization="fp8",
            dtype="bfloat16",
        )
    )
    assert {
        k: full[k]
        for k in (
            "served_model_name",
            "tp_size",
            "context_length",
            "mem_fraction_static",
            "chunked_prefill_size",
            "max_running_requests",
            "schedule_policy",
            "quantization",
            "dtype",
        )
    } == {
        "served_model_name": "x-chat",
        "tp_size": 2,
        "context_length": 8192,
        "mem_fraction_static": 0.8,
        "chunked_prefill_size": 4096,
        "max_running_requests": 64,
        "schedule_policy": "fcfs",
        "quantization": "fp8",
        "dtype": "bfloat16",
    }
    with pytest.raises(ValueError):
        engine_kwargs(ServiceConfig())


# ---------------------------------------------------------------------------------------------- the engine


MODEL = prepared_path()
needs_model = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason="run `make model` first")


class FakeTokenizerManager:
    def __init__(self, engine: FakeSGLangEngine) -> None:
        self.engine = engine
        self.context_len = 2048
        self.model_config = type("ModelConfig", (), {"vocab_size": 49152})()
        self.gracefully_exit = False
        self.asyncio_tasks: set = set()
        self.aborted: list[str] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)

    def auto_create_handle_loop(self) -> None:
        # What SGLang's does in the main thread: its own SIGTERM handler on the running loop.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.engine.sglang_sigterm.set)


class FakeSGLangEngine:
    """Stands in for `sglang.Engine` only because no GPU exists here: SGLang cannot run on this machine's CPU.

    Its streams follow a script of SGLang-shaped cumulative chunks (see `Stream`); it records the calls the
    engine makes and which streams were closed before their end. The real package's signatures and chunk
    shapes are checked in tests/contract_sglang/.
    """

    def __init__(self, script=None, **server_args) -> None:
        self.server_args = server_args
        self.script = script or self.default_script
        self.calls: list[dict] = []
        self.closed_early: list[str] = []
        self.shut_down = False
        self.sglang_sigterm = asyncio.Event()
        self.tokenizer_manager = FakeTokenizerManager(self)

    @staticmethod
    async def default_script(call):
        s = Stream(prompt_tokens=len(call["input_ids"]), cached_tokens=3)
        yield s.chunk("Hi", ids("Hi"))
        yield s.chunk(" there", [*ids(" there"), EOS], {"type": "stop", "matched": EOS})

    async def async_generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        return_logprob=False,
        top_logprobs_num=None,
        stream=False,
        rid=None,
    ):
        call = dict(
            input_ids=input_ids,
            sampling_params=sampling_params,
            rid=rid,
            stream=stream,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
        )
        self.calls.append(call)
        return self._stream(call)

    async def _stream(self, call):
        finished = False
        script = self.default_script if call["rid"].startswith("warmup/") else self.script
        try:
            async for chunk in script(call):
                await asyncio.sleep(0)
                finished = chunk["meta_info"]["finish_reason"] is not None
                yield chunk
        finally:
            if not finished:
                self.closed_early.append(call["rid"])

    def shutdown(self) -> None:
        self.shut_down = True

    def get_all_child_pids(self) -> list[int]:
        return []


def ids(text: str) -> list[int]:
    """The token ids of `text` in the real tokenizer: the pipeline detokenizes what SGLang streams."""
    return _tokenizer().encode(text, add_special_tokens=False)


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


async def started(script=None, **settings) -> tuple[Pipeline, FakeSGLangEngine]:
    fakes = []

    def factory(**kwargs):
        fakes.append(FakeSGLangEngine(script, **kwargs))
        return fakes[0]

    # device="cuda": the stand-in engine needs none of the CPU preparation, which would change this process's
    # environment (sglang_cpu.apply); that preparation has its own tests.
    config = ServiceConfig(model=str(MODEL), engine="sglang", device="cuda", **settings)
    engine = Pipeline(SGLangEngine(config, engine_factory=factory), tool_format(config.tool_parser))
    await engine.start()
    fakes[0].calls.clear()
    return engine, fakes[0]


def chat(text: str) -> ChatInput:
    return ChatInput(messages=(Message("user", text),))


@needs_model
async def test_generate_renders_tokenizes_and_streams():
    engine, fake = await started()
    assert engine.info.engine == "sglang" and engine.info.context_length == 2048
    assert engine.info.name == "SmolLM2-135M-Instruct"
    assert fake.server_args["schedule_policy"] == "lpm"
    request = GenerateRequest(request_id="r1", input=chat("hello"), sampling=SamplingParams(max_tokens=5))
    outputs = [o async for o in engine.generate(request)]
    (call,) = fake.calls
    assert call["input_ids"] == engine.backend.codec.prompt_ids(request.input)
    assert call["stream"] is True and call["rid"].startswith("r1/0/")
    assert call["sampling_params"]["max_new_tokens"] == 5
    assert call["return_logprob"] is False
    text = "".join(c.text for o in outputs for c in o.choices)
    assert text == "Hi there"
    assert outputs[-1].choices[-1].finish_reason is FinishReason.STOP
    assert outputs[-1].usage.prompt_tokens == await engine.count_tokens(request.input)
    assert outputs[-1].usage.completion_tokens == 3 and outputs[-1].usage.cached_tokens == 3
    assert all(o.usage is None for o in outputs[:-1])
    assert fake.closed_early == [] and engine.stats().running == engine.stats().waiting == 0
    await engine.stop()
    assert fake.shut_down and not engine.is_alive()


@needs_model
async def test_n_choices_are_separate_requests_with_their_own_seeds_merged_by_index():
    async def script(call):
        i = int(call["rid"].split("/")[1])
        s = Stream(prompt_tokens=len(call["input_ids"]), cached_tokens=[0, 5][i])
        for k in range(i + 2):
            yield s.chunk(f"{i}", ids(f"{i}"))
        yield s.chunk(".", ids("."), {"type": "length", "length": i + 3})

    engine, fake = await started(script, sglang_args=(("enable_deterministic_inference", True),))
    request = GenerateRequest(
        request_id="r2", input=TextInput("x"), n=2, sampling=SamplingParams(max_tokens=8, seed=9)
    )
    outputs = [o async for o in engine.generate(request)]
    assert [c["sampling_params"]["sampling_seed"] for c in fake.calls] == [9, 10]
    assert len({c["rid"] for c in fake.calls}) == 2
    texts = {0: "", 1: ""}
    for o in outputs:
        assert [c.index for c in o.choices] == sorted({c.index for c in o.choices})
        for c in o.choices:
            texts[c.index] += c.text
    assert texts == {0: "00.", 1: "111."}
    assert outputs[-1].usage.completion_tokens == 3 + 4
    # The least any choice found cached.
    assert outputs[-1].usage.cached_tokens == 0
    await engine.stop()


@needs_model
async def test_closing_the_stream_aborts_every_unfinished_choice():
    gate = asyncio.Event()

    async def script(call):
        s = Stream()
        yield s.chunk("a", ids("a"))
        await gate.wait()  # never set: the request is still generating when the caller leaves
        yield s.chunk("b", ids("b"), {"type": "length", "length": 2})

    engine, fake = await started(script)
    request = GenerateRequest(
        request_id="r3", input=TextInput("x"), n=2, sampling=SamplingParams(max_tokens=8)
    )
    stream = engine.generate(request)
    first = await anext(stream)
    assert first.choices and first.usage is None
    assert engine.stats().running == 2
    await stream.aclose()
    rids = sorted(c["rid"] for c in fake.calls)
    assert sorted(fake.closed_early) == rids
    assert sorted(fake.tokenizer_manager.aborted) == rids
    assert engine.stats().running == engine.stats().waiting == 0
    assert not any(engine.leftovers().values())
    await engine.stop()


@needs_model
async def test_an_abort_mid_stream_raises_and_stops_the_other_choices():
    async def script(call):
        s = Stream()
        yield s.chunk("a", ids("a"))
        if call["rid"].split("/")[1] == "0":
            yield {
                "text": "a",
                "output_ids": [1],
                "meta_info": {
                    "id": call["rid"],
                    "completion_tokens": 1,
                    "finish_reason": {"type": "abort", "message": "KV cache full", "status_code": 503},
                },
            }
        else:
            await asyncio.Event().wait()

    engine, fake = await started(script)
    request = GenerateRequest(
        request_id="r4", input=TextInput("x"), n=2, sampling=SamplingParams(max_tokens=8)
    )
    with pytest.raises(Unavailable):
        async for _ in engine.generate(request):
            pass
    other = next(c["rid"] for c in fake.calls if c["rid"].split("/")[1] == "1")
    assert fake.closed_early == [other]
    assert fake.tokenizer_manager.aborted == [other]  # the aborted one is already gone in SGLang
    await engine.stop()


@needs_model
async def test_validation_happens_before_sglang_sees_the_request():
    engine, fake = await started()
    too_long = GenerateRequest(
        request_id="r5", input=TextInput("x"), sampling=SamplingParams(max_tokens=4096)
    )
    with pytest.raises(InvalidArgument):
        async for _ in engine.generate(too_long):
            pass
    refused = GenerateRequest(
        request_id="r6", input=TextInput("x"), sampling=SamplingParams(ignore_eos=True, stop_token_ids=(5,))
    )
    with pytest.raises(InvalidArgument):
        async for _ in engine.generate(refused):
            pass
    assert fake.calls == []
    await engine.stop()
    with pytest.raises(Unavailable):
        async for _ in engine.generate(refused):
            pass


@needs_model
async def test_stop_wakes_readers_of_requests_still_in_flight():
    async def script(call):
        s = Stream()
        yield s.chunk("a", ids("a"))
        await asyncio.Event().wait()

    engine, fake = await started(script)
    stream = engine.generate(GenerateRequest(request_id="r7", input=TextInput("x")))
    await anext(stream)
    reader = asyncio.create_task(anext(stream))  # waiting, or about to wait: stop() wakes it either way
    await engine.stop()
    with pytest.raises(Unavailable):
        await reader
    await stream.aclose()


@needs_model
async def test_the_service_keeps_its_sigterm_handler():
    loop = asyncio.get_running_loop()
    service_sigterm = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, service_sigterm.set)
    try:
        engine, fake = await started()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(service_sigterm.wait(), 5)
        assert not fake.sglang_sigterm.is_set()
        await engine.stop()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# ---------------------------------------------------------------------------------------------- structured output, tools


def test_sampling_params_carry_the_grammar_under_sglangs_key():
    from service.engines.grammar import GrammarSpec

    base = ResolvedSampling(
        max_tokens=8, min_tokens=0, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, frequency_penalty=0.0,
        presence_penalty=0.0, repetition_penalty=1.0, stop=(), stop_token_ids=(), ignore_eos=False, seed=None,
        logit_bias=MappingProxyType({}), skip_special_tokens=True,
    )
    assert not {"json_schema", "regex", "ebnf"} & sampling_params(base).keys()
    for kind in ("json_schema", "regex", "ebnf"):
        assert sampling_params(base, None, GrammarSpec(kind, "x", "f"))[kind] == "x"


@needs_model
async def test_tool_calls_are_parsed_out_of_sglangs_text_and_the_grammar_is_sent():
    from service.domain import Constraint, Tool, ToolChoice

    call_text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'

    async def script(call):
        s = Stream(prompt_tokens=len(call["input_ids"]))
        for k in range(0, len(call_text), 7):  # cumulative chunks cut every 7 characters
            yield s.chunk(call_text[k : k + 7], ids(call_text[k : k + 7]))
        yield s.chunk("", [EOS], {"type": "stop", "matched": EOS})

    engine, fake = await started(script)
    tools = (Tool("get_time", "", '{"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}'),)
    request = GenerateRequest(
        request_id="t1",
        input=ChatInput(messages=(Message("user", "time?"),), tools=tools, tool_choice=ToolChoice("required")),
        sampling=SamplingParams(max_tokens=40),
    )
    outputs = [o async for o in engine.generate(request)]
    (call,) = fake.calls
    assert "ebnf" in call["sampling_params"] and "get_time" in call["sampling_params"]["ebnf"]
    deltas = [c for o in outputs for c in o.choices]
    assert "".join(c.text for c in deltas) == ""
    calls = [t for c in deltas for t in c.tool_calls]
    assert calls[0].name == "get_time" and calls[0].id.startswith("call_")
    assert "".join(t.arguments for t in calls) == '{"tz": "UTC"}'
    assert deltas[-1].finish_reason is FinishReason.TOOL_CALLS
    # The template knows no tools: they are described in a system block of the prompt SGLang got.
    assert "# Tools" in _tokenizer().decode(call["input_ids"])
    bad = GenerateRequest(request_id="t2", input=TextInput("x"),
                          constraint=Constraint("regex", "(("))
    with pytest.raises(InvalidArgument) as caught:
        async for _ in engine.generate(bad):
            pass
    assert caught.value.field == "constraint.regex" and len(fake.calls) == 1
    await engine.stop()


@needs_model
async def test_a_seed_sglang_would_ignore_is_refused_naming_the_field():
    engine, fake = await started()
    sampled = GenerateRequest(request_id="s", input=TextInput("x"), sampling=SamplingParams(max_tokens=4, seed=3))
    with pytest.raises(InvalidArgument) as caught:
        [o async for o in engine.generate(sampled)]
    assert caught.value.field == "sampling.seed" and "enable_deterministic_inference" in str(caught.value)
    assert fake.calls == []
    # Under greedy decoding the seed changes nothing, so it is accepted.
    greedy = GenerateRequest(
        request_id="g", input=TextInput("x"), sampling=SamplingParams(max_tokens=4, seed=3, temperature=0.0)
    )
    assert [o async for o in engine.generate(greedy)]
    await engine.stop()
