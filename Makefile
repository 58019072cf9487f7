# The two commands: `make run` serves, `make test` tests. Everything else is a helper of those two.
PYTHON ?= python3.11
VENV ?= .venv
SGLANG_VENV ?= .venv-sglang
PY := $(VENV)/bin/python
SGLANG_PY := $(SGLANG_VENV)/bin/python
STAMP := $(VENV)/.layered-on
SGLANG_STAMP := $(SGLANG_VENV)/.layered-on
GATEWAY_PORT ?= 8000
GRPC_PORT ?= 50051
METRICS_PORT ?= 9090
# The engine `make run` serves with: transformers (the CPU default) or sglang (SGLang's CPU engine here, CUDA on GPUs).
ENGINE ?= transformers
SERVICE_ARGS ?=
GATEWAY_ARGS ?=

.PHONY: run test test-fast test-unit test-sglang bench proto check-proto model clean

# The environments are built by deploy/envs.py from pyproject.toml, once per set of requirements, under
# ~/.cache/chatserve/envs (CHATSERVE_ENV_ROOT), and shared by every checkout; .venv and .venv-sglang are small
# layers on them that import this checkout's code. See deploy/envs.py for the pins and why.
$(STAMP): pyproject.toml deploy/envs.py
	$(PYTHON) deploy/envs.py main $(VENV)

# sglang and its CUDA libraries (~11 GB, 6-11 minutes the first time): SGLang's engine runs on this CPU.
$(SGLANG_STAMP): pyproject.toml deploy/envs.py
	$(PYTHON) deploy/envs.py sglang $(SGLANG_VENV)

model: $(STAMP)
	$(PY) -m service.engines.default_model

ifeq ($(ENGINE),sglang)
RUN_DEPS := $(SGLANG_STAMP)
RUN_PY := $(SGLANG_PY)
else
RUN_DEPS :=
RUN_PY := $(PY)
endif

run: $(STAMP) model $(RUN_DEPS)
	$(RUN_PY) deploy/run_local.py --gateway-port $(GATEWAY_PORT) --grpc-port $(GRPC_PORT) \
		--gateway-args '$(GATEWAY_ARGS)' -- --engine $(ENGINE) --metrics-port $(METRICS_PORT) $(SERVICE_ARGS)

# pytest exits 5 when it collects no test: for this suite that is a broken run, never a pass.
PYTEST_RC = rc=$$?; if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests; failing" >&2; exit 1; fi; [ $$rc -eq 0 ] || exit $$rc

# Everything: unit, integration, and the e2e suite against both engines (the transformers engine, and SGLang's CPU
# engine running the same assertions), then the SGLang contract tests in the sglang environment.
test: $(STAMP) $(SGLANG_STAMP) model browser
	@CHATSERVE_TEST_ENGINES=transformers,sglang CHATSERVE_SGLANG_PYTHON=$(CURDIR)/$(SGLANG_PY) \
		$(PY) -m pytest -q tests --ignore=tests/contract_sglang; $(PYTEST_RC)
	@$(SGLANG_PY) -m pytest -q -m sglang tests/contract_sglang; $(PYTEST_RC)

# The playground's browser tests drive Debian's chromium and chromedriver; installed with apt when missing (as root,
# or with sudo). Where that cannot be done the browser tests skip, saying why.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver \
	  || echo "WARNING: could not install chromium and chromium-driver: the browser tests will be skipped" >&2; }

# For everyday iteration: everything on the transformers engine, without the SGLang tier (~5 min).
test-fast: $(STAMP) model browser
	@CHATSERVE_TEST_ENGINES=transformers $(PY) -m pytest -q tests --ignore=tests/contract_sglang; $(PYTEST_RC)

test-unit: $(STAMP)
	@$(PY) -m pytest -q tests/unit; $(PYTEST_RC)

# The SGLang tier alone: its contract tests against the real package, and the e2e suite on SGLang's engine.
test-sglang: $(STAMP) $(SGLANG_STAMP) model
	@$(SGLANG_PY) -m pytest -q -m sglang tests/contract_sglang; $(PYTEST_RC)
	@CHATSERVE_TEST_ENGINES=sglang CHATSERVE_SGLANG_PYTHON=$(CURDIR)/$(SGLANG_PY) $(PY) -m pytest -q tests/e2e; $(PYTEST_RC)

# Benchmarks (bench/README.md). `make bench` runs every scenario of the performance targets and writes
# bench/results/suite-<time>/REPORT.md with its tables and charts, both engines side by side (`make bench
# BENCH_QUICK=1`: 7.7 min on 2 cores). `make bench-soak` holds load through the gateway for SOAK_MINUTES and reports
# memory and latency drift. Neither is part of `make test`: they measure, they do not pass or fail.
SOAK_MINUTES ?= 10
# The real model, with a quarter of the clients hanging up mid-stream (a steady cancellation storm).
SOAK_ENGINE ?= transformers
SOAK_HANGUPS ?= 0.25
.PHONY: bench-soak

# The peers the product is measured against (bench/peers.py), each in its own environment: vLLM's CPU build and SGLang's
# Rust gateway SMG (SGLang itself runs in .venv-sglang, transformers serve in .venv).
VLLM_VENV ?= .venv-vllm
SMG_VENV ?= .venv-smg
LLAMACPP_VENV ?= .venv-llamacpp
PEER_STAMPS := $(VLLM_VENV)/.layered-on $(SMG_VENV)/.layered-on $(LLAMACPP_VENV)/.layered-on
$(VLLM_VENV)/.layered-on: deploy/envs.py
	$(PYTHON) deploy/envs.py vllm $(VLLM_VENV)
$(SMG_VENV)/.layered-on: deploy/envs.py
	$(PYTHON) deploy/envs.py smg $(SMG_VENV)
$(LLAMACPP_VENV)/.layered-on: deploy/envs.py
	$(PYTHON) deploy/envs.py llamacpp $(LLAMACPP_VENV)

bench: $(STAMP) $(SGLANG_STAMP) $(PEER_STAMPS) model
	CHATSERVE_SGLANG_PYTHON=$(CURDIR)/$(SGLANG_PY) $(PY) -m bench.suite $(if $(BENCH_QUICK),--quick,)

# Only the side-by-side table: ours (both engines) next to vLLM, SGLang, transformers serve and SMG (~35 min; with
# BENCH_QUICK=1 one round of half the requests).
.PHONY: bench-peers
bench-peers: $(STAMP) $(SGLANG_STAMP) $(PEER_STAMPS) model
	CHATSERVE_SGLANG_PYTHON=$(CURDIR)/$(SGLANG_PY) $(PY) -m bench.peers $(if $(BENCH_QUICK),--quick --rounds 1,)

bench-soak: $(STAMP) model
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --engine $(SOAK_ENGINE) --hangup-fraction $(SOAK_HANGUPS)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/generate/v1/generate.proto

# The checkout's layers only; the shared environments stay in ~/.cache/chatserve/envs for other checkouts.
clean:
	rm -rf $(VENV) $(SGLANG_VENV) $(VLLM_VENV) $(SMG_VENV) $(LLAMACPP_VENV) .pytest_cache
