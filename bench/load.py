"""The closed-loop load generator: `concurrency` workers each send a request, read its stream to the end and
send the next, for a warm-up plus a measured window; requests in flight at the end of the window are read
to their end (so long requests are not cut from the latency figures) but add nothing to the window's
throughput. Also the statistics of one run.

Definitions (those of vLLM's `benchmark_serving`, so numbers compare with what others publish):
- TTFT: request sent → first message with a token; ITL: gaps between consecutive messages with tokens (a
  merged message counts once); TPOT: (last token − first token) / (tokens − 1) per request; E2E: request
  sent → stream ended.
- tokens/s: tokens that arrived inside the measured window / window; requests/s: requests that finished
  inside the window / window. Latencies are of the requests *sent* inside the window.
"""

from __future__ import annotations

import asyncio
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

from bench.machine import cpu_totals
from bench.procs import cpu_seconds
from bench.targets import Result, Target
from bench.workload import WorkSource


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Summary:
    target: str
    concurrency: int
    window_s: float
    requests: int  # sent inside the window
    completed: int
    errors: int
    first_error: str | None
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_s: dict[str, float | None]
    requests_per_s: float
    tokens_per_s: float
    tokens_per_message: float | None
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None
    cached_tokens_mean: float | None
    ttft_shared_p50_ms: float | None
    ttft_cold_p50_ms: float | None
    # CPU time used during the run per process, in cores (1.0 = one core busy all the time).
    cpu_cores: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _pcts(values: list[float], scale: float) -> dict[str, float | None]:
    out = {}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        v = percentile(values, q)
        out[name] = None if v is None else v * scale
    out["mean"] = statistics.fmean(values) * scale if values else None
    return out


def summarize(target: str, concurrency: int, windows: list[tuple[list[Result], float, float]],
              cpu_cores: dict[str, float]) -> Summary:
    """`windows`: (results, window start, window end) of each round; samples are pooled, windows added."""
    window = sum(t_stop - t_measure for _, t_measure, t_stop in windows)
    measured = [r for results, t_measure, t_stop in windows for r in results if t_measure <= r.start < t_stop]
    ok = [r for r in measured if r.error is None and r.end is not None]
    errors = [r for r in measured if r.error is not None]
    ttft = [r.first - r.start for r in measured if r.first is not None]
    e2e = [r.end - r.start for r in ok]
    itl: list[float] = []
    tpot: list[float] = []
    for r in ok:
        itl.extend(b - a for a, b in zip(r.times, r.times[1:]))
        n = sum(r.tokens)
        if n > 1 and r.first is not None:
            tpot.append((r.times[-1] - r.first) / (n - 1))
    tokens_in_window = 0
    messages = 0
    finished_in_window = 0
    for results, t_measure, t_stop in windows:
        for r in results:
            for t, n in zip(r.times, r.tokens):
                if t_measure <= t < t_stop:
                    tokens_in_window += n
                    messages += 1
            if r.end is not None and r.error is None and t_measure <= r.end < t_stop:
                finished_in_window += 1
    shared = [r.first - r.start for r in measured if r.first is not None and r.shared]
    cold = [r.first - r.start for r in measured if r.first is not None and not r.shared]

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    return Summary(
        target=target,
        concurrency=concurrency,
        window_s=window,
        requests=len(measured),
        completed=len(ok),
        errors=len(errors),
        first_error=errors[0].error if errors else None,
        ttft_ms=_pcts(ttft, 1000),
        itl_ms=_pcts(itl, 1000),
        tpot_ms=_pcts(tpot, 1000),
        e2e_s=_pcts(e2e, 1),
        requests_per_s=finished_in_window / window,
        tokens_per_s=tokens_in_window / window,
        tokens_per_message=tokens_in_window / messages if messages else None,
        prompt_tokens_mean=mean([r.prompt_tokens for r in ok]),
        completion_tokens_mean=mean([r.completion_tokens for r in ok]),
        cached_tokens_mean=mean([r.cached_tokens for r in ok]),
        ttft_shared_p50_ms=None if not shared else percentile(shared, 50) * 1000,
        ttft_cold_p50_ms=None if not cold else percentile(cold, 50) * 1000,
        cpu_cores=cpu_cores,
    )


@dataclass
class Raw:
    """One run's requests and its window, kept so several rounds can be summarised together."""

    results: list[Result]
    t_measure: float
    t_stop: float
    cpu_s: dict[str, float]
    wall_s: float


async def run(target: Target, source: WorkSource, concurrency: int, duration_s: float, warmup_s: float,
              drain_timeout_s: float = 120.0) -> Raw:
    results: list[Result] = []
    t0 = time.perf_counter()
    t_measure = t0 + warmup_s
    t_stop = t_measure + duration_s
    pids = target.pids()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu_before["bench"] = _own_cpu()
    machine_before = cpu_totals()[0]

    async def worker(index: int) -> None:
        # Spread the first requests over a few milliseconds, as independent clients would arrive.
        await asyncio.sleep(index * 0.001)
        while time.perf_counter() < t_stop:
            result = await target.request(source.next())
            results.append(result)
            if result.error is not None:
                await asyncio.sleep(0.05)  # do not spin on a failing target

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + drain_timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    cpu["bench"] = _own_cpu() - cpu_before["bench"]
    # What the rest of the machine used meanwhile: other people's jobs compete for the same 2 cores.
    cpu["other"] = max(0.0, cpu_totals()[0] - machine_before - sum(cpu.values()))
    return Raw(results, t_measure, t_stop, cpu, wall)


def summarize_rounds(target: str, concurrency: int, raws: list[Raw]) -> Summary:
    """Several rounds of the same (target, concurrency) as one summary."""
    wall = sum(r.wall_s for r in raws)
    cpu: dict[str, float] = {}
    for r in raws:
        for k, v in r.cpu_s.items():
            cpu[k] = cpu.get(k, 0.0) + v
    windows = [(r.results, r.t_measure, r.t_stop) for r in raws]
    return summarize(target, concurrency, windows, {k: round(v / wall, 3) for k, v in cpu.items()})
