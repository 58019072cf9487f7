"""The thinking budget (service/engines/reasoning.py's ThinkingBudget) as an SGLang custom logit processor, so the
SGLang engine closes a model's thinking by the same rule as the transformers engine.

Imported only where sglang is installed: SGLang's scheduler loads the class by reference (dill) from this module,
which the service's environment puts on its path. The budget and the tag ids travel in each request's custom_params.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from service.engines.reasoning import ThinkingBudget


class ThinkingBudgetProcessor(CustomLogitProcessor):
    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]] | None) -> Any:
        for row, params in enumerate(custom_param_list or ()):
            budget = (params or {}).get("chatserve_thinking")
            if budget is None:
                continue
            forced = ThinkingBudget(**budget).forced(list(params["__req__"].output_ids))
            if forced is not None:
                logits[row, :] = -float("inf")
                logits[row, forced] = 0.0
        return logits
