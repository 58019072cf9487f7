"""Per-request sampling inside transformers' continuous batching loop.

transformers' continuous batching samples every row of a batch the same way (one global `do_sample`, and
per-request values for temperature, top-k and top-p only). A serving API needs more per request: greedy and
sampled requests in one batch, a seed per request, penalties, logit bias, min_tokens and log probabilities.
`RequestSampler` takes the place of the batch's logits-processor list: for every row that needs more than
greedy decoding it picks the token itself and hands back logits that make that token the argmax, so the
library's own greedy step selects it.

Structured output and tool calls: a constrained plan holds an XGrammar matcher. Before picking, the grammar's
token bitmask sets every token it forbids to -inf; the picked token then advances the matcher. So greedy and
sampled rows alike only ever write text the grammar accepts, and once it is complete only an end token is left.

It also records, on a request's first scheduled step, how much of its prompt came from the prefix cache
(`cached_tokens`), which the library does not report.

Everything here runs on the engine's generation thread, except `register`/`release` (event loop thread).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import xgrammar as xgr
from transformers import LogitsProcessorList
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessorList

from service.domain import ResolvedSampling
from service.engines.reasoning import ThinkingBudget

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenRecord:
    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class SamplingPlan:
    """How to pick the next token of one sequence, with its tensors built once up front."""

    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float
    min_tokens: int
    end_ids: torch.Tensor | None  # masked while fewer than min_tokens were generated
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    prompt_ids: torch.Tensor | None  # for the repetition penalty, which covers prompt and output
    generator: torch.Generator | None
    top_logprobs: int | None
    # Constrained decoding: the grammar's matcher for this sequence, and the bitmask it fills per step.
    matcher: xgr.GrammarMatcher | None = None
    bitmask: torch.Tensor | None = None
    end_token: int | None = None  # forced once the grammar has terminated
    # A cap on the model's thinking (service/engines/reasoning.py): its tokens are forced once it is reached.
    thinking: ThinkingBudget | None = None
    # Written by the generation thread, read by the event loop:
    records: list[TokenRecord] = field(default_factory=list)
    cached_tokens: int | None = None
    plain: bool = False  # greedy and nothing else: the library's own argmax is exactly right

    @classmethod
    def build(
        cls,
        s: ResolvedSampling,
        end_ids: list[int],
        prompt_ids: list[int],
        top_logprobs: int | None,
        seed: int | None,
        grammar: xgr.CompiledGrammar | None = None,
        thinking: ThinkingBudget | None = None,
    ) -> SamplingPlan:
        has_bias = bool(s.logit_bias)
        plan = cls(
            greedy=s.greedy,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens,
            end_ids=torch.tensor(end_ids, dtype=torch.long) if s.min_tokens and end_ids else None,
            bias_ids=torch.tensor(list(s.logit_bias), dtype=torch.long) if has_bias else None,
            bias_values=torch.tensor(list(s.logit_bias.values()), dtype=torch.float32) if has_bias else None,
            prompt_ids=torch.tensor(prompt_ids, dtype=torch.long) if s.repetition_penalty != 1.0 else None,
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            top_logprobs=top_logprobs,
            thinking=thinking,
        )
        if grammar is not None:
            # The grammar ends on this request's end tokens (EOS and stop_token_ids), not the tokenizer's alone.
            plan.matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=end_ids or None)
            plan.bitmask = xgr.allocate_token_bitmask(1, grammar.tokenizer_info.vocab_size)
            plan.end_token = end_ids[0] if end_ids else None
        plan.plain = (
            plan.greedy
            and plan.matcher is None
            and not has_bias
            and plan.frequency_penalty == 0
            and plan.presence_penalty == 0
            and plan.repetition_penalty == 1.0
            and plan.min_tokens == 0
            and top_logprobs is None
            and thinking is None
        )
        return plan


class RequestSampler(ContinuousBatchingLogitsProcessorList):
    def __init__(self) -> None:
        super().__init__(LogitsProcessorList())
        self.do_processing = True
        self._plans: dict[str, SamplingPlan] = {}
        self._rows: list[tuple[SamplingPlan | None, list[int]]] = []
        self._fault: str | None = None

    # ------------------------------------------------------------------------------ event loop thread

    def register(self, request_id: str, plan: SamplingPlan) -> None:
        self._plans[request_id] = plan

    def release(self, request_id: str) -> None:
        self._plans.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._plans)

    def inject_fault(self, message: str) -> None:
        """Make the next generation step raise, as a crash inside the engine loop would (fault-injection tests)."""
        self._fault = message

    # ------------------------------------------------------------------------------ generation thread

    def prepare_tensor_args(self, requests_in_batch, arg_storage: torch.Tensor) -> torch.Tensor:
        rows = []
        for future in requests_in_batch:
            state = future.state
            plan = self._plans.get(state.request_id)
            if plan is not None and plan.cached_tokens is None:
                # First step of this request: whatever precedes its query tokens came from the prefix cache.
                plan.cached_tokens = max(0, state.position_offset - future.query_length)
            if future.has_new_token:
                rows.append((plan, state.generated_tokens))
        self._rows = rows
        return arg_storage

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, logits_processor_args: torch.Tensor) -> torch.Tensor:
        if self._fault is not None:
            raise RuntimeError(self._fault)
        for row, (plan, generated) in enumerate(self._rows):
            if plan is None or plan.plain:
                continue
            token = self._pick(plan, scores[row], generated)
            scores[row].fill_(-math.inf)
            scores[row, token] = 0.0
        return scores

    @staticmethod
    def _pick(plan: SamplingPlan, logits: torch.Tensor, generated: list[int]) -> int:
        matcher = plan.matcher
        forced = plan.thinking.forced(generated) if plan.thinking is not None else None
        if forced is not None:
            # The thinking budget is spent: a newline, then the closing tag (which a grammar's thinking block accepts).
            if plan.top_logprobs is not None:
                plan.records.append(TokenRecord(forced, 0.0, [], []))
            if matcher is not None and not matcher.accept_token(forced):
                log.warning("the grammar refused the forced end of thinking %d", forced)
            return forced
        if matcher is not None and matcher.is_terminated() and plan.end_token is not None:
            # The grammar is complete and accepted its end: nothing but the end may follow.
            if plan.top_logprobs is not None:
                plan.records.append(TokenRecord(plan.end_token, 0.0, [], []))
            return plan.end_token
        raw = logits
        logits = logits.clone()
        if plan.bias_ids is not None:
            logits.index_add_(0, plan.bias_ids, plan.bias_values)
        if generated and (plan.frequency_penalty or plan.presence_penalty):
            ids = torch.tensor(generated, dtype=torch.long)
            counts = torch.bincount(ids, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
            logits -= plan.frequency_penalty * counts + plan.presence_penalty * (counts > 0).to(logits.dtype)
        if plan.prompt_ids is not None:
            seen = torch.cat([plan.prompt_ids, torch.tensor(generated, dtype=torch.long)]).unique()
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / plan.repetition_penalty, values * plan.repetition_penalty)
        if plan.end_ids is not None and len(generated) < plan.min_tokens:
            logits[plan.end_ids] = -math.inf
        if matcher is not None:
            matcher.fill_next_token_bitmask(plan.bitmask)
            xgr.apply_token_bitmask_inplace(logits.view(1, -1), plan.bitmask)
            if not torch.isfinite(logits.max()):
                # Bias or min_tokens banned every token the grammar allows (e.g. its end): the grammar wins.
                logits = raw.clone()
                xgr.apply_token_bitmask_inplace(logits.view(1, -1), plan.bitmask)

        if plan.greedy:
            token = int(torch.argmax(logits))
        else:
            token = _sample(plan, logits)

        if plan.top_logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1)
            top_ids: list[int] = []
            top_values: list[float] = []
            if plan.top_logprobs:
                values, ids = torch.topk(logprobs, plan.top_logprobs)
                top_ids, top_values = ids.tolist(), values.tolist()
            plan.records.append(TokenRecord(token, float(logprobs[token]), top_ids, top_values))
        if matcher is not None and not matcher.accept_token(token):
            log.warning("the grammar refused token %d, which its own bitmask allowed", token)
        return token


def _sample(plan: SamplingPlan, logits: torch.Tensor) -> int:
    logits = logits / plan.temperature
    if plan.top_k > 0 and plan.top_k < logits.numel():
        threshold = torch.topk(logits, plan.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if plan.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p (always at least the most likely token).
        drop_sorted = cumulative - sorted_probs >= plan.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop_sorted, 0.0))
    if plan.min_p > 0.0:
        probs = probs.masked_fill(probs < plan.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=plan.generator))
