"""`python -m bench.suite` (`make bench`): every scenario of the performance targets, one report.

1. overhead, synthetic engine: gateway / gRPC / in-process at 1 and 64 streams;
2. the real model (SmolLM2 on the CPU): gateway / in-process / `transformers serve` at 1, 8, 32 (and with
   `--with-64`, gateway / in-process at 64);
3. prefix caching: half the requests share a 1,000-token system prompt, half have a cold one of the same length;
   then scenarios 2 and 3 through SGLang's CPU engine, and both engines side by side in one table; then the
   product next to its peers (bench/peers.py: vLLM's CPU build, SGLang's server, transformers serve, SMG);
4. the ceiling: the synthetic engine at rising rates across 256 streams, and with 4 tokens per message;
5. start-up with the model prepared, and one huge prompt arriving during a stream (bench/stall.py).

Writes bench/results/suite-<time>/REPORT.md (the verdicts first, then every table) and each scenario's
JSON, table and chart beside it. `--quick` runs shorter windows and fewer levels (~6 minutes instead of ~14).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench import machine
from bench.__main__ import benchmark, out_dir
from bench.ceiling import ceiling
from bench.stack import EngineSpec
from bench.peers import OURS, combine, side_by_side
from bench.peers import SERVERS as PEER_SERVERS
from bench.peers import Cell as PeerCell
from bench.stall import stall
from bench.startup import startup
from bench.workload import Dist, Workload

OVERHEAD_P50_MS = 1.0
OVERHEAD_P99_MS = 3.0
CEILING_RATE = 20000
PREFIX_RATIO = 1 / 3
STARTUP_S = 15.0


async def suite(quick: bool, out, log=print, with_64: bool = False, skip_sglang: bool = False,
                skip_peers: bool = False) -> str:
    started = time.monotonic()
    sections: list[str] = []
    verdicts: list[str] = []
    q = quick

    # 1. What the transport adds, without model noise. Output lengths vary so that 64 streams do not all end
    # in the same engine step and arrive as one burst (that measures queueing, not per-request cost).
    synthetic = EngineSpec(kind="synthetic", tokens_per_s=50.0)
    over = await benchmark(
        synthetic, Workload(Dist(64, 64), Dist(16, 48)), ["gateway", "grpc", "inprocess"], [1, 64],
        duration_s=4 if q else 8, warmup_s=1, rounds=1 if q else 2, out=out / "overhead-synthetic",
        title="Overhead: synthetic engine, 50 tokens/s per stream", log=log,
    )
    sections.append((out / "overhead-synthetic" / "results.md").read_text())
    verdicts += _overhead_verdicts(over, "synthetic engine")

    # 2. The real model, ours against the peer. One wave of 32 requests lasts ~10 s on 2 cores, so the window
    # grows with concurrency to hold about three, and output lengths vary so the waves drift apart. The
    # window starts with the first wave (every target has had its warm-up requests already). The direct
    # gRPC target is left out here: on this model it measures the same as in-process (see bench/README.md).
    real = EngineSpec(kind="transformers")
    # Two rounds: at 32 streams the same target measured twice in a row differs by up to 20% on this machine.
    levels = [1, 8] if q else [1, 8, 32]
    model = await benchmark(
        real, Workload(Dist(64, 64), Dist(24, 40)), ["gateway", "inprocess", "peer"], levels,
        duration_s=6 if q else 10, warmup_s=0, rounds=1 if q else 2, out=out / "real-model",
        title="SmolLM2-135M-Instruct on the CPU: ours and transformers serve", log=log,
        duration_per_stream_s=0.3 if q else 0.45,
    )
    sections.append((out / "real-model" / "results.md").read_text())
    verdicts += _overhead_verdicts(model, "real model")
    verdicts += _peer_verdicts(model)
    if with_64:
        # The overhead target also names 64 streams; one wave of 64 takes ~20 s here (+2 min).
        model64 = await benchmark(
            real, Workload(Dist(64, 64), Dist(24, 40)), ["gateway", "inprocess"], [64],
            duration_s=40, warmup_s=0, rounds=1, out=out / "real-model-64",
            title="SmolLM2-135M-Instruct on the CPU, 64 streams: gateway vs in-process", log=log,
        )
        sections.append((out / "real-model-64" / "results.md").read_text())
        verdicts += _overhead_verdicts(model64, "real model")

    # 3. A shared 1,000-token system prompt against a cold one (one stream, so the two kinds never overlap).
    prefix_workload = Workload(Dist(32, 32), Dist(8, 8), shared_prefix_tokens=1000, shared_prefix_ratio=0.5)
    prefix = await benchmark(
        real, prefix_workload, ["gateway", "peer"], [1], duration_s=12 if q else 25, warmup_s=0, rounds=1,
        out=out / "prefix", title="Shared 1,000-token system prompt vs a cold one", log=log,
    )
    sections.append((out / "prefix" / "results.md").read_text())
    verdicts += _prefix_verdicts(prefix)

    # 3b. Our other engine, SGLang's CPU engine, through the same stack on the same workloads (its dtype from the
    # CPU's bf16 units), then both engines in one table.
    if not skip_sglang:
        sg = EngineSpec(kind="sglang", dtype="auto")
        sg_model = await benchmark(
            sg, Workload(Dist(64, 64), Dist(24, 40)), ["gateway"], levels, duration_s=6 if q else 10, warmup_s=0,
            rounds=1 if q else 2, out=out / "real-model-sglang", title="SmolLM2-135M-Instruct on SGLang's CPU engine",
            log=log, duration_per_stream_s=0.3 if q else 0.45,
        )
        sg_prefix = await benchmark(
            sg, prefix_workload, ["gateway"], [1], duration_s=12 if q else 25, warmup_s=0, rounds=1,
            out=out / "prefix-sglang", title="SGLang engine: shared 1,000-token system prompt vs a cold one", log=log,
        )
        sections.append(_engines_table(model, sg_model, prefix, sg_prefix, real.describe(), sg.describe()))

    # 3c. The product next to the servers a user would pick instead (bench/peers.py): vLLM's CPU build, SGLang's own
    # server, transformers serve and SGLang's Rust gateway SMG, one at a time, rounds in alternating order.
    if not skip_peers:
        peer_payload = await side_by_side(list(PEER_SERVERS), 1 if q else 2, q, out / "peers", log=log)
        sections.append((out / "peers" / "peers.md").read_text())
        verdicts += _side_by_side_verdicts(peer_payload)

    # 4. The stack's own ceiling, then the same rates with 4 tokens per message: what coalescing would save.
    rates = [5000, 20000] if q else [5000, 10000, 20000, 40000]
    ceil = await ceiling(rates, 256, ["gateway", "grpc"], duration_s=5 if q else 6, warmup_s=2, request_s=2.0,
                         out=out / "ceiling", log=log)
    sections.append((out / "ceiling" / "ceiling.md").read_text())
    verdicts += _ceiling_verdicts(ceil)
    await ceiling([20000, 40000], 256, ["gateway"], duration_s=5 if q else 6, warmup_s=2, request_s=2.0,
                              out=out / "ceiling-4-per-step", log=log, steps=[4])
    sections.append("With 4 tokens per step (per message), as a stream interval in the service would send them:\n\n"
                    + (out / "ceiling-4-per-step" / "ceiling.md").read_text())

    # 5b. One huge request during a stream: how long the stream's next token waits.
    stalled = await stall(out / "stall", log=log)
    sections.append((out / "stall" / "stall.md").read_text())
    for row in stalled["rows"]:
        verdicts.append(f"{_mark(row['ok'])} stall: a {row['chars']:,}-character prompt ({row['prompt']}) delayed a "
                        f"running stream's next chunk by {row['delay_ms']} ms (target ≤ {stalled['target_ms']:g} ms)")

    # 5. Start-up.
    up = await startup(1 if q else 3, True, out / "startup", log=log)
    sections.append((out / "startup" / "startup.md").read_text())
    serving = up["median"]["transformers: service_serving_s"]
    verdicts.append(f"{_mark(serving <= STARTUP_S)} start-up: the service answers SERVING {serving:.1f} s after it is "
                    f"started (target ≤ {STARTUP_S:g} s)")

    m = machine.describe()
    report = "\n".join([
        "# chatserve benchmark report",
        "",
        f"Machine: {machine.one_line(m)}. {'Quick mode. ' if q else ''}Took {(time.monotonic() - started) / 60:.1f} min.",
        "",
        "## Against the targets",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "## Tables",
        "",
        *sections,
        "Charts: overhead-synthetic/chart.png, real-model/chart.png, prefix/chart.png, ceiling/ceiling.png, "
        "ceiling-4-per-step/ceiling.png.",
        "",
    ])
    (out / "REPORT.md").write_text(report)
    log(report)
    log(f"wrote {out / 'REPORT.md'}")
    return report


def _engines_table(tf: dict, sg: dict, tf_prefix: dict, sg_prefix: dict, tf_name: str, sg_name: str) -> str:
    """Both engines through the gateway on the same workloads: TTFT p50/p99, ITL p50, tokens/s, and the ratio."""

    def cell(s: dict | None) -> str:
        if s is None or s["ttft_ms"]["p50"] is None:
            return "–"
        itl = s["itl_ms"]["p50"]
        return (f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f} ms, ITL {itl:.0f} ms, "
                f"{s['tokens_per_s']:.1f} tok/s" if itl is not None else f"{s['ttft_ms']['p50']:.0f} ms")

    a, b = _by(tf), _by(sg)
    rows = ["### Both engines through the gateway", "",
            f"transformers: {tf_name}; sglang: {sg_name}. Cells: TTFT p50 / p99, ITL p50, tokens/s.", "",
            "| scenario | transformers | sglang | sglang / transformers tokens/s |", "|---|---|---|---:|"]
    for conc in sorted({c for _, c in a} | {c for _, c in b}):
        x, y = a.get(("gateway", conc)), b.get(("gateway", conc))
        ratio = f"{y['tokens_per_s'] / x['tokens_per_s']:.2f}" if x and y and x["tokens_per_s"] else "–"
        rows.append(f"| {conc} stream(s) | {cell(x)} | {cell(y)} | {ratio} |")
    pa, pb = _by(tf_prefix).get(("gateway", 1)), _by(sg_prefix).get(("gateway", 1))

    def prefix_cell(s: dict | None) -> str:
        if s is None or s["ttft_shared_p50_ms"] is None or s["ttft_cold_p50_ms"] is None:
            return "–"
        return f"{s['ttft_shared_p50_ms']:.0f} ms shared vs {s['ttft_cold_p50_ms']:.0f} ms cold"

    rows.append(f"| shared 1,000-token prefix, 1 stream, TTFT p50 | {prefix_cell(pa)} | {prefix_cell(pb)} | |")
    return "\n".join(rows) + "\n"


def _side_by_side_verdicts(payload: dict) -> list[str]:
    """Per scenario: is the product's best engine at least as fast (tokens/s) as every peer?"""
    table = combine([PeerCell(**c) for c in payload["cells"]])
    out = []
    for scenario in dict.fromkeys(c["scenario"] for c in payload["cells"]):
        ours = [table[(o, scenario)]["tokens_per_s"] for o in OURS if (o, scenario) in table]
        peers = {p: table[(p, scenario)]["tokens_per_s"] for p in payload["servers"]
                 if p not in OURS and (p, scenario) in table}
        if not ours or not peers:
            continue
        best = max(ours)
        leader, fastest = max(peers.items(), key=lambda kv: kv[1])
        out.append(f"{_mark(best >= fastest)} peers, {scenario}: our best {best:.1f} tokens/s vs the fastest peer "
                   f"({leader}) {fastest:.1f} ({best / fastest:.2f}x)")
    return out


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _by(payload: dict) -> dict[tuple[str, int], dict]:
    return {(s["target"], s["concurrency"]): s for s in payload["summaries"]}


