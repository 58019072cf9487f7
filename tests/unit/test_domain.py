"""Validation, default resolution and protobuf conversion of the service's domain types."""

import pytest

from generate.v1 import generate_pb2 as pb
from service import domain
from service.domain import (
    ChatInput, ChoiceDelta, FinishReason, GenerateOutput, ModelInfo, SamplingDefaults, SamplingParams, Usage,
)
from service.errors import InvalidArgument

INFO = ModelInfo(name="m", engine="test", context_length=100, max_output_tokens=50, vocab_size=1000, created=0)


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (SamplingParams(temperature=2.5), "sampling.temperature"),
        (SamplingParams(top_p=0), "sampling.top_p"),
        (SamplingParams(top_k=-2), "sampling.top_k"),
        (SamplingParams(min_p=1.5), "sampling.min_p"),
        (SamplingParams(frequency_penalty=3), "sampling.frequency_penalty"),
        (SamplingParams(repetition_penalty=0), "sampling.repetition_penalty"),
        (SamplingParams(stop=("",)), "sampling.stop"),
        (SamplingParams(stop_token_ids=(1000,)), "sampling.stop_token_ids"),
        (SamplingParams(logit_bias={5: 101.0}), "sampling.logit_bias"),
        (SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (SamplingParams(max_tokens=3, min_tokens=4), "sampling.min_tokens"),
    ],
)
def test_sampling_ranges(params, field):
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_sampling(params, vocab_size=1000)
    assert caught.value.field == field


def test_request_checks():
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_request(domain.GenerateRequest("r", ChatInput(()), n=1), INFO)
    assert caught.value.field == "input.chat.messages"
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_request(domain.GenerateRequest("r", domain.TextInput("x"), n=17), INFO)
    assert caught.value.field == "n"


def test_resolve_fits_the_context_window():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    resolved = domain.resolve(SamplingParams(), defaults, prompt_tokens=80, info=INFO)
    assert resolved.max_tokens == 20 and resolved.temperature == 0.7 and resolved.top_k == 20
    assert domain.resolve(SamplingParams(temperature=0.0, top_k=-1), defaults, 10, INFO).temperature == 0.0
    with pytest.raises(InvalidArgument) as caught:
        domain.resolve(SamplingParams(max_tokens=30), defaults, prompt_tokens=80, info=INFO)
    assert caught.value.field == "sampling.max_tokens" and "20" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        domain.resolve(SamplingParams(), defaults, prompt_tokens=100, info=INFO)
    assert caught.value.field == "input"


def test_request_from_proto_keeps_unset_apart_from_zero():
    message = pb.GenerateRequest(input=pb.Input(text="hi"), sampling=pb.SamplingParams(temperature=0.0))
    request = domain.request_from_proto(message, "rid")
    assert request.sampling.temperature == 0.0 and request.sampling.top_p is None
    assert request.n == 1 and request.top_logprobs is None and request.sampling.skip_special_tokens
    chat = pb.Input(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="a"), pb.ContentPart(text="b")])]))
    parsed = domain.input_from_proto(chat)
    assert parsed.messages[0].content == "a\nb" and parsed.add_generation_prompt


def test_output_to_proto():
    output = GenerateOutput(
        [ChoiceDelta(index=1, text="x", token_ids=[3], finish_reason=FinishReason.STOP, stop_string="END")],
        Usage(prompt_tokens=4, completion_tokens=2, cached_tokens=1),
    )
    message = domain.output_to_proto(output)
    assert message.choices[0].stop_string == "END" and message.choices[0].finish_reason == pb.FINISH_REASON_STOP
    assert message.usage.cached_tokens == 1


def test_choice_delta_merge():
    a = ChoiceDelta(index=0, text="a", token_ids=[1])
    a.merge(ChoiceDelta(index=0, text="b", token_ids=[2], finish_reason=FinishReason.LENGTH))
    assert (a.text, a.token_ids, a.finish_reason) == ("ab", [1, 2], FinishReason.LENGTH)
