"""API keys and the service token never appear in a log line, a response (body or header) or a metric, whatever
the input: traffic with several keys from the environment and a keys file with malformed lines, right and wrong
keys in both the OpenAI and the Anthropic header, bad requests and rate limits, then everything the processes
wrote and answered is scanned for every secret."""

from __future__ import annotations

import httpx
import openai

from tests.helpers.procs import start_gateway, start_service

ENV_KEYS = ["sk-env-one-" + "1" * 24, "sk-env-two-" + "2" * 24]
FILE_KEYS = ["sk-file-a-" + "a" * 24, "sk-file-b-" + "b" * 24, "sk-file-c-" + "c" * 24]
TOKEN = "svc-token-" + "t" * 30


def test_no_secret_reaches_a_log_a_response_or_a_metric(tmp_path):
    keys_file = tmp_path / "keys"
    # Line 1: two keys on one line (the second is not a key: it must not be logged as an "unknown option" either).
    keys_file.write_text(f"{FILE_KEYS[0]} {FILE_KEYS[1]}\n{FILE_KEYS[2]} rpm=2 tpm=oops\n# comment\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    service = start_service(tmp_path, "--auth-token-file", str(token_file))
    gateway, base = start_gateway(tmp_path, service.target, "--api-keys-file", str(keys_file),
                                  "--backend-token-file", str(token_file), keys=",".join(ENV_KEYS))
    secrets = [*ENV_KEYS, *FILE_KEYS, TOKEN]
    seen: list[str] = []
    try:
        model = openai.OpenAI(base_url=base + "/v1", api_key=ENV_KEYS[0], max_retries=0).models.list().data[0].id
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        with httpx.Client(base_url=base, timeout=60) as http:
            def call(method: str, path: str, headers: dict, body=None) -> None:
                response = http.request(method, path, json=body, headers=headers)
                seen.append(f"{response.status_code} {dict(response.headers)} {response.text}")

            for key in [*ENV_KEYS, FILE_KEYS[0], FILE_KEYS[2]]:
                call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, chat)
                call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {key}"}, {**chat, "stream": True})
                call("POST", "/v1/messages", {"x-api-key": key}, {**chat, "max_tokens": 3})
            for wrong in [FILE_KEYS[1], ENV_KEYS[0][:-1] + "X", ENV_KEYS[0] + "X", TOKEN, "sk-short"]:
                call("GET", "/v1/models", {"Authorization": f"Bearer {wrong}"})
                call("POST", "/v1/messages", {"x-api-key": wrong}, chat)
            call("GET", "/v1/models", {"Authorization": ENV_KEYS[1]})  # no "Bearer"
            call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {ENV_KEYS[0]}"}, {**chat, "n": 0})
            call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {ENV_KEYS[0]}", "X-Request-Id": ENV_KEYS[1]},
                 {**chat, "user": "someone"})
            for _ in range(4):  # over the rpm=2 of the third file key: 429s
                call("POST", "/v1/chat/completions", {"Authorization": f"Bearer {FILE_KEYS[2]}"}, chat)
            call("GET", "/metrics", {})
            seen.append(httpx.get(service.metrics_url).text)
    finally:
        gateway.stop()
        service.proc.stop()
    assert any(s.startswith("429") for s in seen) and any(s.startswith("401") for s in seen)
    everything = "\n".join([*seen, gateway.log(), service.proc.log()])
    leaked = [s for s in secrets if s in everything or s[8:-4] in everything]
    assert not leaked, f"secrets found: {[s[:10] + '...' for s in leaked]}"

