"""`python -m bench.profile`: where the gateway's and the service's CPU goes at the stack's ceiling.

Starts the synthetic engine at `--rate` tokens/s shared by `--streams` streams, holds that load through the
gateway, and samples both processes with py-spy (`record --nonblocking`, so the processes are never paused)
while the load runs. Writes each process's raw stacks (collapsed format: feed them to flamegraph.pl or
speedscope) and a summary: the functions with the most samples of their own (self), the most samples
under them (total), and self time by library.

    python -m bench.profile --rate 20000 --streams 256 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from bench import load, machine, report, stack
from bench.__main__ import out_dir, warm_up
from bench.stack import EngineSpec
from bench.workload import Dist, Workload, WorkSource

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    if found.exists():
        return str(found)
    path = shutil.which("py-spy")
    if path is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    return path


def _library(path: str) -> str:
    if "site-packages/" in path:
        rest = path.split("site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    match = re.search(r"/lib/python3\.\d+/(.*)", path)
    if match:
        return match.group(1).split("/", 1)[0].removesuffix(".py")
    parts = Path(path).parts
    for project in ("gateway", "service", "common", "generate", "bench"):
        if project in parts:
            return project
    return path if path.startswith("<") else Path(path).name


def _frame(frame: str) -> tuple[str, str]:
    """('function (library: file.py)', library) of one collapsed frame."""
    match = _FRAME.match(frame)
    if not match:
        return frame, "?"
    path = match.group("path")
    library = _library(path)
    return f"{match.group('func')} ({library}: {Path(path).name})", library


def summarize(raw: str, top: int = 15) -> dict:
    own: Counter = Counter()
    under: Counter = Counter()
    libraries: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = [f for f in stack_text.split(";") if f]
        # With --threads the first frame names the thread: 'thread (0x7f...)' or 'process 123:"name"'.
        if parts and (parts[0].startswith("thread (") or parts[0].startswith("process ")):
            thread = parts.pop(0)
        else:
            thread = "?"
        frames = [_frame(f) for f in parts]
        if not frames:
            continue
        total += count
        threads["main" if any("run_forever" in f or "uvloop" in lib for f, lib in frames) else thread] += count
        name, library = frames[-1]
        own[name] += count
        libraries[library] += count
        for seen in {f for f, _ in frames}:
            under[seen] += count
    return {
        "samples": total,
        "self": [(k, v / total) for k, v in own.most_common(top)] if total else [],
        "total": [(k, v / total) for k, v in under.most_common(top)] if total else [],
        "libraries": [(k, v / total) for k, v in libraries.most_common(top)] if total else [],
        "threads": dict(threads),
    }


async def _record(pid: int, seconds: float, rate: int, output: Path, native: bool) -> str:
    args = [py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
            "--format", "raw", "--output", str(output), "--full-filenames", "--threads"]
    # Native frames need the process paused for each sample (py-spy's rule); Python-only sampling never pauses it.
    args.append("--native" if native else "--nonblocking")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def _dump(pid: int) -> str:
    proc = await asyncio.create_subprocess_exec(py_spy(), "dump", "--pid", str(pid), "--nonblocking",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def profile(rate: float, streams: int, seconds: float, sample_rate: int, native: bool, out: Path, log=print) -> dict:
    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    spec = EngineSpec(kind="synthetic", tokens_per_s=0.0, total_tokens_per_s=rate)
    output_tokens = max(16, round(rate / streams * 2))
    wl = Workload(prompt_tokens=Dist(64, 64), output_tokens=Dist(output_tokens, output_tokens))
    started = await stack.start(spec, ["gateway"], out / "logs", log=log)
    pids = {"gateway": started.gateway.proc.pid, "service": started.service.proc.pid}
    try:
        target = started.targets["gateway"]
        source = WorkSource(wl, salt="profile")
        await warm_up(target, source, requests=1)
        await asyncio.to_thread(machine.wait_quiet, 0.3, 60.0, log)
        warmup = 3.0
        load_task = asyncio.create_task(load.run(target, source, streams, seconds + 2, warmup))
        await asyncio.sleep(warmup + 1)
        log(f"recording {', '.join(pids)} for {seconds:g} s at {sample_rate} Hz under {rate:,.0f} tokens/s, {streams} streams")
        t = time.perf_counter()
        records = await asyncio.gather(
            *(_record(pid, seconds, sample_rate, out / f"{name}.raw.txt", native) for name, pid in pids.items())
        )
        dumps = await asyncio.gather(*(_dump(pid) for pid in pids.values()))
        log(f"recorded in {time.perf_counter() - t:.1f} s")
        raw = await load_task
    finally:
        await started.close()
    s = load.summarize_rounds("gateway", streams, [raw])
    result = {"machine": m, "rate": rate, "streams": streams, "seconds": seconds, "sample_rate": sample_rate,
              "native": native, "delivered_tokens_per_s": s.tokens_per_s, "tokens_per_message": s.tokens_per_message,
              "cpu_cores": s.cpu_cores, "processes": {}}
    for (name, _), record, dump in zip(pids.items(), records, dumps):
        (out / f"{name}.dump.txt").write_text(dump)
        path = out / f"{name}.raw.txt"
        text = path.read_text() if path.exists() else ""
        summary = summarize(text)
        summary["possible_samples"] = int(seconds * sample_rate)
        summary["py_spy"] = record.strip().splitlines()[-3:]
        result["processes"][name] = summary
    report.write_json(out / "profile.json", result)
    md = render(result)
    (out / "profile.md").write_text(md)
    log(md)
    return result


def render(r: dict) -> str:
    lines = [
        f"### Profile at {r['rate']:,.0f} tokens/s across {r['streams']} streams (synthetic engine, through the gateway)",
        "",
        f"Machine: {machine.one_line(r['machine'])}. py-spy {r['sample_rate']} Hz for {r['seconds']:g} s"
        f"{' with native frames' if r['native'] else ''}; delivered {r['delivered_tokens_per_s']:,.0f} tokens/s, "
        f"{r['tokens_per_message'] or 0:.2f} tokens per SSE message; CPU cores: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items()) + ".",
        "",
    ]
    for name, p in r["processes"].items():
        main_busy = p["threads"].get("main", 0) / p["possible_samples"] if p["possible_samples"] else 0
        others = p["samples"] - p["threads"].get("main", 0)
        lines += [f"#### {name}: {p['samples']} samples; the event-loop thread was busy {main_busy:.0%} of the time, "
                  f"other threads gave {others} samples", ""]
        for title, key in (("self", "self"), ("total (inclusive)", "total"), ("self by library", "libraries")):
            lines += [f"| {title} | share |", "|---|---:|"]
            lines += [f"| `{k}` | {v:.1%} |" for k, v in p[key]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=20000.0, help="tokens/s produced, shared by all streams")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--sample-rate", type=int, default=100)
    p.add_argument("--native", action="store_true",
                   help="include C/Cython frames (grpc's cygrpc, uvloop); pauses the processes for each sample")
    a = p.parse_args(argv)
    asyncio.run(profile(a.rate, a.streams, a.seconds, a.sample_rate, a.native, out_dir("profile")))


if __name__ == "__main__":
    main()
