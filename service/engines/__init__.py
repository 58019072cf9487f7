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


def choose_runner(config: ServiceConfig) -> str:
    """`auto` means the compiled runner when the model's architecture is one it knows (read from config.json)."""
    if config.runner != "auto":
        return config.runner
    import json
    from pathlib import Path

    from service.engines.compiled import SUPPORTED
    from service.engines.default_model import ensure_default_model

    path = Path(config.model) if config.model else ensure_default_model()
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    if architectures and architectures[0] in SUPPORTED:
        return "compiled"
    log.info("the compiled runner does not know %s: using transformers' continuous batching", architectures or path)
    return "transformers"


def create_engine(config: ServiceConfig) -> Backend:
    kind = choose_engine(config.engine)
    if kind == "transformers":
        if choose_runner(config) == "compiled":
            from service.engines.compiled.engine import CompiledEngine

            return CompiledEngine(config)
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
