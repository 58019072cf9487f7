"""`python -m bench.soak`: steady load through the gateway for a bounded time, watching for drift.

Every interval it records the service's and the gateway's resident memory (`process_resident_memory_bytes`
from their /metrics) and open file descriptors, and the latency and throughput of the requests sent in that
interval. At the end it reports the drift: memory growth per minute (a least-squares slope over the second
half, after caches and pools have filled) and how the last interval's latency compares with the first's.

`--hangup-fraction` makes that share of the clients hang up mid-stream (after a random 0.05-1 s): a steady
cancellation storm. After the load, the service must come back to holding nothing per request: the soak waits for
`chatserve_engine_request_state` (open requests, result handlers, sampling plans, stranded outputs, ...) to reach
0 and reports what is left. Not part of the test suite: run it by hand or with `make bench-soak`.

    python -m bench.soak --minutes 10 --concurrency 32 --engine transformers --hangup-fraction 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

from bench import load, machine, procs, report, stack
from bench.__main__ import add_engine_args, engine_spec, out_dir, warm_up
from bench.workload import Dist, Workload, WorkSource


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def _process_samples(url: str) -> dict[str, float]:
    try:
        m = procs.scrape(url)
    except OSError:
        return {}
    return {"rss_mb": m.get("process_resident_memory_bytes", 0) / 2**20, "open_fds": m.get("process_open_fds", 0)}


# How long the engine may take to let go of the last requests once the load stops.
SETTLE_S = 15.0


def request_state(url: str) -> dict[str, float]:
    """chatserve_engine_request_state by kind, from the service's /metrics."""
    prefix = 'chatserve_engine_request_state{kind="'
    return {k[len(prefix) : -2]: v for k, v in procs.scrape(url).items() if k.startswith(prefix)}


async def settled_state(url: str, timeout: float = SETTLE_S) -> tuple[dict[str, float], float]:
    """The request state once it is all 0 (or at the timeout), and how long that took."""
    started = time.perf_counter()
    while True:
        state = request_state(url)
        waited = time.perf_counter() - started
        if not any(state.values()) or waited > timeout:
            return state, waited
        await asyncio.sleep(0.25)


async def soak(spec, wl: Workload, concurrency: int, minutes: float, interval_s: float, out: Path, log=print,
               hangup_fraction: float = 0.0) -> dict:
    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    log(f"engine: {spec.describe()}; workload: {wl.describe()}; {concurrency} streams for {minutes:g} min, "
        f"{hangup_fraction:.0%} of them hanging up mid-stream")
    started = await stack.start(spec, ["gateway"], out / "logs", log=log)
    target = started.targets["gateway"]
    urls = {"service": started.service.metrics_url, "gateway": f"{started.gateway.base_url}/metrics"}
    source = WorkSource(wl, salt="soak")
    results: list = []
    rows: list[dict] = []
    hangups = 0
    rng = random.Random(0)
    final_state: dict[str, float] = {}
    settle_s = 0.0
    try:
        await warm_up(target, source)
        t0 = time.perf_counter()
        t_end = t0 + minutes * 60

        async def worker(i: int) -> None:
            nonlocal hangups
            await asyncio.sleep(i * 0.001)
            while time.perf_counter() < t_end:
                if rng.random() < hangup_fraction:
                    # The client goes away mid-stream: its connection closes, and the stack must let go of it.
                    try:
                        await asyncio.wait_for(target.request(source.next()), rng.uniform(0.05, 1.0))
                    except TimeoutError:
                        hangups += 1
                    continue
                r = await target.request(source.next())
                results.append(r)
                if r.error:
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        cpu_before = {k: procs.cpu_seconds(p.pid) for k, p in started.processes().items()}
        mark = t0
        while mark < t_end:
            await asyncio.sleep(max(0.0, min(mark + interval_s, t_end) - time.perf_counter()))
            now = time.perf_counter()
            s = load.summarize("gateway", concurrency, [(results, mark, now)], {})
            cpu_now = {k: procs.cpu_seconds(p.pid) for k, p in started.processes().items()}
            row = {
                "minute": (now - t0) / 60,
                "ttft_p50_ms": s.ttft_ms["p50"],
                "ttft_p99_ms": s.ttft_ms["p99"],
                "e2e_p50_s": s.e2e_s["p50"],
                "e2e_p99_s": s.e2e_s["p99"],
                "tokens_per_s": s.tokens_per_s,
                "errors": s.errors,
                "cpu_cores": {k: (cpu_now[k] - cpu_before[k]) / (now - mark) for k in cpu_now},
            }
            cpu_before = cpu_now
            for name, url in urls.items():
                for key, value in _process_samples(url).items():
                    row[f"{name}_{key}"] = value
            rows.append(row)
            # Old requests are no longer needed: keep memory flat in the load generator too.
            results[:] = [r for r in results if r.end is None or r.end >= now - interval_s]
            log(f"  {row['minute']:5.1f} min: TTFT p50 {report._f(row['ttft_p50_ms'])} ms p99 {report._f(row['ttft_p99_ms'])} ms, "
                f"{row['tokens_per_s']:,.0f} tokens/s, service {row.get('service_rss_mb', 0):.0f} MB, "
                f"gateway {row.get('gateway_rss_mb', 0):.0f} MB, errors {row['errors']}")
            mark = now
        await asyncio.gather(*tasks, return_exceptions=True)
        final_state, settle_s = await settled_state(urls["service"])
        log(f"request state {settle_s:.1f} s after the load: {final_state}")
    finally:
        await started.close()
    payload = {"machine": m, "engine": spec.describe(), "workload": wl.describe(), "concurrency": concurrency,
               "minutes": minutes, "interval_s": interval_s, "rows": rows, "drift": drift(rows),
               "hangup_fraction": hangup_fraction, "hangups": hangups,
               "request_state_after": final_state, "settle_s": settle_s}
    report.write_json(out / "soak.json", payload)
    md = render(payload)
    (out / "soak.md").write_text(md)
    _chart(rows, out / "soak.png")
    log(md)
    return payload


