"""Turning summaries into what people read: a markdown table, a PNG chart (latency and throughput against
concurrency, one line per target) and the JSON everything came from."""

from __future__ import annotations

import json
from pathlib import Path

from bench.load import Summary


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(summaries: list[Summary]) -> str:
    """One row per (target, concurrency)."""
    header = (
        "| target | conc. | requests | TTFT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 (ms) | "
        "E2E p50 / p99 (s) | req/s | tokens/s | tokens/msg | errors | CPU cores used |\n"
        "|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for s in sorted(summaries, key=lambda s: (s.concurrency, s.target)):
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in s.cpu_cores.items())
        rows.append(
            f"| {s.target} | {s.concurrency} | {s.requests} | "
            f"{_f(s.ttft_ms['p50'])} / {_f(s.ttft_ms['p90'])} / {_f(s.ttft_ms['p99'])} | "
            f"{_f(s.itl_ms['p50'])} / {_f(s.itl_ms['p99'])} | {_f(s.tpot_ms['p50'])} | "
            f"{_f(s.e2e_s['p50'], 2)} / {_f(s.e2e_s['p99'], 2)} | {_f(s.requests_per_s, 2)} | {_f(s.tokens_per_s, 0)} | "
            f"{_f(s.tokens_per_message, 2)} | {s.errors} | {cpu} |"
        )
    return header + "\n".join(rows) + "\n"


def overhead_table(summaries: list[Summary], floor: str = "inprocess") -> str:
    """What each target adds to the floor's TTFT, per concurrency."""
    by = {(s.target, s.concurrency): s for s in summaries}
    lines = ["| target | conc. | TTFT p50 added (ms) | TTFT p99 added (ms) | ITL p50 added (ms) |", "|---|---:|---:|---:|---:|"]
    for (target, conc), s in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = by.get((floor, conc))
        if target == floor or base is None:
            continue

        def delta(a, b):
            return None if a is None or b is None else a - b

        lines.append(
            f"| {target} | {conc} | {_f(delta(s.ttft_ms['p50'], base.ttft_ms['p50']), 2)} | "
            f"{_f(delta(s.ttft_ms['p99'], base.ttft_ms['p99']), 2)} | {_f(delta(s.itl_ms['p50'], base.itl_ms['p50']), 2)} |"
        )
    return "\n".join(lines) + "\n"


def chart(summaries: list[Summary], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    targets = sorted({s.target for s in summaries})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], "TTFT (ms)", lambda s: (s.ttft_ms["p50"], s.ttft_ms["p99"])),
        (axes[0][1], "ITL (ms)", lambda s: (s.itl_ms["p50"], s.itl_ms["p99"])),
        (axes[1][0], "E2E latency (s)", lambda s: (s.e2e_s["p50"], s.e2e_s["p99"])),
        (axes[1][1], "delivered tokens/s", lambda s: (s.tokens_per_s, None)),
    ]
    for ax, label, get in panels:
        for i, target in enumerate(targets):
            rows = sorted((s for s in summaries if s.target == target), key=lambda s: s.concurrency)
            xs = [s.concurrency for s in rows]
            p50 = [get(s)[0] for s in rows]
            p99 = [get(s)[1] for s in rows]
            color = f"C{i}"
            has_p99 = any(v is not None for v in p99)
            ax.plot(xs, [float("nan") if v is None else v for v in p50], "o-", color=color,
                    label=f"{target} p50" if has_p99 else target)
            if has_p99:
                ax.plot(xs, [float("nan") if v is None else v for v in p99], "s--", color=color, alpha=0.6, label=f"{target} p99")
        ax.set_xscale("log", base=2)
        levels = sorted({s.concurrency for s in summaries})
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
