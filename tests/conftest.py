"""Shared fixtures: one real stack (service + gateway, started the way `make run` starts it) for all e2e tests."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from generate.v1 import generate_pb2_grpc
from tests.helpers.procs import ROOT, Proc, spawn, wait_for_file

API_KEY = "sk-test-" + "k" * 24
CORS_ORIGIN = "https://app.example"


@dataclass
class Stack:
    base_url: str  # ends with /v1
    grpc_target: str
    api_key: str
    launcher: Proc | None

    def service_log(self) -> str:
        return self.launcher.log() if self.launcher else ""


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """The whole product, as `make run` starts it (deploy/run_local.py), on ephemeral ports.

    Set CHATSERVE_E2E_BASE_URL, CHATSERVE_E2E_API_KEY and CHATSERVE_E2E_GRPC to run the e2e suite against a
    stack that is already running instead (deploy/gpu_smoke.sh does this on a GPU host).
    """
    if os.environ.get("CHATSERVE_E2E_BASE_URL"):
        yield Stack(
            base_url=os.environ["CHATSERVE_E2E_BASE_URL"].rstrip("/"),
            grpc_target=os.environ["CHATSERVE_E2E_GRPC"],
            api_key=os.environ["CHATSERVE_E2E_API_KEY"],
            launcher=None,
        )
        return
    tmp = tmp_path_factory.mktemp("stack")
    ready = tmp / "ready.json"
    launcher = spawn(
        [str(ROOT / "deploy" / "run_local.py"), "--gateway-host", "127.0.0.1", "--gateway-port", "0",
         "--grpc-port", "0", "--ready-file", str(ready)],
        tmp / "stack.log",
        {"API_KEYS": API_KEY, "CHATSERVE_METRICS_PORT": "-1", "CHATSERVE_CORS_ORIGINS": CORS_ORIGIN},
    )
    info = json.loads(wait_for_file(ready, launcher, timeout=300))
    yield Stack(info["base_url"], info["grpc_target"], info["api_key"], launcher)
    code = launcher.stop()
    assert code == 0, f"the stack did not stop cleanly ({code}):\n{launcher.log()[-3000:]}"


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
