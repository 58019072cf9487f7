"""The weight format for this CPU, measured rather than guessed: float32, bfloat16, or bfloat16 with int8 weights.

CPU flags alone do not decide it. On an AMD EPYC with AVX2 only, SmolLM2 decoded faster in bfloat16 than in float32
(fewer bytes per step, though the math is converted); on a Xeon with AMX, PyTorch's bfloat16 matrix-vector kernel
streamed weights at half float32's rate and int8 weights were fastest. So with `--dtype auto` (and no
`--quantization`) the engine times a decode step of each candidate on the first layers of the real model, picks
the fastest, and remembers the answer for this CPU, model shape and torch version, so later starts skip the probe.
A format named on the command line is used as given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from service.engines.compiled.attention import BatchPlan, KVCache, SequenceSpan, batch_context
from service.engines.compiled.decoder import Decoder
from service.engines.default_model import cache_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bumped when the probe changes, so remembered answers are measured again.
PROBE_VERSION = 1
PROBE_LAYERS = 8
PROBE_CONTEXT = 256


@dataclass(frozen=True)
class Choice:
    dtype: str
    int8: bool
    reason: str


def choose(model: torch.nn.Module, dtype: str, quantization: str | None, flags: frozenset[str], path: Path) -> Choice:
    """The format to serve `model` (loaded in float32) in. `dtype`: auto or a name; `quantization`: None (measure),
    "none" or "int8"."""
    if quantization not in (None, "none", "int8"):
        raise ValueError(f"--quantization {quantization} is not one the transformers engine knows (int8, none)")
    dtypes = ["float32", "bfloat16"] if dtype == "auto" else [dtype]
    int8s = {None: [False, True], "none": [False], "int8": [True]}[quantization]
    candidates = [(d, q) for d in dtypes for q in int8s if not q or d == "bfloat16"]
    if not candidates:
        raise ValueError("int8 weights compute in bfloat16: use --dtype bfloat16 or auto with --quantization int8")
    if len(candidates) == 1:
        d, q = candidates[0]
        return Choice(d, q, "as configured")
    key = _key(model, flags, candidates)
    remembered = cache_dir() / "probe" / f"{key}.json"
    try:
        saved = json.loads(remembered.read_text())
        return Choice(saved["dtype"], saved["int8"], f"remembered for this CPU: {saved['reason']}")
    except (OSError, ValueError, KeyError):
        pass
    timings = {c: _time_step(model, *c) for c in candidates}
    best = min(timings, key=timings.get)
    reason = "measured " + ", ".join(
        f"{d}{'+int8' if q else ''} {t * 1e3:.1f} ms" for (d, q), t in sorted(timings.items(), key=lambda kv: kv[1]))
    reason += f" per step of {min(PROBE_LAYERS, len(model.model.layers))} layers"
    choice = Choice(best[0], best[1], reason)
    log.info("weight format for this CPU: %s%s (%s)", choice.dtype, " + int8" if choice.int8 else "", reason)
    try:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        remembered.write_text(json.dumps(asdict(choice)))
    except OSError as e:
        log.warning("could not remember the weight format probe: %s", e)
    return choice


def cache_folder(kind: str, path: Path, choice: Choice, torch_version: str) -> Path:
    """A folder under the cache for artifacts that depend on the model, its format, torch and the CPU."""
    model = path.resolve()
    stamp = "".join(str(p.stat().st_mtime_ns) for p in sorted(model.glob("*.safetensors"))) or str(model)
    flags = " ".join(sorted(_cpu_identity()))
    digest = hashlib.sha256(json.dumps([str(model), stamp, asdict(choice)["dtype"], choice.int8, torch_version,
                                        flags]).encode()).hexdigest()[:16]
    folder = cache_dir() / kind / f"{model.name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cpu_identity() -> set[str]:
    from service.engines.cpu_features import cpu_flags

    return {platform.machine(), _cpu_model(), *cpu_flags()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def _key(model: torch.nn.Module, flags: frozenset[str], candidates) -> str:
    config = model.config
    shape = [config.hidden_size, config.intermediate_size, config.num_attention_heads,
             getattr(config, "num_key_value_heads", 0), config.vocab_size]
    text = json.dumps([PROBE_VERSION, shape, sorted(flags), _cpu_model(), torch.__version__,
                       torch.get_num_threads(), [list(c) for c in candidates]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _time_step(model: torch.nn.Module, dtype: str, int8: bool, steps: int = 12) -> float:
    """Median time of one eager decode step over the model's first layers and its lm_head, in this format."""
    inner = model.model
    layers = inner.layers
    try:
        inner.layers = layers[:PROBE_LAYERS]
        decoder = Decoder(model, max_positions=PROBE_CONTEXT + steps + 1)
    finally:
        inner.layers = layers
    decoder.cast(DTYPES[dtype])
    if int8:
        decoder.quantize_int8()
    cache = KVCache(decoder.layers, PROBE_CONTEXT + steps + 1, decoder.kv_heads, decoder.head_dim, DTYPES[dtype])
    times = []
    with torch.inference_mode():
        for step in range(steps):
            position = PROBE_CONTEXT + step
            plan = BatchPlan(slots=torch.tensor([position]), singles=[SequenceSpan(0, 1, 0, position + 1, None)])
            started = time.perf_counter()
            with batch_context(cache, plan, decoder.scale):
                forward = decoder.forward_int8 if int8 else decoder.forward
                hidden = forward(torch.tensor([step]), torch.tensor([position]))
            decoder.logits(hidden)
            times.append(time.perf_counter() - started)
    return statistics.median(times[2:])