def drift(rows: list[dict]) -> dict:
    if not rows:
        return {}
    half = rows[len(rows) // 2 :]
    out = {}
    for name in ("service", "gateway"):
        key = f"{name}_rss_mb"
        if key in rows[0]:
            out[f"{name}_rss_first_mb"] = rows[0][key]
            out[f"{name}_rss_last_mb"] = rows[-1][key]
            out[f"{name}_rss_mb_per_min_second_half"] = _slope([r["minute"] for r in half], [r[key] for r in half])
    first, last = rows[0], rows[-1]
    if first["ttft_p50_ms"] and last["ttft_p50_ms"]:
        out["ttft_p50_last_over_first"] = last["ttft_p50_ms"] / first["ttft_p50_ms"]
    if first["e2e_p50_s"] and last["e2e_p50_s"]:
        out["e2e_p50_last_over_first"] = last["e2e_p50_s"] / first["e2e_p50_s"]
    out["errors"] = sum(r["errors"] for r in rows)
    return out


def render(payload: dict) -> str:
    lines = [
        f"### Soak: {payload['concurrency']} streams for {payload['minutes']:g} min through the gateway",
        "",
        f"Machine: {machine.one_line(payload['machine'])}. Engine: {payload['engine']}. Workload: {payload['workload']}.",
        "",
        "| minute | TTFT p50 / p99 (ms) | E2E p50 / p99 (s) | tokens/s | service RSS (MB) | gateway RSS (MB) | service / gateway fds | errors |",
        "|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['minute']:.1f} | {report._f(r['ttft_p50_ms'])} / {report._f(r['ttft_p99_ms'])} | "
            f"{report._f(r['e2e_p50_s'], 2)} / {report._f(r['e2e_p99_s'], 2)} | {r['tokens_per_s']:,.0f} | "
            f"{r.get('service_rss_mb', 0):.0f} | {r.get('gateway_rss_mb', 0):.0f} | "
            f"{r.get('service_open_fds', 0):.0f} / {r.get('gateway_open_fds', 0):.0f} | {r['errors']} |"
        )
    d = payload["drift"]
    lines += ["", "Drift: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items() if v is not None), ""]
    if "request_state_after" in payload:
        state = payload["request_state_after"]
        lines += [
            f"Clients that hung up mid-stream: {payload['hangups']} ({payload['hangup_fraction']:.0%} of requests). "
            f"Per-request state in the service {payload['settle_s']:.1f} s after the load: "
            + (", ".join(f"{k} {v:.0f}" for k, v in sorted(state.items())) or "not reported"),
            "",
        ]
    return "\n".join(lines)


def _chart(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    minutes = [r["minute"] for r in rows]
    for name in ("service", "gateway"):
        a.plot(minutes, [r.get(f"{name}_rss_mb") for r in rows], "o-", label=f"{name} RSS (MB)")
    b.plot(minutes, [r["ttft_p50_ms"] for r in rows], "o-", label="TTFT p50 (ms)")
    b.plot(minutes, [r["ttft_p99_ms"] for r in rows], "s--", label="TTFT p99 (ms)")
    for ax in (a, b):
        ax.set_xlabel("minute")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--interval", type=float, default=30.0, help="seconds per sample")
    p.add_argument("--prompt-tokens", default="64")
    p.add_argument("--output-tokens", default="64")
    p.add_argument("--hangup-fraction", type=float, default=0.0, help="share of requests whose client hangs up mid-stream")
    add_engine_args(p)
    p.set_defaults(synthetic_tokens_per_s=100.0)
    a = p.parse_args(argv)
    wl = Workload(Dist.parse(a.prompt_tokens), Dist.parse(a.output_tokens))
    asyncio.run(soak(engine_spec(a), wl, a.concurrency, a.minutes, a.interval, out_dir("soak"),
                     hangup_fraction=a.hangup_fraction))


if __name__ == "__main__":
    main()
