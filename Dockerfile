# syntax=docker/dockerfile:1
# Two images from one source tree:
#   docker build --target operator -t lmforge-operator .   # kopf operator + CLI, no torch
#   docker build --target jobs     -t lmforge-jobs .       # data, pretrain, align and evaluate jobs (CUDA)
# The targets install disjoint extras: the operator's kubernetes client and the jobs' lm-eval need
# incompatible python-dateutil versions, so they never share an environment.

# ------------------------------------------------------------------------------------------- operator
FROM python:3.11-slim AS operator

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
RUN pip install ".[operator]" \
 && rm -rf /src \
 && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin lmforge

WORKDIR /
USER 10001:10001
ENTRYPOINT ["lmforge", "operator"]

# ------------------------------------------------------------------------------------------------ jobs
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime AS jobs

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/.cache/huggingface

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY jobs ./jobs
# torch comes from the base image (it satisfies the train extra's torch>=2.6, so pip keeps it).
RUN pip install ".[data,train,align,eval]" \
 && rm -rf /src \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/lmforge --shell /bin/bash lmforge \
 && mkdir -p /workspace \
 && chown 10001:10001 /workspace

WORKDIR /workspace
USER 10001:10001
# Arguments are a module and its options, e.g. lmforge_jobs.data --manifest /config/corpus.yaml
ENTRYPOINT ["python", "-m"]
