"""Stand-in for `sgl_kernel.speculative` (see the package docstring): imported by SGLang's tree
reconstruction for speculative decoding, which the service refuses on CPU."""

from sgl_kernel import _unavailable

reconstruct_indices_from_tree_mask = _unavailable("speculative.reconstruct_indices_from_tree_mask")
