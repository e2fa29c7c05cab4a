# Two commands on a fresh machine: `make demo` and `make test`. Every target is idempotent:
# set-up steps are stamped and re-run only when their inputs change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROTOS := $(wildcard proto/liverec/v1/*.proto)
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_PROTO := liverec/v1/.proto-stamp
PYTEST_ARGS ?=

.PHONY: setup proto demo test test-cuda bench clean broker system-deps

setup: $(STAMP_DEPS) $(STAMP_PROTO)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch, then fbgemm-gpu-cpu, then torchrec without its deps (DESIGN.md "Dependencies that need care").
$(STAMP_DEPS): $(VENV)/bin/python requirements/lock.txt pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install fbgemm-gpu-cpu==1.8.0
	$(PIP) install --no-deps torchrec==1.8.0
	$(PIP) install -r requirements/lock.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(STAMP_PROTO): $(STAMP_DEPS) $(PROTOS) liverec/platform/protogen.py
	$(PY) -m liverec.platform.protogen
	touch $@

proto: $(STAMP_PROTO)

system-deps:
	bash .ci/system-deps
	bash .ci/system-deps-k8s

demo: setup
	$(VENV)/bin/liverec demo

NODE_DEPS := tests/serving/node/node_modules

# The gRPC interop test's Node.js client (@grpc/grpc-js, @grpc/proto-loader), pinned by its lock file.
$(NODE_DEPS): tests/serving/node/package-lock.json
	cd tests/serving/node && npm ci --no-audit --no-fund && touch node_modules

# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning (see liverec/platform/cli.py).
test: setup system-deps $(NODE_DEPS)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/pytest $(PYTEST_ARGS)

# On the device machine (its image's python3 has torch + Triton; no set-up there): the CUDA kernels,
# the store against the CPU reference, and the serving scorer. --confcutdir: the root conftest needs
# the broker stack. The scorer imports the generated stubs and grpcio: carry liverec/v1 (made by
# `make proto` here) and the grpcio/protobuf wheels (README, "GPU runs").
test-cuda:
	@test -d liverec/v1 || { echo "test-cuda: liverec/v1 is missing: run 'make proto' here and carry it"; exit 2; }
	PYTHONPATH=$${PYTHONPATH:+$$PYTHONPATH:}. python3 -m pytest --confcutdir=tests/cuda -p no:cacheprovider tests/cuda $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/liverec bench ingest
	$(VENV)/bin/liverec bench store --quick

broker: setup
	$(VENV)/bin/liverec broker

clean:
	rm -rf $(VENV) liverec/v1 .pytest_cache .hypothesis
