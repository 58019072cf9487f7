"""Reasoning parsers and the thinking budget (service/engines/reasoning.py), and the grammar that leaves thinking free."""

from __future__ import annotations

import random

import pytest
import xgrammar as xgr

from service.engines.grammar import GrammarSpec, after_thinking
from service.engines.reasoning import ReasoningSplitter, ThinkingBudget, choose

TEXT = "<think>\nLet me think.\nStep 2: 2+2.\n</think>\n\nThe answer is 4."


def split(parser: str, text: str, cuts: list[int]) -> tuple[str, str]:
    splitter, reasoning, answer, previous = ReasoningSplitter(parser), "", "", 0
    for cut in [*cuts, len(text)]:
        r, a = splitter.feed(text[previous:cut])
        reasoning, answer, previous = reasoning + r, answer + a, cut
        if parser != "none":
            assert "<think>" not in answer and "</think>" not in reasoning
    r, a = splitter.flush()
    return reasoning + r, answer + a


def test_every_chunking_gives_the_same_split():
    rng = random.Random(3)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randrange(1, 8)))
        assert split("qwen3", TEXT, cuts) == ("Let me think.\nStep 2: 2+2.", "The answer is 4.")


@pytest.mark.parametrize(
    "parser, text, expected",
    [
        ("qwen3", "Plain answer, thinking off.", ("", "Plain answer, thinking off.")),
        ("qwen3", "<think>\ncut short by max_tok", ("cut short by max_tok", "")),
        ("qwen3-thinking", "already inside\n</think>\n\nanswer", ("already inside", "answer")),
        ("qwen3-thinking", "<think>\nwrote the tag anyway</think>answer", ("wrote the tag anyway", "answer")),
        ("none", TEXT, ("", TEXT)),
    ],
)
def test_parsers(parser, text, expected):
    assert split(parser, text, [len(text) // 2]) == expected


def test_auto_reads_the_template():
    assert choose("auto", "{% if enable_thinking is false %}<think>\n\n</think>{% endif %}") == "qwen3"
    assert choose("auto", "{{ '<|im_start|>assistant\\n<think>\\n' }}") == "qwen3-thinking"
    assert choose("auto", "{{ messages }}") == "none" and choose("qwen3", "") == "qwen3"


def test_the_budget_closes_the_thinking_by_the_first_opening_tag():
    start, end, newline = 10, 11, 5
    budget = ThinkingBudget.for_prompt(3, (start, end, newline), [1, 2])
    assert budget.forced([start, 7, 7]) is None
    assert budget.forced([start, 7, start, 7]) == newline  # a repeated opening tag does not restart the count
    assert budget.forced([start, 7, 7, 7, newline]) == end
    assert budget.forced([start, 7, 7, 7, newline, end, 9]) is None
    assert budget.forced([7, 7, 7, 7]) is None  # not thinking
    opened_by_template = ThinkingBudget.for_prompt(2, (start, end, newline), [1, start, 5])
    assert opened_by_template.open_in_prompt == 1 and opened_by_template.forced([7]) == newline


def test_the_answer_grammar_waits_for_the_end_of_the_thinking():
    from transformers import AutoTokenizer

    from service.engines.default_model import prepared_path

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(prepared_path()))
    spec = after_thinking(GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                                     '"required": ["a"]}', "constraint.json_schema"), "qwen3")
    assert spec.kind == "ebnf" and spec.field == "constraint.json_schema"
    compiled = xgr.GrammarCompiler(info).compile_grammar(spec.text)
    assert xgr.GrammarMatcher(compiled).accept_string('<think>\nanything {"a": "x"} at all\n</think>\n\n{"a": 1}')
    assert not xgr.GrammarMatcher(compiled).accept_string('<think>\nok\n</think>\n\n{"a": "x"}')
    assert not xgr.GrammarMatcher(compiled).accept_string('{"a": 1}')  # the thinking comes first
