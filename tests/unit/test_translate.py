"""OpenAI bodies → GenerateRequest, and GenerateResponse → OpenAI chunks and responses."""

import json
import math

import pytest

from pydantic import ValidationError

from gateway.errors import BadRequest
from gateway.protocol import ChatCompletionRequest
from gateway.routes import _validation_error
from gateway.translate import ChatAccumulator, ChatChunkEncoder, chat_to_proto
from generate.v1 import generate_pb2 as pb


def body(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_text_parts_and_developer_role():
    request = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    })
    chat = chat_to_proto(request, "rid").request.input.chat
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert [p.text for p in chat.messages[1].content] == ["a", "b"]


def refusal(raw: dict) -> BadRequest:
    """The 400 the gateway answers for a body its request models refuse."""
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(raw)
    return _validation_error(caught.value, raw)


def test_image_parts_are_refused_naming_the_part():
    error = refusal({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    })
    assert error.param == "messages[0].content[0]" and "text only" in error.message


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
        ({"tool_choice": "auto"}, "tool_choice", "tool calling"),
        ({"response_format": {"type": "json_object"}}, "response_format.type", "structured output"),
        ({"reasoning_effort": "high"}, "reasoning_effort", "reasoning models"),
        ({"audio": {"voice": "x"}}, "audio", "text only"),
        ({"modalities": ["text", "audio"]}, "modalities[1]", "text only"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "tool calling"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing"),
    ],
)
def test_unsupported_fields_are_refused_by_the_request_models(fields, param, words):
    error = refusal({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})
    assert error.param == param and words in error.message, error.message


def test_unset_sampling_fields_stay_unset_and_zero_is_kept():
    s = chat_to_proto(body(), "rid").request.sampling
    assert not s.HasField("temperature") and not s.HasField("max_tokens") and not s.HasField("seed")
    s = chat_to_proto(body(temperature=0, top_p=0.5, seed=0), "rid").request.sampling
    assert s.HasField("temperature") and s.temperature == 0.0 and s.top_p == 0.5 and s.HasField("seed")


def test_max_completion_tokens_wins_and_errors_name_it():
    translated = chat_to_proto(body(max_tokens=5, max_completion_tokens=9), "rid")
    assert translated.request.sampling.max_tokens == 9
    assert translated.param_alias == {"max_tokens": "max_completion_tokens"}
    with pytest.raises(BadRequest) as caught:
        chat_to_proto(body(max_completion_tokens=-1), "rid")
    assert caught.value.param == "max_completion_tokens"


def test_stop_logit_bias_seed_and_extras():
    s = chat_to_proto(body(stop="END", logit_bias={"42": -100}, seed=-1, top_k=5, min_p=0.1,
                           repetition_penalty=1.1, stop_token_ids=[7], ignore_eos=True, min_tokens=3), "rid").request.sampling
    assert list(s.stop) == ["END"] and dict(s.logit_bias) == {42: -100.0}
    assert s.seed == 2**64 - 1 and s.top_k == 5 and list(s.stop_token_ids) == [7] and s.ignore_eos and s.min_tokens == 3
    assert math.isclose(s.min_p, 0.1, rel_tol=1e-6)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": -1}, "n"),
    ],
)
def test_refusals_name_the_field(fields, param):
    with pytest.raises(BadRequest) as caught:
        chat_to_proto(body(**fields), "rid")
    assert caught.value.param == param


def test_logprobs_request():
    request = chat_to_proto(body(logprobs=True, top_logprobs=3), "rid").request
    assert request.HasField("logprobs") and request.logprobs.top_logprobs == 3
    assert not chat_to_proto(body(), "rid").request.HasField("logprobs")


def response(*choices, usage=None):
    message = pb.GenerateResponse(choices=list(choices))
    if usage:
        message.usage.CopyFrom(usage)
    return message


def test_chunk_encoder_shapes():
    encoder = ChatChunkEncoder("chatcmpl-1", 123, "m", include_usage=True)
    start = [json.loads(c) for c in encoder.start(2)]
    assert [c["choices"][0]["delta"] for c in start] == [{"role": "assistant", "content": ""}] * 2
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in start)
    chunks = [json.loads(c) for c in encoder.encode(response(
        pb.ChoiceDelta(index=1, text="Hé", token_ids=[1]),
        pb.ChoiceDelta(index=0, text="x", finish_reason=pb.FINISH_REASON_LENGTH),
    ))]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        (1, {"content": "Hé"}, None), (0, {"content": "x"}, None), (0, {}, "length"),
    ]
    final = json.loads(encoder.usage(pb.Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2)))
    assert final["choices"] == [] and final["id"] == "chatcmpl-1"
    assert final["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                              "prompt_tokens_details": {"cached_tokens": 2}}


def test_chunk_without_include_usage_has_no_usage_key():
    chunk = json.loads(ChatChunkEncoder("c", 1, "m", include_usage=False).start(1)[0])
    assert "usage" not in chunk


def test_accumulator_builds_a_completion_with_logprobs():
    accumulator = ChatAccumulator(1, logprobs=True)
    lp = pb.TokenLogprob(token_id=5, token="A", logprob=-0.5, token_bytes=b"A",
                         top_logprobs=[pb.TopLogprob(token_id=5, token="A", logprob=-0.5, token_bytes=b"A")])
    accumulator.add(response(pb.ChoiceDelta(index=0, text="A", token_ids=[5], logprobs=[lp])))
    accumulator.add(response(pb.ChoiceDelta(index=0, finish_reason=pb.FINISH_REASON_STOP)))
    result = accumulator.response("c", 1, "m", pb.Usage(prompt_tokens=2, completion_tokens=2))
    choice = result["choices"][0]
    assert choice["message"]["content"] == "A" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["content"] == [{"token": "A", "logprob": -0.5, "bytes": [65],
                                              "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}]}]
    assert result["usage"]["total_tokens"] == 4
