#!/usr/bin/env bash
# GPU smoke test: the SGLang engine through the whole stack on one GPU host.
#
#   MODEL=/models/Qwen2.5-7B-Instruct deploy/gpu_smoke.sh [extra service flags, e.g. --tp-size 2]
#
# Needs a Python environment with CUDA torch, sglang (pip install -e '.[gateway,dev,clients,sglang]') and a local
# Hugging Face model folder. It starts `python -m service --engine sglang` and `python -m gateway` on free
# ports, waits until both are ready, runs the e2e suite against them (tests/e2e honours
# CHATSERVE_E2E_BASE_URL, CHATSERVE_E2E_API_KEY and CHATSERVE_E2E_GRPC, which point it at a stack that is
# already running), then measures time to first token for a long prompt twice: cold, and again with the same
# long prefix, which RadixAttention serves from its cache (usage.prompt_tokens_details.cached_tokens > 0).
#
# Environment: PYTHON (default python), RUN_E2E=0 to skip the e2e suite, READY_TIMEOUT_S (default 1800:
# loading weights and capturing CUDA graphs takes minutes), PREFIX_RULES (default 100, ~3K prompt tokens; raise
# it for models with long windows). Logs are kept in the printed work directory.
set -euo pipefail

: "${MODEL:?set MODEL to a local Hugging Face model folder}"
PYTHON=${PYTHON:-python}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-1800}
cd "$(dirname "$0")/.."

WORK=$(mktemp -d -t chatserve-gpu-smoke.XXXXXX)
API_KEY="sk-smoke-$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')"
export API_KEYS="$API_KEY"
SERVICE_PID="" GATEWAY_PID=""

stop() {
    # The gateway first, so it finishes its streams while the service still serves them.
    for pid in $GATEWAY_PID $SERVICE_PID; do
        kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    echo "logs: $WORK"
}
trap stop EXIT

fail() {
    echo "gpu_smoke: $*" >&2
    tail -n 40 "$WORK"/*.log >&2 || true
    exit 1
}

# wait_for_file FILE PID NAME: the port the process wrote once it bound (both bind port 0).
wait_for_file() {
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until [ -s "$1" ]; do
        kill -0 "$2" 2>/dev/null || fail "the $3 exited while starting"
        [ "$SECONDS" -lt "$deadline" ] || fail "the $3 did not bind a port in ${READY_TIMEOUT_S}s"
        sleep 0.5
    done
    cat "$1"
}

"$PYTHON" -m service --engine sglang --model "$MODEL" --host 127.0.0.1 --port 0 \
    --port-file "$WORK/grpc.port" --metrics-port 0 --metrics-port-file "$WORK/metrics.port" "$@" \
    >"$WORK/service.log" 2>&1 &
SERVICE_PID=$!
GRPC_TARGET="127.0.0.1:$(wait_for_file "$WORK/grpc.port" "$SERVICE_PID" service)"
METRICS_URL="http://127.0.0.1:$(wait_for_file "$WORK/metrics.port" "$SERVICE_PID" service)/metrics"

# The service binds at once and answers health NOT_SERVING until the engine has loaded and warmed up.
"$PYTHON" - "$GRPC_TARGET" "$SERVICE_PID" "$READY_TIMEOUT_S" <<'EOF' || fail "the service never turned SERVING"
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
with grpc.insecure_channel(target) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        os.kill(pid, 0)  # raises once the service has died
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(1)
sys.exit(1)
EOF
echo "service SERVING on $GRPC_TARGET"

"$PYTHON" -m gateway --host 127.0.0.1 --port 0 --port-file "$WORK/http.port" --backend "$GRPC_TARGET" \
    >"$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
BASE_URL="http://127.0.0.1:$(wait_for_file "$WORK/http.port" "$GATEWAY_PID" gateway)/v1"
until curl -fsS "${BASE_URL%/v1}/health" >/dev/null 2>&1; do
    kill -0 "$GATEWAY_PID" 2>/dev/null || fail "the gateway exited while starting"
    sleep 0.5
done
echo "gateway ready at $BASE_URL"

export CHATSERVE_E2E_BASE_URL="$BASE_URL" CHATSERVE_E2E_API_KEY="$API_KEY" CHATSERVE_E2E_GRPC="$GRPC_TARGET"
export CHATSERVE_E2E_METRICS_URL="$METRICS_URL" CHATSERVE_E2E_ENGINE=sglang
# The tests that start services of their own (the SIGTERM drain) start SGLang ones, in this same environment.
export CHATSERVE_TEST_ENGINES=sglang CHATSERVE_SGLANG_PYTHON="$(command -v "$PYTHON")"
if [ "${RUN_E2E:-1}" = 1 ]; then
    "$PYTHON" -m pytest -q tests/e2e || fail "the e2e suite failed against the SGLang stack"
fi

# Time to first token, cold and then with the long prefix cached. A fresh nonce keeps the cold run cold when
# this script runs again against a warm engine.
"$PYTHON" - <<'EOF' || fail "the prefix cache did not show in cached_tokens"
import os, secrets, time
import openai

client = openai.OpenAI(base_url=os.environ["CHATSERVE_E2E_BASE_URL"], api_key=os.environ["CHATSERVE_E2E_API_KEY"],
                       max_retries=0, timeout=600)
model = client.models.list().data[0].id
system = f"Session {secrets.token_hex(8)}. You answer questions about this rule book.\n" + "\n".join(
    f"Rule {i}: a request numbered {i} is answered within {i % 7 + 1} minutes and logged under code R{i:04d}."
    for i in range(int(os.environ.get("PREFIX_RULES", "100")))  # ~30 tokens each: fits a 4K-token window
)

def first_token(question: str):
    started = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            usage = chunk.usage
    details = usage.prompt_tokens_details
    return first, usage.prompt_tokens, (details.cached_tokens if details else 0) or 0

cold = first_token("Which code logs request 17?")
warm = first_token("Which code logs request 230?")
for name, (ttft, prompt, cached) in (("cold", cold), ("warm", warm)):
    print(f"TTFT {name}: {ttft * 1000:8.1f} ms   prompt {prompt} tokens, cached {cached}")
print(f"speed-up from the prefix cache: {cold[0] / warm[0]:.1f}x")
raise SystemExit(0 if warm[2] > 0 else 1)
EOF
echo "gpu smoke test passed"
