"""`python -m bench.startup`: how long until each process can serve, with the model already prepared.

For the service: spawn → gRPC health check SERVING (the engine loaded and warmed up), and → first token of a
first request. For the gateway: spawn → /livez. For the peer: spawn → /health, and → first token (it builds
its batching manager lazily, on the first request). Each is started `--repeat` times; the median is reported.

    python -m bench.startup --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench import machine, procs, report
from bench.__main__ import out_dir
from bench.stack import EngineSpec
from bench.targets import GrpcTarget, SseTarget
from bench.workload import Work

FIRST = Work(None, "Say hello.", 4, False, False)


async def _first_token(target) -> float:
    await target.open()
    try:
        started = time.monotonic()
        result = await target.request(FIRST)
        if result.error:
            raise RuntimeError(result.error)
        return time.monotonic() - started
    finally:
        await target.close()


async def service_once(spec: EngineSpec, workdir: Path) -> dict:
    service = procs.start_service(workdir, spec.service_args())
    try:
        serving = service.ready_s
        first = await _first_token(GrpcTarget(service.target, "", {}))
        gateway = procs.start_gateway(workdir, service.target, "sk-bench-startup")
        gateway.proc.stop()
        return {"service_serving_s": serving, "service_first_token_after_serving_s": first, "gateway_live_s": gateway.ready_s}
    finally:
        service.proc.stop()


async def peer_once(spec: EngineSpec, workdir: Path) -> dict:
    from service.engines.cpu_features import cpu_dtype, cpu_flags

    peer = procs.start_peer(workdir, spec.model_path(), cpu_dtype(spec.dtype, cpu_flags()), spec.page_size,
                            spec.kv_cache_tokens, spec.max_batch_tokens)
    try:
        first = await _first_token(SseTarget("peer", peer.base_url, peer.model, None, False, False, {}))
        return {"peer_health_s": peer.ready_s, "peer_first_token_after_health_s": first}
    finally:
        peer.proc.stop()


async def startup(repeat: int, with_peer: bool, out: Path, log=print, quiet: float = 0.3) -> dict:
    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    spec = EngineSpec(kind="transformers")
    spec.model_path()  # prepare the model first: start-up is measured with the model already prepared
    runs: dict[str, list[float]] = {}
    for i in range(repeat):
        jobs = [("transformers", lambda: service_once(spec, out / "logs")),
                ("synthetic", lambda: service_once(EngineSpec(kind="synthetic"), out / "logs"))]
        if with_peer:
            jobs.append(("peer", lambda: peer_once(spec, out / "logs")))
        for label, job in jobs:
            if quiet < 1:
                await asyncio.to_thread(machine.wait_quiet, quiet, 60.0, log)
            values = await job()
            for key, value in values.items():
                name = key if label == "peer" else f"{label}: {key}"
                runs.setdefault(name, []).append(value)
            log(f"  run {i + 1}/{repeat} {label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in values.items()))
    payload = {"machine": m, "repeat": repeat, "runs": runs,
               "median": {k: statistics.median(v) for k, v in runs.items()}}
    report.write_json(out / "startup.json", payload)
    md = render(payload)
    (out / "startup.md").write_text(md)
    log(md)
    return payload


def render(payload: dict) -> str:
    lines = [
        "### Start-up (model already prepared)",
        "",
        f"Machine: {machine.one_line(payload['machine'])}. {payload['repeat']} starts each.",
        "",
        "| what | median (s) | all runs (s) |",
        "|---|---:|---|",
    ]
    for key, values in payload["runs"].items():
        lines.append(f"| {key} | {payload['median'][key]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    p.add_argument("--quiet-threshold", type=float, default=0.3)
    a = p.parse_args(argv)
    asyncio.run(startup(a.repeat, not a.no_peer, out_dir("startup"), quiet=a.quiet_threshold))


if __name__ == "__main__":
    main()
