"""The machine a benchmark ran on, and how busy it was: numbers from a 2-core machine mean little without it."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from bench.procs import ROOT

PACKAGES = ("grpcio", "protobuf", "aiohttp", "uvloop", "transformers", "torch", "fastapi", "uvicorn")


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy all CPUs were over `seconds` (0..1), from /proc/stat: what else competes with the run."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    total = total1 - total0
    return 0.0 if total <= 0 else 1 - (idle1 - idle0) / total


def cpu_totals() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all CPUs together."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    clk = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # guest time is already inside user time
    return (total - fields[3] - fields[4]) / clk, total / clk


def wait_quiet(threshold: float = 0.25, timeout_s: float = 180.0, log=print) -> float:
    """Wait (up to `timeout_s`) until the machine is less than `threshold` busy, so another job's load does
    not land in a measurement; returns the last busy fraction seen (reported with the results)."""
    deadline = time.monotonic() + timeout_s
    busy = busy_fraction(0.5)
    warned = False
    while busy > threshold and time.monotonic() < deadline:
        if not warned:
            log(f"the machine is {busy:.0%} busy with other work; waiting up to {timeout_s:.0f} s for it to calm down")
            warned = True
        busy = busy_fraction(1.0)
    if busy > threshold:
        log(f"still {busy:.0%} busy: measuring anyway (see 'other' in the CPU column)")
    return busy


def describe() -> dict:
    cpu_model = ""
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not cpu_model:
            cpu_model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    if not commit and (ROOT / ".commit").exists():
        # A snapshot made with `git archive` (to measure committed code while others edit the checkout).
        commit, dirty = (ROOT / ".commit").read_text().strip() + " (snapshot)", False
    gpu = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "avx512": " avx512f" in flags,
        "memory_gib": round(mem_kb / 2**20, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "packages": versions,
        "commit": commit + ("+dirty" if dirty else ""),
        "load_average": os.getloadavg(),
        "busy_before": round(busy_fraction(), 3),
    }


def one_line(m: dict) -> str:
    gpu = m["gpu"] or "no GPU"
    return (
        f"{m['cpus']} CPUs ({m['cpu_model']}{', AVX-512' if m['avx512'] else ', no AVX-512'}), {m['memory_gib']} GiB, "
        f"{gpu}; {m['date']}; commit {m['commit']}; CPU busy before the run {m['busy_before']:.0%}, "
        f"load average {m['load_average'][0]:.2f}"
    )
