"""Fuzzing the running gateway against the OpenAPI document it serves (schemathesis, fixed seed, bounded cases):
no input, valid or not, gets a 5xx, invalid input is refused with a 4xx, and every answer matches the
documented status codes, content types and schemas.

The service behind it is the real one with the real model, capped at 4 output tokens so hundreds of valid
requests finish quickly.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openapi import openapi_document
from tests.helpers.openai_schema import openai_document
from tests.helpers.procs import scrape, start_gateway, start_service

KEY = "sk-fuzz-" + "f" * 24
MODEL = "fuzz-model"
# The document the gateway serves for this service (checked below), loaded at import as schemathesis needs.
schema = schemathesis.openapi.from_dict(openapi_document((MODEL,)))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    service = start_service(tmp, "--max-output-tokens", "4", "--served-model-name", MODEL)
    gateway, base = start_gateway(tmp, service.target, keys=KEY)
    yield base
    assert gateway.stop() == 0
    service.proc.stop()
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def test_the_fuzzed_document_is_the_served_one(base_url):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/openapi.json") as reply:
        assert json.load(reply) == json.loads(json.dumps(openapi_document((MODEL,))))


@schema.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_gateway_against_its_schema(case, base_url):
    case.call_and_validate(
        base_url=base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
                negative_data_rejection],
        timeout=60,
    )


openai_schema = schemathesis.openapi.from_dict(openai_document())


@openai_schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_gateway_against_openais_own_description(case, base_url):
    """Requests generated from OpenAI's published description of the same operations (tests/schemas/openai.json):
    whatever OpenAI's API accepts, this gateway answers with a 2xx or a 4xx, never a 5xx."""
    if isinstance(case.body, dict):
        case.body["model"] = MODEL  # otherwise nearly every request would stop at 404 model_not_found
    case.call_and_validate(base_url=base_url + "/v1", headers={"Authorization": f"Bearer {KEY}"},
                           checks=[not_a_server_error], timeout=60)


def test_fuzzing_reached_both_the_model_and_the_validators(base_url):
    """Guards the fuzz test itself: it must have produced accepted requests and refused ones on both routes."""
    samples = scrape(f"{base_url}/metrics")

    def count(route: str, status: str) -> float:
        return sum(v for k, v in samples.items()
                   if k.startswith("chatserve_gateway_requests_total{") and f'route="{route}"' in k and f'status="{status}"' in k)

    for route in ("chat", "completions"):
        assert count(route, "200") > 0 and count(route, "400") > 0, (route, samples)
