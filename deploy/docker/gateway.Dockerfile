# syntax=docker/dockerfile:1
# The OpenAI-compatible gateway (`python -m gateway`): aiohttp and a gRPC client. No torch, no model.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t chatserve/gateway:0.1.0 .     (from the repository root)
#   docker run -p 8000:8000 -e API_KEYS=sk-... -e CHATSERVE_BACKEND=service-host:50051 chatserve/gateway:0.1.0
#
# Keys: API_KEYS (comma-separated), or a mounted file named by CHATSERVE_API_KEYS_FILE (re-read when it changes).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, read from pyproject.toml alone, so that a change to the sources does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gateway']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the gateway image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without a runAsUser of its own.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/chatserve --shell /usr/sbin/nologin chatserve \
 && mkdir -p /var/lib/chatserve && chown 10001:10001 /var/lib/chatserve
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/chatserve-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATSERVE_HOST=0.0.0.0 \
    CHATSERVE_PORT=8000 \
    CHATSERVE_LOG_JSON=1 \
    CHATSERVE_RESPONSES_STORE=/var/lib/chatserve/responses.sqlite3
USER 10001:10001
WORKDIR /home/chatserve
# 8000: the OpenAI API, /health, /livez and /metrics.
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/usr/local/bin/chatserve-healthcheck", "http"]
# Python is PID 1 and handles SIGTERM itself: open streams get CHATSERVE_SHUTDOWN_GRACE (30 s) to finish.
ENTRYPOINT ["python", "-m", "gateway"]
