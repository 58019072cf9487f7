"""What the CPU can do fast, read from /proc/cpuinfo: the CPU engines choose their weight dtype from it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_bf16_units(flags: Iterable[str]) -> bool:
    """bfloat16 matmuls are fast only with AVX-512 BF16 or AMX; elsewhere they are emulated and slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def cpu_dtype(requested: str, flags: Iterable[str]) -> str:
    """The weight dtype on this CPU for `auto`: bfloat16 where the CPU has bf16 units, else float32. (SGLang's own
    `auto` turns a float32 checkpoint into float16, whose CPU matmuls made prefill 5-6x slower; with transformers,
    bf16 doubled one stream's speed on an AMD EPYC with avx512_bf16.)"""
    if requested != "auto":
        return requested
    return "bfloat16" if has_bf16_units(flags) else "float32"
