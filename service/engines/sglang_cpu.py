"""What SGLang needs to serve on a machine without a GPU: the settings, the environment of its processes, and
the kernel path.

SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`, `device="cpu"`) runs a dense model with plain PyTorch: the
`torch_native` attention backend and each layer's `forward_native`. What it lacks on PyPI is sgl-kernel's CPU
build (only CUDA wheels are published), yet it imports a few of that build's names at start-up. Where the real
CPU build is missing, the service puts its own import-only stand-in (`cpu_kernel_shim/sgl_kernel`) first on
the module path of every SGLang process; its functions raise if ever called, and the settings that would call
them (speculative decoding) are refused here. With the real CPU build installed, SGLang picks its own kernels
(the AMX attention backend where the CPU has AMX) and none of the stand-in applies.

The functions here are pure (flags, memory and the model's config in, settings out) except `cpu_plan`'s
probe for the real kernel and `apply`, which changes this process's environment before SGLang starts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engines.cpu_features import cpu_dtype, cpu_flags, has_bf16_units  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

SHIM_DIR = Path(__file__).resolve().parent / "cpu_kernel_shim"
# The share of the memory available at start that the KV cache may take by default, and its bounds in tokens:
# a CPU serves a few dozen streams at most, so more cache mostly holds memory the other processes need.
KV_MEMORY_SHARE = 0.10
KV_MIN_TOKENS = 4096
KV_MAX_TOKENS = 65536
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# ServerArgs fields that reach sgl-kernel's CPU kernels (speculative decoding), refused with the stand-in.
_NEEDS_REAL_KERNEL_PREFIXES = ("speculative_", "enable_multi_layer_eagle")


class CpuSetupError(ValueError):
    """A setting SGLang cannot honour on this CPU machine; the message says which and why."""


@dataclass(frozen=True)
class CpuPlan:
    """How SGLang runs on this CPU: extra ServerArgs, the environment its processes need, and what to log."""

    kwargs: dict[str, Any]
    env: dict[str, str]
    stand_in: bool  # True: chatserve's import-only sgl_kernel; False: sgl-kernel's own CPU build
    flags: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        kernel = "chatserve's import-only sgl_kernel stand-in" if self.stand_in else "sgl-kernel's CPU build"
        bf16 = sorted(self.flags & {"avx512_bf16", "amx_bf16"}) or ["none"]
        return (
            f"sglang on CPU: kernels: {kernel}; attention: {self.kwargs.get('attention_backend', 'sglang default')}; "
            f"dtype {self.kwargs['dtype']} (bf16 units: {', '.join(bf16)}); {self.env['OMP_NUM_THREADS']} threads; "
            f"KV cache {self.kwargs['max_total_tokens']} tokens"
        )


def kv_bytes_per_token(model_config: Mapping[str, Any], dtype: str) -> int:
    """Bytes of K and V per token over all layers, from the model's config.json."""
    text = model_config.get("text_config") or model_config
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def kv_cache_tokens(model_config: Mapping[str, Any], dtype: str, available_bytes: int) -> int:
    """The KV cache size when none is configured: KV_MEMORY_SHARE of the memory available, within bounds."""
    tokens = int(available_bytes * KV_MEMORY_SHARE) // kv_bytes_per_token(model_config, dtype)
    return max(KV_MIN_TOKENS, min(KV_MAX_TOKENS, tokens))


def default_threads() -> int:
    """One compute thread per core this process may run on (what torch picks, but cgroup- and affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def real_kernel_installed(python: str = sys.executable) -> bool:
    """Whether sgl-kernel's CPU build is importable: it registers `torch.ops.sgl_kernel.convert_weight_packed`.

    Asked in a child interpreter: importing the CUDA wheel on a machine without CUDA fails half-way and would
    leave this process's torch with a half-registered op namespace.
    """
    probe = (
        "import sys, torch\n"
        "try:\n    import sgl_kernel\nexcept Exception:\n    sys.exit(1)\n"
        "sys.exit(0 if hasattr(torch.ops.sgl_kernel, 'convert_weight_packed') else 1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        return subprocess.run([python, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cpu_plan(
    *,
    model_config: Mapping[str, Any],
    dtype: str,
    threads: int | None,
    kv_tokens: int | None,
    extra_args: Mapping[str, Any],
    flags: frozenset[str],
    available_bytes: int,
    stand_in: bool,
    machine: str = "x86_64",
) -> CpuPlan:
    """The ServerArgs and environment for SGLang on this CPU (pure: every input is an argument)."""
    if stand_in:
        refused = sorted(k for k in extra_args if k.startswith(_NEEDS_REAL_KERNEL_PREFIXES) and extra_args[k])
        if refused:
            raise CpuSetupError(
                f"{', '.join(refused)}: speculative decoding needs sgl-kernel's CPU build, which is not installed "
                "here (PyPI has only CUDA wheels of it); run without it, or install sgl-kernel built for CPU"
            )
        if machine in ("aarch64", "arm64"):
            raise CpuSetupError(
                "SGLang on an Arm CPU binds its threads with sgl-kernel's CPU build, which is not installed here; "
                "install sgl-kernel built for CPU, or use --engine transformers"
            )
    resolved_dtype = cpu_dtype(dtype, flags)
    kwargs: dict[str, Any] = {
        "device": "cpu",
        "dtype": resolved_dtype,
        # The idle scheduler otherwise polls its sockets in a busy loop, taking a whole core from the others.
        "sleep_on_idle": True,
        "max_total_tokens": kv_tokens or kv_cache_tokens(model_config, resolved_dtype, available_bytes),
    }
    if stand_in:
        # The one attention backend that needs no sgl-kernel op (SGLang picks it itself only without AMX).
        kwargs["attention_backend"] = "torch_native"
    env = {
        # Without it SGLang's scheduler takes the CUDA paths (and imports vllm for rotary embeddings).
        "SGLANG_USE_CPU_ENGINE": "1",
        # Read by torch in SGLang's scheduler process when it starts: its intra-op thread count.
        "OMP_NUM_THREADS": str(threads or default_threads()),
    }
    return CpuPlan(kwargs=kwargs, env=env, stand_in=stand_in, flags=flags)


def plan_for(config: Any, model_path: Path, extra_args: Mapping[str, Any]) -> CpuPlan:
    """`cpu_plan` for this machine: reads the CPU flags, the memory available and the model's config."""
    import platform

    import psutil

    model_config = json.loads((Path(model_path) / "config.json").read_text())
    return cpu_plan(
        model_config=model_config,
        dtype=config.dtype,
        threads=config.threads,
        kv_tokens=config.kv_cache_tokens,
        extra_args=extra_args,
        flags=cpu_flags(),
        available_bytes=psutil.virtual_memory().available,
        stand_in=not real_kernel_installed(),
        machine=platform.machine(),
    )


def apply(plan: CpuPlan) -> None:
    """Set the environment SGLang's processes inherit: they are spawned interpreters, so the stand-in must be on
    PYTHONPATH (a sys.modules entry in this process would not reach them) as well as on this process's path."""
    os.environ.update(plan.env)
    if plan.stand_in:
        shim = str(SHIM_DIR)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != shim]
        os.environ["PYTHONPATH"] = os.pathsep.join([shim, *paths])
        if shim not in sys.path:
            sys.path.insert(0, shim)
