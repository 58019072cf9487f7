# syntax=docker/dockerfile:1
# The gRPC generation service on NVIDIA GPUs (`python -m service`, SGLang engine).
#
#   docker build -f deploy/docker/service-gpu.Dockerfile -t chatserve/service-gpu:0.1.0 .   (from the repository root)
#   docker run --gpus all --shm-size 16g -v /srv/models:/models:ro \
#       -e CHATSERVE_MODEL=/models/Qwen2.5-7B-Instruct -p 50051:50051 -p 9090:9090 chatserve/service-gpu:0.1.0
#
# Why the official SGLang image and not a CUDA base plus `pip install .[sglang]`: SGLang's speed comes from
# binaries that must match each other exactly (torch 2.14.1 for the right CUDA, sgl-kernel, flashinfer with its
# precompiled cubins, the NCCL build SGLang pins). The image SGLang publishes for a release is the combination
# its maintainers test; resolving the same set with pip on a bare CUDA image is a second, untested build of it,
# and without flashinfer's cubins every cold start JIT-compiles kernels for minutes. The cost is a large image
# (tens of GB) that runs as root by default: this file adds a non-root user and our package, nothing else.
#
# The tag must carry sglang 0.5.23 (the version the contract tests pin, see pyproject.toml's `sglang` extra) and
# a CUDA build the nodes' driver supports; SGLang tags releases as v<version>-cu<cuda>, e.g. v0.5.23-cu129.
# The build stops below if the image holds another sglang or a Python older than 3.11.
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23-cu129
FROM ${SGLANG_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -c "import sys; assert sys.version_info >= (3, 11), 'chatserve needs Python >= 3.11, the image has ' + sys.version" \
 && python3 -c "import importlib.metadata as m; v = m.version('sglang'); assert v == '0.5.23', 'the base image has sglang ' + v"
WORKDIR /opt/chatserve/src
COPY . .
# `.[sglang]` pins sglang==0.5.23, which the image already satisfies, so pip adds only what chatserve needs
# (grpcio-health-checking, grpcio-reflection, ...) and never swaps the image's torch or kernels. The import
# proves the committed protobuf stubs load with the protobuf that ends up installed.
RUN python3 -m pip install '.[sglang]' \
 && cd / && python3 -c "import sglang, generate.v1.generate_pb2, service.server" \
 && rm -rf /opt/chatserve/src

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/chatserve --shell /usr/sbin/nologin chatserve \
 && install -d -o 10001 -g 10001 /home/chatserve/.cache
COPY deploy/docker/healthcheck.py /usr/local/bin/chatserve-healthcheck
# HOME stays writable: triton, flashinfer and deep_gemm cache their JIT-compiled kernels under ~/.cache and ~/.triton.
ENV HOME=/home/chatserve \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CHATSERVE_ENGINE=sglang \
    CHATSERVE_GRPC_HOST=0.0.0.0 \
    CHATSERVE_GRPC_PORT=50051 \
    CHATSERVE_METRICS_HOST=0.0.0.0 \
    CHATSERVE_METRICS_PORT=9090 \
    CHATSERVE_LOG_JSON=1
USER 10001:10001
WORKDIR /home/chatserve
# 50051: generate.v1.Generate, grpc.health.v1.Health and reflection. 9090: Prometheus /metrics.
EXPOSE 50051 9090
# A large model takes minutes to load and capture CUDA graphs; health is NOT_SERVING until then.
HEALTHCHECK --interval=10s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "/usr/local/bin/chatserve-healthcheck", "grpc"]
# The SGLang image sets no entrypoint we want; ours runs the service as PID 1, which handles SIGTERM itself.
ENTRYPOINT ["python3", "-m", "service"]
