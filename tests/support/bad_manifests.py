"""One bad manifest per spec rule (CASES: name, kind, the change to a valid BASE manifest, the field the
refusal must name, whether the CRD refuses it too). tests/operator/test_invalid_manifests.py checks every
case in `lmforge validate` and the CRD; the kmock tests pick some for the operator's Invalid condition."""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, dict[str, Any]] = {
    "Corpus": {
        "sources": [{"jsonl": {"paths": ["/data/a.jsonl"]}}],
        "filters": [{"url": {}}, {"language": {"modelPath": "/models/lid.176.bin"}}],
        "output": "/out",
    },
    "PretrainRun": {
        "corpus": {"name": "web"},
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 64},
        "budget": {"steps": 1000},
        "batch": {"globalTokens": 4096, "microBatchSize": 8},
        "parallelism": {"nodes": 1, "gpusPerNode": 8},
    },
    "AlignmentRun": {
        "base": {"pretrainRun": "gpt"},
        "method": "dpo",
        "dataset": {"path": "/data/prefs.jsonl", "format": "preference"},
    },
    "Evaluation": {"model": {"alignmentRun": "gpt-dpo"}, "perplexity": {"corpus": {"name": "web"}}},
}

DELETE = object()


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
    node: Any = doc
    for part in parts[:-1]:
        node = node[part]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


def manifest(kind: str, patch: dict[str, Any], name: str = "bad") -> dict[str, Any]:
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": copy.deepcopy(BASE[kind]),
    }
    for path, value in patch.items():
        _set(doc, path, value)
    return doc


