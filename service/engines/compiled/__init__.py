"""The transformers engine's compiled runner: a decoder compiled as one graph, with its own continuous batching.

decoder.py (the graph), attention.py (the paged attention op outside it), blocks.py (KV pages and the prefix
cache), runner.py (scheduling and the model step on its own thread), precision.py (the weight format for this CPU),
engine.py (the `Backend`). Architectures it runs: SUPPORTED; others use transformers' own loop.
"""

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