def _overhead_verdicts(payload: dict, label: str) -> list[str]:
    by = _by(payload)
    out = []
    for conc in sorted({c for _, c in by} & {1, 64}):  # the levels the target names
        base, gw = by.get(("inprocess", conc)), by.get(("gateway", conc))
        if base is None or gw is None or base["ttft_ms"]["p50"] is None or gw["ttft_ms"]["p50"] is None:
            continue
        d50 = gw["ttft_ms"]["p50"] - base["ttft_ms"]["p50"]
        d99 = gw["ttft_ms"]["p99"] - base["ttft_ms"]["p99"]
        ok = d50 <= OVERHEAD_P50_MS and d99 <= OVERHEAD_P99_MS
        out.append(f"{_mark(ok)} overhead, {label}, {conc} stream(s): gateway + gRPC add {d50:.2f} ms to TTFT p50 "
                   f"(target ≤ {OVERHEAD_P50_MS:g}) and {d99:.2f} ms to p99 (target ≤ {OVERHEAD_P99_MS:g}) over in-process")
    return out


def _peer_verdicts(payload: dict) -> list[str]:
    by = _by(payload)
    out = []
    for conc in sorted({c for _, c in by}):
        ours, peer = by.get(("gateway", conc)), by.get(("peer", conc))
        if ours is None or peer is None or not peer["tokens_per_s"] or ours["ttft_ms"]["p50"] is None or peer["ttft_ms"]["p50"] is None:
            continue
        out.append(
            f"peer, {conc} stream(s): our TTFT p50 {ours['ttft_ms']['p50']:.0f} ms vs transformers serve "
            f"{peer['ttft_ms']['p50']:.0f} ms; our throughput {ours['tokens_per_s']:.0f} vs {peer['tokens_per_s']:.0f} "
            f"tokens/s ({ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x)"
        )
    return out


