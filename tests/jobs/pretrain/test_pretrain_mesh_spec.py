"""spec.parallelism's device mesh: the same impossible meshes are refused by `lmforge validate` (pydantic,
naming the field) and by the CRD's CEL rules (the API server), and the possible ones pass both."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from crdcheck import admission_errors

from lmforge_jobs.manifest import parse_resource

BASE: dict[str, Any] = {
    "apiVersion": "lmforge.io/v1alpha1",
    "kind": "PretrainRun",
    "metadata": {"name": "mesh"},
    "spec": {
        "data": {"tokens": "/data/tokens", "tokenizer": "/data/tokenizer"},
        "model": {"layers": 4, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 32},
        "budget": {"steps": 10},
        "optimizer": {"warmupSteps": 2},
        "batch": {"globalTokens": 2048, "microBatchSize": 8},
        "parallelism": {"nodes": 2, "gpusPerNode": 4, "strategy": "fsdp"},
    },
}


def _doc(**changes: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for section, values in changes.items():
        doc["spec"].setdefault(section, {}).update(values)
    return doc


def _pydantic_field(doc: dict[str, Any]) -> str | None:
    resource, problems = parse_resource(doc)
    if resource is not None:
        return None
    return problems[0].field


VALID = [
    {},  # FSDP over 8
    {"parallelism": {"tensorParallel": 2}},  # dataParallelShard 4 implied
    {"parallelism": {"tensorParallel": 2, "dataParallelShard": 2, "dataParallelReplicate": 2}},
    {"parallelism": {"pipelineParallel": 2, "tensorParallel": 2}},
    {"parallelism": {"pipelineParallel": 2, "pipelineSchedule": "Interleaved1F1B", "microBatches": 4}},
    {"parallelism": {"contextParallel": 2}},
    {"parallelism": {"nodes": 1, "gpusPerNode": 0, "strategy": "ddp"}},
    {"parallelism": {"gpusPerNode": 1, "strategy": "ddp"}},
    {"parallelism": {"nodes": 1, "gpusPerNode": 0}},  # one CPU process: a mesh of one
    {"parallelism": {"tensorParallel": 2, "asyncTensorParallel": True}},
    {"parallelism": {"asyncTensorParallel": False}},
]

INVALID = [
    # the degrees do not fit the 8 processes
    ({"parallelism": {"tensorParallel": 3}}, "parallelism.tensorParallel", "must divide nodes × gpusPerNode"),
    (
        {"parallelism": {"tensorParallel": 2, "dataParallelShard": 2}},
        "parallelism.dataParallelShard",
        "must equal nodes × gpusPerNode",
    ),
    ({"parallelism": {"strategy": "ddp", "tensorParallel": 2}}, "parallelism.strategy", "need strategy fsdp"),
    (
        {"parallelism": {"strategy": "ddp", "dataParallelShard": 8}},
        "parallelism.strategy",
        "need strategy fsdp",
    ),
    # the model cannot be cut that way
    (
        {"parallelism": {"tensorParallel": 4}},
        "parallelism.tensorParallel",
        "must be divisible by parallelism.tensorParallel",
    ),  # kvHeads 2
    (
        {"parallelism": {"tensorParallel": 2}, "model": {"ffnHidden": 191}},
        "parallelism.tensorParallel",
        "ffnHidden",
    ),
    (
        {"parallelism": {"pipelineParallel": 8}},
        "parallelism.pipelineParallel",
        "model.layers must be divisible",
    ),
    (
        {"parallelism": {"pipelineParallel": 4, "pipelineSchedule": "ZBVZeroBubble"}},
        "parallelism.pipelineParallel",
        "model.layers must be divisible",
    ),  # 4 layers, 4 ranks × 2 chunks
    (
        {
            "parallelism": {"contextParallel": 4},
            "model": {"seqLen": 36},
            "batch": {"globalTokens": 36 * 8 * 2},
        },
        "model.seqLen",
        "2 × parallelism",
    ),
    (
        {"parallelism": {"pipelineParallel": 2}, "model": {"tieEmbeddings": True}},
        "model.tieEmbeddings",
        "stages",
    ),
    (
        {"parallelism": {"tensorParallel": 2}, "model": {"tieEmbeddings": True}},
        "model.tieEmbeddings",
        "split along different dimensions",
    ),
    (
        {"parallelism": {"pipelineParallel": 2, "microBatches": 3}},
        "parallelism.microBatches",
        "must divide batch.microBatchSize",
    ),
    (
        {"parallelism": {"pipelineParallel": 4, "microBatches": 2}},
        "parallelism.microBatches",
        "at least pipelineParallel",
    ),
    (
        {"parallelism": {"tensorParallel": 2}, "model": {"architecture": "encoder"}},
        "parallelism",
        "decoder only",
    ),
    # async tensor parallel overlaps TP collectives inside compiled graphs
    (
        {"parallelism": {"asyncTensorParallel": True}},
        "parallelism.asyncTensorParallel",
        "needs tensorParallel > 1",
    ),
    (
        {"parallelism": {"tensorParallel": 2, "asyncTensorParallel": True, "compile": False}},
        "parallelism.asyncTensorParallel",
        "compile true",
    ),
    # the global batch is split over the data-parallel ranks only
    (
        {"parallelism": {"tensorParallel": 2}, "batch": {"globalTokens": 32 * 8 * 2}},
        "batch.globalTokens",
        "data-parallel ranks",
    ),
]


@pytest.mark.parametrize("changes", VALID)
def test_possible_meshes_pass_validate_and_the_api_server(changes: dict[str, Any]) -> None:
    doc = _doc(**changes)
    assert _pydantic_field(doc) is None
    assert admission_errors(doc) == []


@pytest.mark.parametrize(("changes", "field", "message"), INVALID)
def test_impossible_meshes_are_refused_twice_naming_the_field(
    changes: dict[str, Any], field: str, message: str
) -> None:
    doc = _doc(**changes)
    assert _pydantic_field(doc) == f"spec.{field}"
    errors = admission_errors(doc)
    assert errors, "the CEL twin lets it through"
    assert any(e.startswith(f".spec.{field}:") and message in e for e in errors), errors


def test_the_data_parallel_degree_is_what_the_other_degrees_leave() -> None:
    resource, _ = parse_resource(_doc(parallelism={"tensorParallel": 2, "pipelineParallel": 2}))
    assert resource is not None
    par = resource.spec.parallelism
    assert par.world_size == 8 and par.data_parallel_degree == 2 and par.pipeline_micro_batches == 2


# ------------------------------------------------------------------------------ what needs a GPU (runtime)
def test_fp8_and_context_parallel_are_refused_on_the_cpu_naming_the_field() -> None:
    import torch

    from lmforge_jobs.entry import ConfigError
    from lmforge_jobs.pretrain.parallelize import MeshDims, check_gpu_only

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError) as refused:
        check_gpu_only(MeshDims(), "fp8", cpu)
    assert refused.value.field == "precision" and "torchao" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        check_gpu_only(MeshDims(cp=2, fsdp=True), "bf16", cpu)
    assert refused.value.field == "parallelism.contextParallel" and "CUDA" in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        check_gpu_only(MeshDims(tp=2, fsdp=True), "bf16", cpu, async_tp=True)
    assert refused.value.field == "parallelism.asyncTensorParallel" and "CUDA" in str(refused.value)
    check_gpu_only(MeshDims(tp=2, fsdp=True), "bf16", cpu)  # tensor parallel runs on gloo


def test_async_tensor_parallel_turns_on_inductor_micro_pipelining(monkeypatch) -> None:
    import torch._inductor.config as inductor_config

    from lmforge_jobs.pretrain import parallelize

    groups: list[str] = []

    class Group:
        group_name = "tp-group"

    class Mesh:
        def get_group(self) -> Group:
            return Group()

    import torch.distributed._symmetric_memory as symm

    monkeypatch.setattr(inductor_config, "_micro_pipeline_tp", False)
    monkeypatch.setattr(symm, "enable_symm_mem_for_group", groups.append)
    parallelize.enable_async_tp(Mesh())
    assert inductor_config._micro_pipeline_tp is True
    assert groups == ["tp-group"]


def test_fp8_is_a_pretrain_precision_only() -> None:
    doc = _doc()
    doc["spec"]["precision"] = "fp8"
    assert _pydantic_field(doc) is None and admission_errors(doc) == []


def test_the_mesh_tells_each_rank_its_data_parallel_coordinate() -> None:
    from lmforge_jobs.pretrain.parallelize import MeshDims

    dims = MeshDims(pp=2, dp_shard=2, tp=2, fsdp=True)
    # row-major over (pp, dp_replicate, dp_shard, cp, tp): tp neighbours read the same data
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert dims.coordinate(5) == {"tp": 1, "cp": 0, "dp_shard": 0, "dp_replicate": 0, "pp": 1}
