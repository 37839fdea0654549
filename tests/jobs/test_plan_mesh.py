"""The planner's memory per GPU under tensor, pipeline and context parallel, the pipeline bubble, and the
smallest mesh `lmforge plan --suggest` proposes."""

from __future__ import annotations

from typing import Any

import pytest

from lmforge_jobs.plan import bubble_fraction, plan_pretrain, suggest_mesh
from lmforge_jobs.pretrain.config import PretrainRunSpec

LLAMA_70B = {"layers": 80, "hidden": 8192, "heads": 64, "kvHeads": 8, "ffnHidden": 28672, "seqLen": 4096}


def _spec(parallelism: dict[str, Any], model: dict[str, Any] | None = None, mb: int = 2) -> PretrainRunSpec:
    return PretrainRunSpec.model_validate(
        {
            "data": {"tokens": "/d/t", "tokenizer": "/d/tok"},
            "model": {**(model or LLAMA_70B), "vocabSize": 128256},
            "budget": {"steps": 100},
            "batch": {"globalTokens": 4096 * 64 * 8, "microBatchSize": mb},
            "parallelism": {"nodes": 8, "gpusPerNode": 8, "strategy": "fsdp", **parallelism},
        }
    )


def test_tensor_parallel_splits_activations_and_logits_the_states_stay_spread_over_every_gpu() -> None:
    fsdp, tp = plan_pretrain(_spec({})), plan_pretrain(_spec({"tensorParallel": 8}))
    assert tp.mesh == {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 8}
    assert tp.memory.optimizer == pytest.approx(fsdp.memory.optimizer)  # 64 shards either way
    assert tp.memory.activations == pytest.approx(fsdp.memory.activations / 8)
    assert tp.memory.logits == pytest.approx(fsdp.memory.logits / 8)


def test_context_parallel_splits_the_sequence() -> None:
    fsdp, cp = plan_pretrain(_spec({})), plan_pretrain(_spec({"contextParallel": 4}))
    assert cp.memory.activations == pytest.approx(fsdp.memory.activations / 4)
    assert cp.memory.optimizer == pytest.approx(fsdp.memory.optimizer)  # FSDP shards over dp_shard × cp


def test_pipeline_parallel_holds_one_stage_with_its_pieces_in_flight_and_pays_a_bubble() -> None:
    fsdp = plan_pretrain(_spec({}))
    pp = plan_pretrain(_spec({"pipelineParallel": 2, "microBatches": 2}))
    # a stage holds 40 of 80 layers, and 1F1B keeps 2 pieces of 1 sequence in flight on the first stage:
    # half of micro-batch 2's activations per layer over half the layers, twice
    assert pp.memory.activations == pytest.approx(fsdp.memory.activations / 2, rel=1e-6)
    # half the blocks and one end of the embeddings, FSDP-sharded over the 32 ranks of its stage
    assert pp.memory.optimizer == pytest.approx(fsdp.memory.optimizer)
    assert pp.bubble_fraction == pytest.approx(1 / 3)
    assert pp.gpu_hours == pytest.approx(fsdp.gpu_hours / (1 - 1 / 3))


def test_bubble_fraction() -> None:
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)  # Narayanan et al. 2021
    assert bubble_fraction(4, 8, stages_per_rank=2) == pytest.approx(3 / 19)


def test_suggest_finds_the_smallest_mesh_that_fits_or_none() -> None:
    long_context = _spec({}, model={**LLAMA_70B, "seqLen": 32768}, mb=1)
    assert not plan_pretrain(long_context).fits
    found = suggest_mesh(long_context)
    assert found is not None
    mesh, planned = found
    # checkpointing alone is not enough at 32k tokens: the smallest model-parallel mesh that fits
    assert planned.fits and mesh["tensorParallel"] * mesh["pipelineParallel"] == 2
    assert plan_pretrain(long_context.model_copy(update={"parallelism": planned_parallelism(mesh)})).fits
    # 70B parameters' states alone (1.1 TB) do not fit in one node's 640 GB, whatever the mesh
    assert suggest_mesh(_spec({"nodes": 1}, mb=1)) is None


def planned_parallelism(mesh: dict[str, int]) -> Any:
    from lmforge_jobs.pretrain.config import TrainParallelism

    return TrainParallelism.model_validate(
        {
            "nodes": 8,
            "gpusPerNode": 8,
            "strategy": "fsdp",
            "tensorParallel": mesh["tensorParallel"],
            "pipelineParallel": mesh["pipelineParallel"],
            "activationCheckpointing": bool(mesh["activationCheckpointing"]),
        }
    )
