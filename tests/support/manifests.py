"""lmforge resources as tests write them: the document around a spec, written as a manifest file, and
the tiny CPU PretrainRun the job tests train (2 layers × 64 wide, fp32, one process, no compile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

API_VERSION = "lmforge.io/v1alpha1"

# What the operator tests create in kmock (the operator never reads the data: the URIs are made up).
PRETRAIN = {
    "data": {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 64},
    "budget": {"steps": 200},
    "batch": {"globalTokens": 4096, "microBatchSize": 8},
    "parallelism": {"nodes": 1, "gpusPerNode": 1},
    "checkpoint": {"everySteps": 50},
    "output": "s3://bucket/runs/gpt",
}
CORPUS = {
    "sources": [{"jsonl": {"paths": ["s3://bucket/raw/*.jsonl"]}}],
    "dedup": {"exact": False, "minhash": {"enabled": False}},
    "tokenizer": {"train": {"vocabSize": 4096}},
    "output": "s3://bucket/corpora/web",
    "parallelism": {"tasks": 4, "workers": 2},
}

# What the builder tests render (nothing runs): a PretrainRun "gpt" on 2 nodes × 4 GPUs and a Corpus "web",
# data and outputs in a bucket.
BUILT_PRETRAIN = {
    "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, "vocabSize": 512},
    "budget": {"steps": 1000},
    "batch": {"globalTokens": 8192, "microBatchSize": 4},
    "parallelism": {"nodes": 2, "gpusPerNode": 4},
    "output": "s3://bucket/runs/gpt",
}
BUILT_CORPUS = {
    "sources": [{"jsonl": {"paths": ["s3://bucket/docs/*.jsonl.gz"]}}],
    "dedup": {"exact": True},
    "output": "s3://bucket/corpora/web",
    "parallelism": {"tasks": 8, "workers": 3},
    "resources": {"cpu": "2", "memory": "4Gi"},
}

# An Evaluation of every checkpoint of the PretrainRun "gpt", as it lands.
EVERY_CHECKPOINT = {
    "model": {"pretrainRun": "gpt"},
    "checkpoints": "every",
    "benchmarks": [{"task": "hellaswag"}],
    "output": "s3://b/evals/gpt",
}


def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The document of one lmforge resource."""
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def write_manifest(path: Path, kind: str, name: str, spec: dict[str, Any], **dump: Any) -> Path:
    """Write one resource to ``path`` (YAML, UTF-8) and return the path."""
    path.write_text(yaml.safe_dump(resource(kind, name, spec), **dump), encoding="utf-8")
    return path


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``: a dict given for a dict field is merged into it, anything else replaces."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def tiny_pretrain(data: dict[str, str], output: Path | str, /, **changes: Any) -> dict[str, Any]:
    """A PretrainRun spec that trains in seconds on CPU (8 steps of 1024 tokens), with ``changes`` (which
    may name ``data`` or ``output`` too)."""
    base: dict[str, Any] = {
        "data": dict(data),
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 32},
        "budget": {"steps": 8},
        "optimizer": {"lr": 3.0e-3, "warmupSteps": 2},
        "batch": {"globalTokens": 1024, "microBatchSize": 8},
        "precision": "fp32",
        "parallelism": {"nodes": 1, "gpusPerNode": 0, "compile": False},
        "checkpoint": {"everySteps": 4, "keep": 2},
        "eval": {"everySteps": 4, "batches": 2},
        "output": str(output),
    }
    return merged(base, changes)
