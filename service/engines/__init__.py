"""Inference engines behind the service: one `Backend` protocol, one module per backend.

This package is the only place that imports torch, transformers or sglang, and it imports each lazily, so
the service starts without the packages of engines it does not run.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from service.engines.base import Backend, EngineStats

if TYPE_CHECKING:
    from service.config import ServiceConfig

__all__ = ["Backend", "EngineStats", "create_engine", "choose_engine"]

log = logging.getLogger(__name__)


def choose_engine(requested: str) -> str:
    """`auto` means SGLang when a CUDA GPU and the sglang package are both present, else transformers on CPU."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("sglang") is not None:
        import torch

        if torch.cuda.is_available():
            return "sglang"
        log.info("sglang is installed but no CUDA GPU is visible: using the transformers engine")
    return "transformers"


def create_engine(config: ServiceConfig) -> Backend:
    kind = choose_engine(config.engine)
    if kind == "transformers":
        from service.engines.transformers_engine import TransformersEngine

        return TransformersEngine(config)
    if kind == "sglang":
        from service.engines.sglang_engine import SGLangEngine

        return SGLangEngine(config)
    if kind == "synthetic":
        # Benchmarks only (never chosen by `auto`): placeholder tokens at a set rate, no model.
        from service.engines.synthetic import SyntheticEngine

        return SyntheticEngine(config)
    raise ValueError(f"unknown engine {kind!r}")