def _prefix_verdicts(payload: dict) -> list[str]:
    out = []
    for s in payload["summaries"]:
        shared, cold = s["ttft_shared_p50_ms"], s["ttft_cold_p50_ms"]
        if shared is None or cold is None:
            continue
        ratio = shared / cold
        target = s["target"]
        mark = _mark(ratio <= PREFIX_RATIO) if target == "gateway" else "(peer)"
        out.append(f"{mark} prefix cache, {target}: TTFT p50 {shared:.0f} ms with the shared 1,000-token system "
                   f"prompt vs {cold:.0f} ms cold ({ratio:.2f}; target ≤ {PREFIX_RATIO:.2f})")
    return out


def _ceiling_verdicts(payload: dict) -> list[str]:
    out = []
    for row in payload["rows"]:
        if row["target"] == "gateway" and row["rate"] == CEILING_RATE:
            out.append(f"{_mark(row['sustained'])} ceiling: at {CEILING_RATE:,} tokens/s across {payload['streams']} "
                       f"streams the gateway delivered {row['delivered_ratio']:.1%} to its SSE clients (target ≥ 95%)")
    for name, rate in payload["largest_sustained"].items():
        out.append(f"ceiling: the largest rate {name} sustained of those tried: "
                   f"{'none' if rate is None else f'{rate:,.0f} tokens/s'}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter windows, fewer levels and rates")
    p.add_argument("--with-64", action="store_true", help="also the real model at 64 streams, gateway vs in-process")
    p.add_argument("--skip-sglang", action="store_true", help="leave out the SGLang engine (needs .venv-sglang)")
    p.add_argument("--skip-peers", action="store_true", help="leave out the side-by-side table (bench/peers.py)")
    a = p.parse_args(argv)
    asyncio.run(suite(a.quick, out_dir("suite-quick" if a.quick else "suite"), with_64=a.with_64,
                      skip_sglang=a.skip_sglang, skip_peers=a.skip_peers))


if __name__ == "__main__":
    main()
