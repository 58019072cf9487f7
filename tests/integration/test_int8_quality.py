"""int8 weights against bfloat16 on the real default model: the quality bar for `--quantization int8`.

Perplexity over a fixed English text stays within 2% of bfloat16's, and greedy continuations of fixed prompts
mostly agree. Both are computed with the compiled runner's own decoder, run eagerly (no compile), in this process.
"""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.compiled.attention import BatchPlan, KVCache, SequenceSpan, batch_context
from service.engines.compiled.decoder import Decoder

TEXT = (
    "The history of bread is as old as farming. People in the Fertile Crescent ground wild grain between stones "
    "and baked flat cakes on hot rocks long before they kept animals. When they learned that dough left in the "
    "warmth would rise, bread became lighter and softer. Bakers in Egypt built clay ovens and sold loaves in the "
    "market, and in Rome the state handed out bread to its citizens. Today a loaf is made in much the same way: "
    "flour, water, salt and yeast are mixed, kneaded, left to rise, shaped and baked until the crust is brown."
)
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def add(a, b):\n    return",
           "Once upon a time, a little dragon", "The three primary colors are", "To make a cup of tea, first"]
STEPS = 24


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.engines.default_model import ensure_default_model

    path = ensure_default_model()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(path)


def _decoder(model, int8: bool) -> Decoder:
    decoder = Decoder(model, max_positions=1024).eval()
    if int8:
        decoder.quantize_int8()
    return decoder


def _prefill(decoder: Decoder, ids: list[int]) -> torch.Tensor:
    cache = KVCache(decoder.layers, len(ids) + STEPS + 1, decoder.kv_heads, decoder.head_dim, decoder.dtype)
    n = len(ids)
    plan = BatchPlan(slots=torch.arange(n), prefills=[SequenceSpan(0, n, 0, n, None)])
    with batch_context(cache, plan, decoder.scale):
        forward = decoder.forward_int8 if decoder.int8 else decoder.forward
        return decoder.logits(forward(torch.tensor(ids), torch.arange(n))), cache


def _perplexity(decoder: Decoder, ids: list[int]) -> float:
    logits, _ = _prefill(decoder, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(float(nll))


def _greedy(decoder: Decoder, ids: list[int]) -> list[int]:
    logits, cache = _prefill(decoder, ids)
    out = [int(logits[-1].argmax())]
    for step in range(STEPS - 1):
        position = len(ids) + step
        plan = BatchPlan(slots=torch.tensor([position]), singles=[SequenceSpan(0, 1, 0, position + 1, None)])
        with batch_context(cache, plan, decoder.scale):
            hidden = (decoder.forward_int8 if decoder.int8 else decoder.forward)(torch.tensor([out[-1]]),
                                                                                 torch.tensor([position]))
        out.append(int(decoder.logits(hidden)[0].argmax()))
    return out


@torch.inference_mode()
def test_int8_weights_keep_perplexity_within_two_percent_and_greedy_output_mostly_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bf16, int8 = _decoder(model, False), _decoder(model, True)
    ids = tokenizer(TEXT)["input_ids"]
    ppl_bf16, ppl_int8 = _perplexity(bf16, ids), _perplexity(int8, ids)
    assert 1.0 < ppl_bf16 < 100, ppl_bf16  # the model reads English: a sane perplexity to compare against
    assert abs(ppl_int8 / ppl_bf16 - 1) < 0.02, (ppl_bf16, ppl_int8)
    agree = total = 0
    for prompt in PROMPTS:
        a, b = _greedy(bf16, tokenizer(prompt)["input_ids"]), _greedy(int8, tokenizer(prompt)["input_ids"])
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), STEPS)
        agree += same
        total += STEPS
    # Tokens before the first divergence, over all prompts (printed with -s: the figure the docs quote).
    print(f"perplexity bf16 {ppl_bf16:.3f} int8 {ppl_int8:.3f}; greedy agreement {agree}/{total}")
    assert agree / total >= 0.6, (agree, total)
