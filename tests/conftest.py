"""Shared fixtures: one real stack (service + gateway, started the way `make run` starts it) for all e2e tests."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from generate.v1 import generate_pb2_grpc
from common.procs import scrape
from tests.helpers.engines import ENGINES, python_for, service_args
from tests.helpers.procs import ROOT, Proc, spawn, wait_for_file

API_KEY = "sk-test-" + "k" * 24
# A second key: what one key stored (Responses API) another must not see.
OTHER_API_KEY = "sk-other-" + "o" * 24
CORS_ORIGIN = "https://app.example"


@dataclass
class Stack:
    base_url: str  # ends with /v1
    grpc_target: str
    api_key: str
    launcher: Proc | None
    engine: str = "transformers"
    # The service's /metrics (None for a stack started elsewhere).
    metrics_url: str | None = None

    def service_log(self) -> str:
        return self.launcher.log() if self.launcher else ""

    def metrics(self) -> dict[str, float]:
        assert self.metrics_url, "this stack's service metrics are not reachable"
        return scrape(self.metrics_url)


@pytest.fixture(scope="session", params=ENGINES)
def stack(request, tmp_path_factory) -> Stack:
    """The whole product, as `make run` starts it (deploy/run_local.py), on ephemeral ports, once per engine in
    CHATSERVE_TEST_ENGINES: every test that uses it runs against each engine with the same assertions.

    Set CHATSERVE_E2E_BASE_URL, CHATSERVE_E2E_API_KEY, CHATSERVE_E2E_GRPC, CHATSERVE_E2E_METRICS_URL (the service's)
    and CHATSERVE_E2E_ENGINE to run the e2e suite against a stack that is already running instead
    (deploy/gpu_smoke.sh does this on a GPU host).
    """
    engine = request.param
    if os.environ.get("CHATSERVE_E2E_BASE_URL"):
        yield Stack(
            base_url=os.environ["CHATSERVE_E2E_BASE_URL"].rstrip("/"),
            grpc_target=os.environ["CHATSERVE_E2E_GRPC"],
            api_key=os.environ["CHATSERVE_E2E_API_KEY"],
            launcher=None,
            engine=os.environ.get("CHATSERVE_E2E_ENGINE", engine),
            metrics_url=os.environ.get("CHATSERVE_E2E_METRICS_URL"),
        )
        return
    tmp = tmp_path_factory.mktemp(f"stack-{engine}")
    stack = launch_stack(engine, tmp)
    yield stack
    if engine == "transformers":
        # Every shape the suite's traffic made was compiled during warm-up: nothing recompiled while serving.
        metrics = stack.metrics()
        assert metrics['chatserve_engine_compiles_total{phase="warmup"}'] >= 1, metrics
        assert metrics['chatserve_engine_compiles_total{phase="serving"}'] == 0, stack.service_log()[-3000:]
    code = stack.launcher.stop()
    assert code == 0, f"the stack did not stop cleanly ({code}):\n{stack.launcher.log()[-3000:]}"


def launch_stack(engine: str, tmp: Path, *service_extra: str) -> Stack:
    """Service and gateway as `make run` starts them (deploy/run_local.py), on ephemeral ports, ready."""
    ready, metrics_port = tmp / "ready.json", tmp / "metrics.port"
    launcher = spawn(
        [str(ROOT / "deploy" / "run_local.py"), "--gateway-host", "127.0.0.1", "--gateway-port", "0",
         "--grpc-port", "0", "--ready-file", str(ready), "--",
         *service_args(engine), "--metrics-port", "0", "--metrics-port-file", str(metrics_port), *service_extra],
        tmp / "stack.log",
        {"API_KEYS": f"{API_KEY},{OTHER_API_KEY}", "CHATSERVE_CORS_ORIGINS": CORS_ORIGIN,
         "CHATSERVE_RESPONSES_STORE": str(tmp / "responses.sqlite3")},
        python=python_for(engine),
    )
    info = json.loads(wait_for_file(ready, launcher, timeout=600))
    metrics_url = f"http://127.0.0.1:{metrics_port.read_text().strip()}/metrics"
    return Stack(info["base_url"], info["grpc_target"], info["api_key"], launcher, engine, metrics_url)


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def grpc_stub(stack: Stack):
    channel = grpc.insecure_channel(stack.grpc_target)
    yield generate_pb2_grpc.GenerateStub(channel)
    channel.close()
