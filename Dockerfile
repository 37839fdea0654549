# syntax=docker/dockerfile:1
# Two images from one source tree; the Helm chart's default values reference both (tag = chart appVersion):
#   docker build --target operator -t ghcr.io/lmforge/lmforge-operator:0.1.0 .   # kopf operator + CLI, no torch
#   docker build --target jobs     -t ghcr.io/lmforge/lmforge-jobs:0.1.0 .       # data, pretrain, align, evaluate (CUDA)
# The targets install disjoint extras: the operator's kubernetes client and the jobs' lm-eval need
# incompatible python-dateutil versions, so they never share an environment. Both run as UID/GID 10001,
# the user the chart's restricted securityContext names, and keep no writable state outside /tmp (operator)
# or /workspace (jobs), so they work with readOnlyRootFilesystem.

ARG PYTHON_IMAGE=python:3.11-slim
ARG PYTORCH_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

# ---------------------------------------------------------------------------------------------- wheel
# Builds the lmforge wheel once; the images install it with their own extras, so no source tree, build
# backend or compiler is left in them.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
RUN pip wheel --no-deps --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------- operator
FROM ${PYTHON_IMAGE} AS operator
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lmforge-operator" \
      org.opencontainers.image.description="lmforge operator: reconciles Corpus, PretrainRun, AlignmentRun and Evaluation resources" \
      org.opencontainers.image.source="https://github.com/lmforge/lmforge" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/lmforge-*.whl)[operator]" \
 && groupadd --gid 10001 lmforge \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lmforge

WORKDIR /tmp
USER 10001:10001
# Metrics (:8080/metrics) and liveness (:8081/healthz); the chart passes the ports and namespaces as args.
EXPOSE 8080 8081
ENTRYPOINT ["lmforge", "operator"]

# ------------------------------------------------------------------------------------------------ jobs
FROM ${PYTORCH_IMAGE} AS jobs
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lmforge-jobs" \
      org.opencontainers.image.description="lmforge jobs: corpus processing, pre-training, alignment and evaluation" \
      org.opencontainers.image.source="https://github.com/lmforge/lmforge" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/lmforge \
    HF_HOME=/workspace/.cache/huggingface \
    LMFORGE_METRICS_PORT=9400

# torch comes from the base image (it satisfies the train extra's torch>=2.6, so pip keeps it).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/lmforge-*.whl)[data,train,align,eval,arena,gcs,tracking]" \
 && groupadd --gid 10001 lmforge \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lmforge --shell /bin/bash lmforge \
 && mkdir -p /workspace \
 && chown 10001:10001 /workspace

WORKDIR /workspace
USER 10001:10001
# Prometheus endpoint of the job (the pod's container port "metrics"); torchrun's rendezvous uses 29400;
# the arena voting page (python -m lmforge_jobs.evaluate.human, arena extra) serves on 8080.
EXPOSE 9400 29400 8080
# Arguments are a module and its options; the operator's Jobs set the full command instead
# (python -m lmforge_jobs.data --manifest /etc/lmforge/spec.yaml --stage NAME, or torchrun ... -m ...).
ENTRYPOINT ["python", "-m"]
CMD ["lmforge_jobs.pretrain", "--help"]
