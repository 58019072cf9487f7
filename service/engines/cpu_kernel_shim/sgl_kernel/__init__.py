"""An import-only stand-in for `sgl_kernel`, put first on the module path of SGLang's processes on a CPU
machine where sgl-kernel's CPU build is not installed (PyPI carries only CUDA wheels of it).

SGLang's CPU path imports the names below at start-up, but for a dense model without speculative decoding
it never calls them: the attention backend is `torch_native` and every layer runs its `forward_native`.
Each name here therefore raises, naming itself, if it is ever called; the service refuses the settings that
would reach them (speculative decoding). Nothing else is defined: SGLang probes for optional parts
(`import sgl_kernel.scalar_type`, `torch.ops.sgl_kernel.convert_weight_packed` for the AMX backend) and must
find them missing, so there is no catch-all attribute hook.

Loaded by service/engines/sglang_cpu.py; see that module for when and why.
"""

STAND_IN = True  # how the service tells this module from the real sgl-kernel


class KernelUnavailable(RuntimeError):
    """A kernel of sgl-kernel's CPU build was called, but only this import-only stand-in is installed."""


def _unavailable(name: str):
    def kernel(*args, **kwargs):
        raise KernelUnavailable(
            f"sgl_kernel.{name} was called, but this process runs chatserve's import-only stand-in for "
            "sgl-kernel's CPU build; install sgl-kernel built for CPU to use the feature that needs it"
        )

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


# KV cache moves and request slots (imported by every CPU start).
copy_all_layer_kv_cache_cpu = _unavailable("copy_all_layer_kv_cache_cpu")
assign_req_to_token_pool_cpu = _unavailable("assign_req_to_token_pool_cpu")
# Speculative decoding (refused on CPU without the real kernels).
fill_accept_out_cache_loc_cpu = _unavailable("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _unavailable("fill_bonus_tokens_cpu")
assign_draft_cache_locs_contiguous_cpu = _unavailable("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _unavailable("assign_extend_cache_locs_cpu")
build_tree_kernel_efficient_cpu = _unavailable("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _unavailable("verify_tree_greedy_cpu")
rotate_input_ids_cpu = _unavailable("rotate_input_ids_cpu")
