"""Which engines the e2e suite runs against, and the Python environment each one's service runs in.

`make test` sets CHATSERVE_TEST_ENGINES=transformers,sglang: the same e2e tests then run once per engine. The
SGLang engine runs in its own environment (sglang pins a torch and transformers of its own), named by
CHATSERVE_SGLANG_PYTHON; the tests themselves and the gateway run in the main one.
"""

from __future__ import annotations

import os

from common.procs import engine_python

ENGINES = [e.strip() for e in os.environ.get("CHATSERVE_TEST_ENGINES", "transformers").split(",") if e.strip()]


def python_for(engine: str) -> str:
    """The interpreter that runs this engine's service; a missing sglang environment fails, it never skips."""
    return engine_python(engine)


def service_args(engine: str) -> list[str]:
    if engine == "sglang":
        # float32, as the transformers engine: the suite compares greedy answers between calls, and in bfloat16 a
        # prompt served partly from RadixAttention's cache can tip a greedy choice of this 135M model (seen: "Paris"
        # on one call, "L'Étoile, ..." on another). The bfloat16 choice itself is tested in tests/unit/test_sglang_cpu.py
        # and measured by make bench.
        return ["--engine", engine, "--dtype", "float32"]
    return ["--engine", engine]
