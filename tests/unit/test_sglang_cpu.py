"""How the service prepares SGLang for a machine without a GPU (service/engines/sglang_cpu.py): pure settings
from the CPU's flags, its memory and the model's config. The running engine is proven by the e2e suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.config import parse_args
from service.engines import sglang_cpu
from service.engines.sglang_cpu import CpuSetupError, cpu_dtype, cpu_flags, cpu_plan, kv_cache_tokens

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
GIB = 1 << 30


def plan(**overrides):
    settings = dict(
        model_config=SMOLLM2, dtype="auto", threads=None, kv_tokens=None, extra_args={},
        flags=frozenset({"avx512f", "avx512_bf16"}), available_bytes=20 * GIB, stand_in=True,
    )
    return cpu_plan(**{**settings, **overrides})


def test_flags_are_read_from_cpuinfo():
    cpuinfo = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu_flags("") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"), ({"avx512f", "avx2"}, "float32"), (set(), "float32")],
)
def test_auto_dtype_is_bf16_only_with_bf16_units(flags, expected):
    assert cpu_dtype("auto", flags) == expected
    assert cpu_dtype("float16", flags) == "float16"  # an explicit choice stands


def test_kv_budget_follows_memory_within_bounds():
    per_token = 2 * 30 * 3 * 64 * 2  # bf16 K and V over 30 layers of 3 KV heads of 64
    assert sglang_cpu.kv_bytes_per_token(SMOLLM2, "bfloat16") == per_token
    assert kv_cache_tokens(SMOLLM2, "bfloat16", 2 * GIB) == int(2 * GIB * 0.10) // per_token
    assert kv_cache_tokens(SMOLLM2, "bfloat16", 200 * GIB) == sglang_cpu.KV_MAX_TOKENS
    assert kv_cache_tokens(SMOLLM2, "float32", 100 * (1 << 20)) == sglang_cpu.KV_MIN_TOKENS


def test_plan_with_the_stand_in():
    p = plan(threads=1)
    assert p.kwargs == {
        "device": "cpu", "dtype": "bfloat16", "sleep_on_idle": True, "attention_backend": "torch_native",
        "max_total_tokens": sglang_cpu.KV_MAX_TOKENS,
    }
    assert p.env == {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}
    assert "stand-in" in p.describe() and "bfloat16" in p.describe()


def test_with_the_real_cpu_kernel_sglang_picks_its_attention_backend():
    p = plan(stand_in=False, kv_tokens=1000, dtype="float32")
    assert "attention_backend" not in p.kwargs
    assert (p.kwargs["max_total_tokens"], p.kwargs["dtype"]) == (1000, "float32")
    assert "sgl-kernel's CPU build" in p.describe()


def test_speculative_decoding_is_refused_with_the_stand_in_only():
    with pytest.raises(CpuSetupError, match="speculative_algorithm: speculative decoding needs sgl-kernel"):
        plan(extra_args={"speculative_algorithm": "EAGLE"})
    assert plan(extra_args={"speculative_algorithm": "EAGLE"}, stand_in=False).stand_in is False
    with pytest.raises(CpuSetupError, match="Arm"):
        plan(machine="aarch64")


def test_flags_reach_the_config():
    config = parse_args(["--threads", "3", "--kv-cache-tokens", "8192", "--device", "cpu",
                         "--sglang-arg", "enable_deterministic_inference=true", "--sglang-arg", "chunked-prefill-size=512",
                         "--sglang-arg", "attention_backend=torch_native"])
    assert (config.threads, config.kv_cache_tokens, config.device) == (3, 8192, "cpu")
    assert dict(config.sglang_args) == {
        "enable_deterministic_inference": True, "chunked_prefill_size": 512, "attention_backend": "torch_native",
    }


def test_the_stand_in_imports_and_names_itself_when_called():
    """In a child interpreter: the stand-in must import as `sgl_kernel`, answer exactly the names SGLang imports, and
    leave optional submodules missing (SGLang's quantization utils need `import sgl_kernel.scalar_type` to fail)."""
    code = (
        "import sgl_kernel, importlib\n"
        "assert sgl_kernel.STAND_IN\n"
        "from sgl_kernel import copy_all_layer_kv_cache_cpu, assign_req_to_token_pool_cpu, verify_tree_greedy_cpu\n"
        "from sgl_kernel.speculative import reconstruct_indices_from_tree_mask\n"
        "try:\n    import sgl_kernel.scalar_type\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('scalar_type imported')\n"
        "assert not hasattr(sgl_kernel, 'anything_else')\n"
        "try:\n    copy_all_layer_kv_cache_cpu(1)\nexcept sgl_kernel.KernelUnavailable as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(sglang_cpu.SHIM_DIR)},
                         capture_output=True, text=True, check=True).stdout
    assert "sgl_kernel.copy_all_layer_kv_cache_cpu was called" in out
