"""What every engine reads from a Hugging Face model folder besides the weights: the name it is served under,
its sampling defaults, and the exact bytes of its tokens. No torch import, so every backend can share it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from service.domain import SamplingDefaults


def model_name(path: Path) -> str:
    name = path.name
    # The prepared default lives in a versioned folder ("SmolLM2-135M-Instruct-v1"); serve it by its own name.
    from service.engines.default_model import FORMAT, NAME

    return NAME if name == f"{NAME}-v{FORMAT}" else name


def sampling_defaults(generation_config: Any) -> SamplingDefaults:
    """The values the model's generation_config.json sets explicitly; OpenAI's defaults for the rest.

    `generation_config` is a transformers GenerationConfig."""
    explicit = generation_config.to_diff_dict()
    base = SamplingDefaults()
    return SamplingDefaults(
        temperature=float(explicit.get("temperature", base.temperature)),
        top_p=float(explicit.get("top_p", base.top_p)),
        top_k=int(explicit.get("top_k", base.top_k) or 0),
        min_p=float(explicit.get("min_p", base.min_p) or 0.0),
        repetition_penalty=float(explicit.get("repetition_penalty", base.repetition_penalty)),
        max_tokens=explicit.get("max_new_tokens"),
    )


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The exact bytes of one token. Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) spell bytes as
    printable characters; map them back, so a token holding half a character still gives its true bytes."""
    piece = tokenizer.convert_ids_to_tokens(token)
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token]).encode("utf-8")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 up.
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = byte_values[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


class HFCodec:
    """A Hugging Face tokenizer as the pipeline's `Codec` (service/engines/base.py), shared by every engine that
    serves a Hugging Face model folder: the same chat template, tokenization and detokenization everywhere."""

    def __init__(self, tokenizer: Any, tool_format: Any = None, chat_template: str | None = None) -> None:
        """`chat_template`: a Jinja chat template file to use instead of the model's own (--chat-template)."""
        from service.engines.prompt import PromptRenderer

        from service.engines.tool_calls import tool_format as named_format

        if chat_template:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        self.tokenizer = tokenizer
        if isinstance(tool_format, str):  # a --tool-parser name; auto reads the template
            tool_format = named_format(tool_format, self.template_text())
        self.renderer = PromptRenderer(tokenizer, tool_format)
        self._token_text: dict[int, tuple[str, bytes]] = {}

    def prompt_ids(self, input: Any, limit: int | None = None) -> list[int]:
        return self.renderer.token_ids(input, limit)

    def detokenizer(self, skip_special_tokens: bool, prompt_ids: list[int]):
        from service.engines.text import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens, prompt_ids).step

    def think_ids(self) -> tuple[int, int, int] | None:
        vocab = self.tokenizer.get_vocab()
        start, end = vocab.get("<think>"), vocab.get("</think>")
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        if start is None or end is None or len(newline) != 1:
            return None
        return start, end, newline[0]

    def template_text(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return "\n".join(template.values()) if isinstance(template, dict) else template

    def token_repr(self, token: int) -> tuple[str, bytes]:
        cached = self._token_text.get(token)
        if cached is None:
            raw = token_bytes(self.tokenizer, token)
            cached = (raw.decode("utf-8", errors="replace"), raw)
            self._token_text[token] = cached
        return cached


def eos_ids(generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The model's end tokens: its generation config's (often several, e.g. Qwen's <|im_end|> and <|endoftext|>)
    and the tokenizer's."""
    ids: list[int] = []
    for source in (generation_config.eos_token_id, tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)