# (id, kind, patch, field named in the error, checked by the CRD?)
CASES: list[tuple[str, str, dict[str, Any], str, bool]] = [
    # ranges, enums, required fields: the OpenAPI schema
    ("no-sources", "Corpus", {"spec.sources": []}, "spec.sources", True),
    ("held-out-fraction", "Corpus", {"spec.heldOutFraction": 1.5}, "spec.heldOutFraction", True),
    (
        "vocab-too-small",
        "Corpus",
        {"spec.tokenizer": {"train": {"vocabSize": 100}}},
        "spec.tokenizer.train.vocabSize",
        True,
    ),
    (
        "language-score",
        "Corpus",
        {"spec.filters[1].language.minScore": 2},
        "spec.filters[1].language.minScore",
        True,
    ),
    (
        "language-model-missing",
        "Corpus",
        {"spec.filters[1].language.modelPath": DELETE},
        "spec.filters[1].language.modelPath",
        True,
    ),
    ("zero-tasks", "Corpus", {"spec.parallelism": {"tasks": 0}}, "spec.parallelism.tasks", True),
    ("extract-method", "Corpus", {"spec.extract": {"method": "magic"}}, "spec.extract.method", True),
    ("empty-paths", "Corpus", {"spec.sources[0].jsonl.paths": []}, "spec.sources[0].jsonl.paths", True),
    ("memory-quantity", "Corpus", {"spec.resources": {"memory": "lots"}}, "spec.resources.memory", True),
    ("seq-len", "PretrainRun", {"spec.model.seqLen": 4}, "spec.model.seqLen", True),
    ("lr-too-big", "PretrainRun", {"spec.optimizer": {"lr": 1.5}}, "spec.optimizer.lr", True),
    ("lr-zero", "PretrainRun", {"spec.optimizer": {"lr": 0}}, "spec.optimizer.lr", True),
    (
        "min-lr-ratio",
        "PretrainRun",
        {"spec.optimizer": {"minLrRatio": 1.5}},
        "spec.optimizer.minLrRatio",
        True,
    ),
    ("architecture", "PretrainRun", {"spec.model.architecture": "rnn"}, "spec.model.architecture", True),
    ("precision", "PretrainRun", {"spec.precision": "fp16"}, "spec.precision", True),
    ("strategy", "PretrainRun", {"spec.parallelism.strategy": "zero3"}, "spec.parallelism.strategy", True),
    ("schedule", "PretrainRun", {"spec.optimizer": {"schedule": "step"}}, "spec.optimizer.schedule", True),
    ("zero-layers", "PretrainRun", {"spec.model.layers": 0}, "spec.model.layers", True),
    ("unknown-field", "PretrainRun", {"spec.model.bogus": 1}, "spec.model.bogus", True),
    ("method", "AlignmentRun", {"spec.method": "rlhf"}, "spec.method", True),
    (
        "lora-dropout",
        "AlignmentRun",
        {"spec.peft": {"lora": {"dropout": 1.5}}},
        "spec.peft.lora.dropout",
        True,
    ),
    (
        "batch-size",
        "AlignmentRun",
        {"spec.hyperparameters": {"batchSize": 0}},
        "spec.hyperparameters.batchSize",
        True,
    ),
    ("checkpoints-enum", "Evaluation", {"spec.checkpoints": "sometimes"}, "spec.checkpoints", True),
    ("model-missing", "Evaluation", {"spec.model": DELETE}, "spec.model", True),
    # cross-field rules: pydantic validators and CEL
    ("hidden-heads", "PretrainRun", {"spec.model.hidden": 66}, "spec.model.hidden", True),
    ("heads-kv-heads", "PretrainRun", {"spec.model.kvHeads": 3}, "spec.model.kvHeads", True),
    ("kv-heads-above-heads", "PretrainRun", {"spec.model.kvHeads": 8}, "spec.model.kvHeads", True),
    ("budget-two", "PretrainRun", {"spec.budget": {"tokens": 1000, "steps": 5}}, "spec.budget.steps", True),
    ("budget-none", "PretrainRun", {"spec.budget": {}}, "spec.budget.tokens", True),
    (
        "corpus-and-data",
        "PretrainRun",
        {"spec.data": {"tokens": "/t", "tokenizer": "/tok.json"}},
        "spec.data",
        True,
    ),
    ("no-corpus-no-data", "PretrainRun", {"spec.corpus": DELETE}, "spec.corpus", True),
    ("batch-divisible", "PretrainRun", {"spec.batch.globalTokens": 4000}, "spec.batch.globalTokens", True),
    ("vocab-size-word", "PretrainRun", {"spec.model.vocabSize": "big"}, "spec.model.vocabSize", True),
    ("vocab-size-small", "PretrainRun", {"spec.model.vocabSize": 100}, "spec.model.vocabSize", True),
    ("decoder-layers", "PretrainRun", {"spec.model.decoderLayers": 2}, "spec.model.decoderLayers", True),
    (
        "init-two",
        "PretrainRun",
        {"spec.model.init": {"huggingface": "org/m", "path": "/m"}},
        "spec.model.init.path",
        True,
    ),
    (
        "ppo-no-reward",
        "AlignmentRun",
        {"spec.method": "ppo", "spec.dataset.format": "prompts"},
        "spec.rewardModel",
        True,
    ),
    (
        "dpo-with-reward",
        "AlignmentRun",
        {"spec.rewardModel": {"alignmentRun": "rm"}},
        "spec.rewardModel",
        True,
    ),
    ("dpo-messages", "AlignmentRun", {"spec.dataset.format": "messages"}, "spec.dataset.format", True),
    ("sft-preference", "AlignmentRun", {"spec.method": "sft"}, "spec.dataset.format", True),
    (
        "ppo-preference",
        "AlignmentRun",
        {"spec.method": "ppo", "spec.rewardModel": {"alignmentRun": "rm"}},
        "spec.dataset.format",
        True,
    ),
    (
        "reward-prompts",
        "AlignmentRun",
        {"spec.method": "reward", "spec.dataset.format": "prompts"},
        "spec.dataset.format",
        True,
    ),
    (
        "peft-two",
        "AlignmentRun",
        {"spec.peft": {"lora": {}, "promptTuning": {}}},
        "spec.peft.promptTuning",
        True,
    ),
    ("base-two", "AlignmentRun", {"spec.base.huggingface": "org/model"}, "spec.base.huggingface", True),
    ("base-none", "AlignmentRun", {"spec.base": {}}, "spec.base.pretrainRun", True),
    (
        "synthetic-dpo",
        "AlignmentRun",
        {"spec.synthetic": {"teacher": {"huggingface": "org/t"}, "prompts": "/p.jsonl"}},
        "spec.synthetic",
        True,
    ),
    ("no-dataset", "AlignmentRun", {"spec.dataset": DELETE}, "spec.dataset", True),
    (
        "source-two-kinds",
        "Corpus",
        {"spec.sources[0].parquet": {"paths": ["/p.parquet"]}},
        "spec.sources[0].parquet",
        True,
    ),
    ("source-no-kind", "Corpus", {"spec.sources[0]": {}}, "spec.sources[0].warc", True),
    (
        "tokenizer-two",
        "Corpus",
        {"spec.tokenizer": {"train": {}, "pretrained": {"path": "/t.json"}}},
        "spec.tokenizer.pretrained",
        True,
    ),
    ("tokenizer-none", "Corpus", {"spec.tokenizer": {}}, "spec.tokenizer.train", True),
    (
        "workers-above-tasks",
        "Corpus",
        {"spec.parallelism": {"tasks": 2, "workers": 4}},
        "spec.parallelism.workers",
        True,
    ),
    (
        "filter-two-kinds",
        "Corpus",
        {"spec.filters[0].regex": {"pattern": "x"}},
        "spec.filters[0].regex",
        True,
    ),
    ("filter-no-kind", "Corpus", {"spec.filters[0]": {}}, "spec.filters[0].url", True),
    (
        "gopher-min-max",
        "Corpus",
        {"spec.filters": [{"gopherQuality": {"minDocWords": 500, "maxDocWords": 100}}]},
        "spec.filters[0].gopherQuality.minDocWords",
        True,
    ),
    ("nothing-to-evaluate", "Evaluation", {"spec.perplexity": DELETE}, "spec.perplexity", True),
    ("every-needs-pretrain", "Evaluation", {"spec.checkpoints": "every"}, "spec.checkpoints", True),
    (
        "benchmark-two",
        "Evaluation",
        {"spec.benchmarks": [{"task": "hellaswag", "taskPath": "/t.yaml"}]},
        "spec.benchmarks[0].taskPath",
        True,
    ),
    ("perplexity-two", "Evaluation", {"spec.perplexity.data": "/held-out"}, "spec.perplexity.data", True),
    (
        "judge-two",
        "Evaluation",
        {
            "spec.judge": {
                "model": {"huggingface": "org/j", "path": "/j"},
                "reference": {"pretrainRun": "gpt"},
                "prompts": "/p.jsonl",
            }
        },
        "spec.judge.model.path",
        True,
    ),
    (
        "arena-no-judge",
        "Evaluation",
        {"spec.arena": {"opponents": [{"huggingface": "org/m"}]}},
        "spec.arena",
        True,
    ),
    (
        "secret-inline",
        "PretrainRun",
        {"spec.export": {"push": {"repo": "org/m", "token": "hf_secret"}}},
        "spec.export.push.token",
        True,
    ),
    # quantities, GPUs, images, step counts and URIs a pod would only fail on
    ("cpu-zero", "Corpus", {"spec.resources": {"cpu": "0"}}, "spec.resources.cpu", True),
    ("cpu-int-zero", "Evaluation", {"spec.resources": {"cpu": 0}}, "spec.resources.cpu", True),
    (
        "memory-negative",
        "PretrainRun",
        {"spec.resources": {"memory": "-16Gi"}},
        "spec.resources.memory",
        True,
    ),
    (
        "disk-zero",
        "AlignmentRun",
        {"spec.resources": {"ephemeralStorage": "0Gi"}},
        "spec.resources.ephemeralStorage",
        True,
    ),
    ("gpu-not-gpus-per-node", "PretrainRun", {"spec.resources": {"gpu": 4}}, "spec.resources.gpu", True),
    ("gpu-default-parallelism", "Evaluation", {"spec.resources": {"gpu": 2}}, "spec.resources.gpu", True),
    ("image-spaces", "AlignmentRun", {"spec.image": "ghcr.io/org/jobs:1.0 --privileged"}, "spec.image", True),
    ("image-upper-case", "Corpus", {"spec.image": "ghcr.io/Org/Jobs:1.0"}, "spec.image", True),
    ("steps-absurd", "PretrainRun", {"spec.budget": {"steps": 10**12}}, "spec.budget.steps", True),
    (
        "align-steps-absurd",
        "AlignmentRun",
        {"spec.hyperparameters": {"maxSteps": 10**12}},
        "spec.hyperparameters.maxSteps",
        True,
    ),
    (
        "warmup-beyond-run",
        "PretrainRun",
        {"spec.optimizer": {"warmupSteps": 2000}},
        "spec.optimizer.warmupSteps",
        True,
    ),
    (
        "url-credentials",
        "AlignmentRun",
        {"spec.dataset.path": "https://user:hunter2@example.com/prefs.jsonl"},
        "spec.dataset.path",
        True,
    ),
    ("s3-credentials", "Corpus", {"spec.output": "s3://AKIA:secret@bucket/out"}, "spec.output", True),
    ("pvc-dotdot", "Corpus", {"spec.output": "pvc://data/corpora/../../etc"}, "spec.output", True),
    ("pvc-claim-name", "Evaluation", {"spec.output": "pvc://Data_Claim/x"}, "spec.output", True),
    # Python regular expressions cannot be compiled by CEL: refused by lmforge validate and the operator only
    (
        "regex-invalid",
        "Corpus",
        {"spec.filters": [{"regex": {"pattern": "(unclosed"}}]},
        "spec.filters[0].regex.pattern",
        False,
    ),
]
