"""`python -m bench.stall`: does one huge request stall the streams in flight?

A stream runs through the gateway (the transformers engine, the real model) while huge prompts arrive: one just
under the service's character bound (rendered and tokenized, then refused for the context window) and a 5 MB one
(refused by the bound before tokenizing, after the gateway has read and parsed all of it). The stream's gaps
between chunks are recorded before and while they arrive; the target is that its next token is delayed by at most
100 ms. Writes stall.md and stall.json into bench/results/stall-<time>/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from pathlib import Path

import aiohttp

from bench import machine, procs
from bench.__main__ import out_dir

TARGET_MS = 100.0


async def _stream_gaps(session: aiohttp.ClientSession, base: str, key: str, model: str, gaps: list[tuple[float, float]]):
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        last = None
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append((now, now - last))
            last = now


async def _huge(session: aiohttp.ClientSession, base: str, key: str, model: str, chars: int) -> tuple[int, float]:
    body = {"model": model, "messages": [{"role": "user", "content": "word " * (chars // 5)}], "max_tokens": 4}
    started = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status, time.perf_counter() - started


async def stall(out: Path, log=print) -> dict:
    key = "sk-stall-" + secrets.token_urlsafe(12)
    out.mkdir(parents=True, exist_ok=True)
    service = procs.start_service(out / "logs", [])
    gateway = procs.start_gateway(out / "logs", service.target, key, extra=["--max-body-bytes", str(16 * 2**20)])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                model = (await r.json())["data"][0]["id"]
            context = 8192  # SmolLM2's window; the service refuses more than 32 characters per token of it
            gaps: list[tuple[float, float]] = []
            stream = asyncio.create_task(_stream_gaps(session, gateway.base_url, key, model, gaps))
            await asyncio.sleep(4)  # the stream's own rhythm first
            rows = []
            for label, chars in (("just under the bound (rendered, tokenized, refused)", context * 32 - 100),
                                 ("5 MB (refused before tokenizing)", 5 * 2**20)):
                window_start = time.perf_counter()
                status, took = await _huge(session, gateway.base_url, key, model, chars)
                await asyncio.sleep(1.0)
                during = [g for t, g in gaps if window_start <= t <= time.perf_counter()]
                rows.append({"prompt": label, "chars": chars, "status": status, "answered_s": round(took, 3),
                             "max_gap_ms": round(max(during) * 1000, 1) if during else None})
            stream.cancel()
    finally:
        gateway.proc.stop()
        service.proc.stop()
    baseline = [g for _, g in gaps[:40]]
    p50 = statistics.median(baseline) * 1000 if baseline else None
    result = {"machine": machine.one_line(machine.describe()), "stream_gap_p50_ms": round(p50, 1) if p50 else None,
              "target_ms": TARGET_MS, "rows": rows}
    for row in rows:
        row["delay_ms"] = round(row["max_gap_ms"] - p50, 1) if row["max_gap_ms"] is not None and p50 else None
        row["ok"] = row["delay_ms"] is not None and row["delay_ms"] <= TARGET_MS
    lines = [
        "### One huge request during a stream", "",
        f"Machine: {result['machine']}. The stream's usual gap between chunks: {result['stream_gap_p50_ms']} ms (p50).",
        "",
        "| huge prompt | characters | answered | in | stream's longest gap meanwhile | delay over its usual gap (target ≤ 100 ms) |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {r['prompt']} | {r['chars']:,} | {r['status']} | {r['answered_s']} s | {r['max_gap_ms']} ms | "
          f"{r['delay_ms']} ms {'✓' if r['ok'] else '✗'} |" for r in rows],
        "",
    ]
    (out / "stall.json").write_text(json.dumps(result, indent=1))
    (out / "stall.md").write_text("\n".join(lines))
    log("\n".join(lines))
    return result


def main() -> None:
    argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__).parse_args()
    asyncio.run(stall(out_dir("stall")))


if __name__ == "__main__":
    main()
