"""`python -m bench.ceiling`: how many tokens per second the serving stack itself can deliver.

The synthetic engine produces a set number of tokens per second shared by all streams (no model), and the
load generator holds `--streams` streams open through a target. A rate is *sustained* when the clients
receive at least 95% of it. Because a stream that falls behind gets its tokens merged into fewer, larger
messages, delivery can keep up while latency suffers, so each row also shows tokens per message (how much
merging it took), TTFT, the gaps between messages, and each process's CPU use.

    python -m bench.ceiling --rates 5000,10000,20000,40000 --streams 256 --targets gateway,grpc
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench import load, machine, report, stack
from bench.__main__ import _measure, out_dir, warm_up
from bench.stack import EngineSpec
from bench.workload import Dist, Workload, WorkSource

SUSTAINED = 0.95


async def ceiling(rates: list[float], streams: int, targets: list[str], duration_s: float, warmup_s: float,
                  request_s: float, out: Path, log=print, quiet: float = 0.3, variants: list[str] | None = None,
                  steps: list[int] | None = None) -> dict:
    from bench.variants import VARIANTS

    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    rows = []
    variants = variants or ["shipped"]
    steps = steps or [1]
    for rate, variant, step in [(r, v, k) for r in rates for v in variants for k in steps]:
        # Every request lasts about `request_s` at its stream's share of the rate, so the window holds several
        # requests per stream at every rate (request set-up is part of the stack's cost too).
        output_tokens = max(16, round(rate / streams * request_s))
        wl = Workload(prompt_tokens=Dist(64, 64), output_tokens=Dist(output_tokens, output_tokens))
        spec = EngineSpec(kind="synthetic", tokens_per_s=0.0, total_tokens_per_s=rate, tokens_per_step=step)
        # A fresh service per rate: the rate is a start-up flag, and no run inherits another's backlog.
        started = await stack.start(spec, targets, out / "logs" / f"{rate:g}-{variant}-{step}", log=lambda *_: None,
                                    variant=VARIANTS[variant])
        try:
            for name in targets:
                target = started.targets[name]
                source = WorkSource(wl, salt=name)
                await warm_up(target, source, requests=1)
                raw = await _measure(target, source, streams, duration_s, warmup_s, quiet, 0.25, 2, log)
                s = load.summarize_rounds(name, streams, [raw])
                ideal_e2e = output_tokens / (rate / streams)
                row = {
                    "rate": rate,
                    "target": name + ("" if variant == "shipped" else f" [{variant}]")
                    + ("" if step == 1 else f" [{step} tokens/step]"),
                    "variant": variant,
                    "tokens_per_step": step,
                    "output_tokens": output_tokens,
                    # CPU time per delivered token: what optimisation has to bring down.
                    "cpu_us_per_token": {k: v * 1e6 / s.tokens_per_s for k, v in s.cpu_cores.items()
                                         if k != "other" and s.tokens_per_s},
                    "delivered_tokens_per_s": s.tokens_per_s,
                    "delivered_ratio": s.tokens_per_s / rate,
                    "sustained": s.tokens_per_s >= SUSTAINED * rate,
                    "ideal_e2e_s": ideal_e2e,
                    "summary": s.as_dict(),
                }
                rows.append(row)
                log(f"  {rate:>8,.0f} tokens/s via {row['target']:>9}: delivered {s.tokens_per_s:>8,.0f} ({row['delivered_ratio']:.1%}), "
                    f"{s.tokens_per_message or 0:.1f} tokens/msg, TTFT p50 {report._f(s.ttft_ms['p50'])} ms "
                    f"p99 {report._f(s.ttft_ms['p99'])} ms, E2E p50 {report._f(s.e2e_s['p50'], 2)} s (ideal {ideal_e2e:.2f}), "
                    f"CPU {', '.join(f'{k} {v:.2f}' for k, v in s.cpu_cores.items())}")
        finally:
            await started.close()
    best = {}
    for name in dict.fromkeys(r["target"] for r in rows):
        ok = [r["rate"] for r in rows if r["target"] == name and r["sustained"]]
        best[name] = max(ok) if ok else None
    m["busy_after"] = round(machine.busy_fraction(), 3)
    payload = {"machine": m, "streams": streams, "request_s": request_s, "duration_s": duration_s,
               "rows": rows, "largest_sustained": best}
    report.write_json(out / "ceiling.json", payload)
    md = render(payload)
    (out / "ceiling.md").write_text(md)
    _chart(rows, out / "ceiling.png", streams)
    log(md)
    return payload


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        f"### Ceiling: synthetic engine, {payload['streams']} streams, requests of ~{payload['request_s']:g} s "
        f"(tokens per request = rate / streams x {payload['request_s']:g} s)",
        "",
        f"Machine: {machine.one_line(m)}.",
        "",
        "| produced tokens/s | target | delivered tokens/s | delivered | tokens/msg | TTFT p50 / p99 (ms) | "
        "msg gap p50 / p99 (ms) | E2E p50 (s) (ideal) | CPU cores used | CPU µs per token |",
        "|---:|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        s = r["summary"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_cores"].items())
        lines.append(
            f"| {r['rate']:,.0f} | {r['target']} | {r['delivered_tokens_per_s']:,.0f} | {r['delivered_ratio']:.1%}"
            f"{'' if r['sustained'] else ' ✗'} | {report._f(s['tokens_per_message'], 1)} | "
            f"{report._f(s['ttft_ms']['p50'])} / {report._f(s['ttft_ms']['p99'])} | "
            f"{report._f(s['itl_ms']['p50'])} / {report._f(s['itl_ms']['p99'])} | "
            f"{report._f(s['e2e_s']['p50'], 2)} ({r['ideal_e2e_s']:.2f}) | {cpu} | "
            f"{', '.join(f'{k} {v:.0f}' for k, v in r['cpu_us_per_token'].items())} |"
        )
    lines.append("")
    for name, rate in payload["largest_sustained"].items():
        lines.append(f"- largest rate {name} sustained (≥ {SUSTAINED:.0%} delivered): "
                     f"{'none of those tried' if rate is None else f'{rate:,.0f} tokens/s'}")
    return "\n".join(lines) + "\n"


def _chart(rows: list[dict], path: Path, streams: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = sorted({r["target"] for r in rows})
    rates = sorted({r["rate"] for r in rows})
    a.plot(rates, rates, "k:", label="produced")
    for i, name in enumerate(targets):
        mine = sorted((r for r in rows if r["target"] == name), key=lambda r: r["rate"])
        a.plot([r["rate"] for r in mine], [r["delivered_tokens_per_s"] for r in mine], "o-", color=f"C{i}", label=name)
        b.plot([r["rate"] for r in mine], [r["summary"]["ttft_ms"]["p99"] for r in mine], "s--", color=f"C{i}", label=f"{name} TTFT p99")
        b.plot([r["rate"] for r in mine], [r["summary"]["itl_ms"]["p99"] for r in mine], "o-", color=f"C{i}", alpha=0.6, label=f"{name} msg gap p99")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("tokens/s produced by the synthetic engine")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("tokens/s delivered to clients")
    b.set_yscale("log")
    b.set_ylabel("ms")
    fig.suptitle(f"Serving-stack ceiling, {streams} concurrent streams", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="5000,10000,20000,40000", help="comma-separated tokens/s produced in all")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--targets", default="gateway,grpc")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--request-seconds", type=float, default=2.0, help="how long each request streams at its share of the rate")
    p.add_argument("--quiet-threshold", type=float, default=0.3)
    p.add_argument("--variants", default="shipped", help="comma-separated, of bench/variants.py: shipped, "
                   "gateway-c-http, service-uvloop, both")
    p.add_argument("--tokens-per-step", default="1",
                   help="comma-separated: tokens the engine gives each stream per step (per message): what coalescing saves")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    asyncio.run(ceiling(rates, a.streams, targets, a.duration, a.warmup, a.request_seconds, out_dir("ceiling"),
                        quiet=a.quiet_threshold, variants=a.variants.split(","),
                        steps=[int(k) for k in a.tokens_per_step.split(",")]))


if __name__ == "__main__":
    main()
