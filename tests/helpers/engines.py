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
    # float32 on both engines: the suite compares greedy answers between calls, and in bfloat16 (or with int8
    # weights) a prompt served partly from the prefix cache runs a different batch shape, which can tip a greedy
    # choice of this 135M model (seen on SGLang: "Paris" on one call, "L'Étoile, ..." on another). The measured
    # formats are tested in tests/unit/test_sglang_cpu.py, tests/integration/test_int8_quality.py and
    # tests/integration/test_compiled_engine.py, and measured by make bench.
    return ["--engine", engine, "--dtype", "float32"]
