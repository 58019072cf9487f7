"""`python -m bench`: run targets side by side at several concurrency levels and write a table, a chart and JSON.

    python -m bench --targets gateway,grpc,inprocess --engine synthetic --concurrency 1,64
    python -m bench --targets gateway,peer --engine transformers --concurrency 1,8,32 --output-tokens 32

Targets are started here (service and gateway on ephemeral ports, `transformers serve` for the peer), warmed
up, then run in turn at each concurrency level, the order rotating every round so no target always goes
first. Results go to bench/results/<name>-<time>/ (results.json, results.md, chart.png, the processes' logs).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict
from pathlib import Path

from bench import load, machine, report, stack
from bench.stack import ALL_TARGETS, EngineSpec
from bench.workload import Dist, Work, Workload, WorkSource

RESULTS = Path(__file__).resolve().parent / "results"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=["synthetic", "transformers", "sglang"], default="synthetic",
                   help="synthetic: the benchmark-only engine (the stack's own cost); transformers: the real model on "
                   "the CPU; sglang: the real model on SGLang's engine (its own environment, CHATSERVE_SGLANG_PYTHON)")
    g.add_argument("--synthetic-tokens-per-s", type=float, default=50.0, help="per stream (0: no per-stream limit)")
    g.add_argument("--synthetic-total-tokens-per-s", type=float, default=0.0, help="shared by all streams (0: none)")
    g.add_argument("--synthetic-ttft", type=float, default=0.0, help="seconds before the first token")
    g.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", help="weights (auto, the service's default: bf16 where the CPU has bf16 units, else float32)")


def engine_spec(a: argparse.Namespace) -> EngineSpec:
    return EngineSpec(kind=a.engine, tokens_per_s=a.synthetic_tokens_per_s, total_tokens_per_s=a.synthetic_total_tokens_per_s,
                      ttft_s=a.synthetic_ttft, model=a.model, dtype=a.dtype)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--prompt-tokens", default="64", help="user message length: N or LO:HI (uniform)")
    g.add_argument("--output-tokens", default="32", help="max_tokens: N or LO:HI (uniform)")
    g.add_argument("--shared-prefix-tokens", type=int, default=0, help="system prompt length (0: none)")
    g.add_argument("--shared-prefix-ratio", type=float, default=0.0, help="share of requests with the shared system prompt")
    g.add_argument("--ignore-eos", action="store_true", help="run our stack's requests to max_tokens (the peer ignores it)")
    g.add_argument("--seed", type=int, default=0)


def workload(a: argparse.Namespace) -> Workload:
    return Workload(Dist.parse(a.prompt_tokens), Dist.parse(a.output_tokens), a.shared_prefix_tokens,
                    a.shared_prefix_ratio, a.ignore_eos, a.seed)


def out_dir(name: str) -> Path:
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def warm_up(target, source: WorkSource, requests: int = 2) -> None:
    """The first requests pay for connections, lazy initialisation (the peer builds its batching manager on
    its first request) and cold caches; none of that is measured."""
    for i in range(requests):
        work = source.next()
        if source.shared_prefix is not None and i == 0:
            work = Work(source.shared_prefix, work.user, 4, True, work.ignore_eos)
        result = await target.request(Work(work.system, work.user, min(work.max_tokens, 8), work.shared, work.ignore_eos))
        if result.error:
            raise RuntimeError(f"{target.name} failed its warm-up request: {result.error}")


async def benchmark(
    spec: EngineSpec,
    wl: Workload,
    targets: list[str],
    levels: list[int],
    duration_s: float,
    warmup_s: float,
    rounds: int,
    out: Path,
    title: str,
    log=print,
    quiet: float = 0.3,
    variant: str = "shipped",
    max_other: float = 0.25,
    retries: int = 2,
    duration_per_stream_s: float = 0.0,
) -> dict:
    """Run every target at every level; write results.json, results.md and chart.png into `out`."""
    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    log(f"engine: {spec.describe()}; workload: {wl.describe()}")
    from bench.variants import VARIANTS

    started = await stack.start(spec, targets, out / "logs", log=log, variant=VARIANTS[variant])
    summaries: list[load.Summary] = []
    try:
        for name, reason in started.skipped.items():
            log(f"skipping {name}: {reason}")
        names = [t for t in targets if t in started.targets]
        sources = {name: WorkSource(wl, salt=name) for name in names}
        for name in names:
            log(f"warming up {name}")
            await warm_up(started.targets[name], sources[name])
        for li, level in enumerate(levels):
            # Long enough at every level for several requests per stream (a slow model's requests last longer
            # when more of them share it).
            window = duration_s + duration_per_stream_s * level
            raws: dict[str, list[load.Raw]] = {name: [] for name in names}
            for r in range(rounds):
                shift = (r + li) % len(names)
                for name in names[shift:] + names[:shift]:
                    raw = await _measure(started.targets[name], sources[name], level, window, warmup_s, quiet,
                                         max_other, retries, log)
                    raws[name].append(raw)
                    one = load.summarize_rounds(name, level, [raw])
                    log(f"  {name:>9} c={level:<4} round {r + 1}/{rounds}: TTFT p50 {report._f(one.ttft_ms['p50'])} ms, "
                        f"p99 {report._f(one.ttft_ms['p99'])} ms, {one.tokens_per_s:,.0f} tokens/s, "
                        f"{one.requests} requests, {one.errors} errors")
            for name in names:
                summaries.append(load.summarize_rounds(name, level, raws[name]))
    finally:
        await started.close()
    m["busy_after"] = round(machine.busy_fraction(), 3)
    payload = {
        "title": title,
        "machine": m,
        "engine": asdict(spec),
        "engine_description": spec.describe(),
        "variant": variant,
        "workload": {**asdict(wl), "prompt_tokens": str(wl.prompt_tokens), "output_tokens": str(wl.output_tokens)},
        "workload_description": wl.describe(),
        "duration_s": duration_s,
        "duration_per_stream_s": duration_per_stream_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
        "startup_s": started.startup_s,
        "skipped": started.skipped,
        "summaries": [s.as_dict() for s in summaries],
    }
    report.write_json(out / "results.json", payload)
    md = render(payload, summaries)
    (out / "results.md").write_text(md)
    if summaries:
        report.chart(summaries, out / "chart.png", f"{title}\n{spec.describe()}; {wl.describe()}")
    log(md)
    log(f"wrote {out}/results.json, results.md, chart.png")
    return payload


async def _measure(target, source, level, duration_s, warmup_s, quiet, max_other, retries, log) -> load.Raw:
    """One run; repeated (up to `retries` times) when other work on the machine took more than `max_other`
    cores meanwhile. The cleanest attempt is kept, and its 'other' CPU is reported with it."""
    best = None
    for attempt in range(retries + 1):
        if quiet < 1:
            await asyncio.to_thread(machine.wait_quiet, quiet, 60.0, log)
        raw = await load.run(target, source, level, duration_s, warmup_s)
        other = raw.cpu_s.get("other", 0.0) / raw.wall_s
        if best is None or other < best.cpu_s.get("other", 0.0) / best.wall_s:
            best = raw
        if other <= max_other:
            break
        if attempt < retries:
            log(f"  other work used {other:.2f} cores during {target.name} c={level}: measuring again")
    return best


def render(payload: dict, summaries: list[load.Summary]) -> str:
    m = payload["machine"]
    lines = [
        f"### {payload['title']}",
        "",
        f"Machine: {machine.one_line(m)}; busy after {m.get('busy_after', 0):.0%}.  ",
        *([f"Variant: {payload['variant']}.  "] if payload.get("variant", "shipped") != "shipped" else []),
        f"Engine: {payload['engine_description']}. Workload: {payload['workload_description']}. "
        f"{payload['rounds']} round(s) of {payload['duration_s']:g} s"
        f"{' + %g s per stream' % payload['duration_per_stream_s'] if payload.get('duration_per_stream_s') else ''} "
        f"per target and level (after {payload['warmup_s']:g} s warm-up).",
        "",
        report.table(summaries),
    ]
    if any(s.target == "inprocess" for s in summaries) and len({s.target for s in summaries}) > 1:
        lines += ["What the transport adds to the in-process engine:", "", report.overhead_table(summaries)]
    if any(s.ttft_shared_p50_ms is not None and s.ttft_cold_p50_ms is not None for s in summaries):
        lines += ["| target | conc. | TTFT p50 shared prefix (ms) | TTFT p50 cold (ms) |", "|---|---:|---:|---:|"]
        for s in summaries:
            lines.append(f"| {s.target} | {s.concurrency} | {report._f(s.ttft_shared_p50_ms)} | {report._f(s.ttft_cold_p50_ms)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="gateway,grpc,inprocess", help=f"comma-separated, of {', '.join(ALL_TARGETS)}")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrent streams")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per target, level and round")
    p.add_argument("--duration-per-stream", type=float, default=0.0,
                   help="seconds added to the window per concurrent stream (for slow models at high concurrency)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="unmeasured seconds before each window (0: the first requests are measured too)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the targets per level")
    p.add_argument("--name", default="bench", help="results folder prefix")
    p.add_argument("--title", default="chatserve benchmark")
    p.add_argument("--variant", default="shipped", help="how the processes are started (bench/variants.py)")
    p.add_argument("--max-other", type=float, default=0.25,
                   help="repeat a run when other work used more CPU cores than this meanwhile")
    p.add_argument("--retries", type=int, default=2, help="how often a disturbed run is repeated")
    p.add_argument("--quiet-threshold", type=float, default=0.3,
                   help="before each run, wait up to 60 s until the machine is less busy than this (1: never wait)")
    add_engine_args(p)
    add_workload_args(p)
    a = p.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    levels = [int(c) for c in a.concurrency.split(",")]
    asyncio.run(benchmark(engine_spec(a), workload(a), targets, levels, a.duration, a.warmup, a.rounds,
                          out_dir(a.name), a.title, quiet=a.quiet_threshold, variant=a.variant,
                          max_other=a.max_other, retries=a.retries, duration_per_stream_s=a.duration_per_stream))


if __name__ == "__main__":
    main()
