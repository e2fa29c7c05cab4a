# syntax=docker/dockerfile:1
#
# The liverec image: one image for every process (`liverec train`, `liverec serve`, the CLI).
#
#   docker build -t REGISTRY/liverec:0.1.0-cpu .                                # CPU torch
#   docker build --build-arg TORCH_VARIANT=cuda -t REGISTRY/liverec:0.1.0-cuda .  # CUDA torch (prod serving)
#
# NOT BUILT HERE: the development sandbox has no Docker engine, so this file is checked only by
# tests/k8s/test_k8s_dockerfile.py (stages, pins, non-root user, install order). Build it in CI.
#
# Base: an exact CPython patch release on Debian bookworm (the tag is the pin; for byte-for-byte
# reproducible builds add the digest your registry resolves: python:3.11.13-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/liverec
ENV PATH=/opt/liverec/bin:$PATH
WORKDIR /src

# torch, then fbgemm-gpu-cpu, then torchrec without its dependencies, as the Makefile does
# (DESIGN.md, "Dependencies that need care": plain `pip install torchrec` pulls the multi-GB CUDA
# fbgemm-gpu). CPU: the PyTorch CPU wheel index. CUDA: PyPI's Linux wheel, which brings the CUDA
# runtime as nvidia-* wheels, so the base stays a plain Python image; the node supplies the driver.
RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cpu)  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install torch==2.13.0 ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, got $TORCH_VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install fbgemm-gpu-cpu==1.8.0; \
    pip install --no-deps torchrec==1.8.0

# The exact pins of requirements/lock.txt, less the tools only the test suite uses.
COPY requirements/lock.txt requirements/lock.txt
RUN grep -viE '^(pytest|pytest[-_]timeout|hypothesis|iniconfig|pluggy|pygments|sortedcontainers|kubernetes[-_]validate|jsonschema|jsonschema[-_]specifications|referencing|rpds[-_]py|attrs|importlib[-_]resources)==' \
        requirements/lock.txt > /tmp/runtime-requirements.txt \
 && pip install -r /tmp/runtime-requirements.txt

# The package itself: generated protobuf/gRPC modules first, then a regular (non-editable) install.
COPY pyproject.toml README.md ./
COPY proto proto
COPY liverec liverec
COPY benchmarks benchmarks
RUN python -m liverec.platform.protogen \
 && pip install --no-deps . \
 && liverec --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# tcmalloc for every process. Under glibc's malloc the trainer's per-step temporaries (logits over
# the catalog, attention: 17-34 MB, a different size each step) fragment the heap: 3.5 GB resident
# after one pass over ml-100k, all but ~0.5 GB of it free; tcmalloc held that pass at 0.9 GB and
# ran it 17% faster (liverec/platform/heap.py; trainer.heap_trim_growth_mb is glibc's fallback).
# Linked at one path whatever the architecture; reports of large allocations silenced (the
# store's columns and checkpoints are legitimately GBs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4=2.10-1 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(echo /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4)" /usr/local/lib/libtcmalloc_minimal.so.4
RUN groupadd --system --gid 10001 liverec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin liverec
# Only the virtual environment: the installed package and its pinned dependencies.
COPY --from=build /opt/liverec /opt/liverec
# The root filesystem is read-only in Kubernetes: caches go to /tmp (an emptyDir there), state to
# the trainer.state_dir / serving.state_dir volumes.
ENV PATH=/opt/liverec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
WORKDIR /tmp
USER 10001:10001
# gRPC (serving.port), trainer metrics (trainer.metrics_port), serving metrics (serving.metrics_port)
EXPOSE 50051 9400 9401
ENTRYPOINT ["liverec"]
CMD ["--help"]
