"""The planner's communication volume per optimizer step, by mesh dimension, against values worked out by hand
for a tiny model: 2 layers × 64 wide, 4 heads (2 KV heads, head size 16), SwiGLU 192, vocabulary 512
untied, seq 32.

Parameters by hand: per layer q 64·64 + k 64·32 + v 64·32 + o 64·64 + gate/up/down 3·64·192 + 2 norms ·64
= 4096 + 2048 + 2048 + 4096 + 36864 + 128 = 49280; two layers 98560, the final norm 64 (non-embedding
98624); the embedding and the lm_head 512·64 each (65536). Total 164160.

A ring all-gather or reduce-scatter over n ranks of S bytes sends (n − 1)/n · S from each rank; an
all-reduce sends twice that.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmforge_jobs.plan import count_parameters, explain, plan_pretrain
from lmforge_jobs.pretrain.config import PretrainRunSpec

MODEL = {
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kvHeads": 2,
    "ffnHidden": 192,
    "seqLen": 32,
    "vocabSize": 512,
}


def spec(parallelism: dict[str, Any], global_tokens: int, micro: int, **extra: Any) -> PretrainRunSpec:
    return PretrainRunSpec.model_validate(
        {
            "data": {"tokens": "/t", "tokenizer": "/k"},
            "model": MODEL,
            "budget": {"steps": 1000},
            "batch": {"globalTokens": global_tokens, "microBatchSize": micro},
            "output": "/out",
            "parallelism": {"nodes": 1, "compile": False, **parallelism},
            **extra,
        }
    )


def test_parameter_count_by_hand() -> None:
    count = count_parameters(spec({"gpusPerNode": 1}, 1024, 8).model)
    assert (count.total, count.non_embedding, count.embedding) == (164160, 98624, 65536)


def test_fsdp_times_tensor_parallel() -> None:
    # 8 GPUs: tp 2 × dp_shard 4; bf16; 2 accumulation steps (2048 = 32 · 8 · 4 ranks · 2)
    plan = plan_pretrain(
        spec({"gpusPerNode": 8, "strategy": "fsdp", "tensorParallel": 2}, 2048, 8, precision="bf16")
    )
    c = plan.communication
    # each rank's tp shard: 164160 / 2 = 82080 parameters; 2 bf16 all-gathers per micro-batch (forward,
    # backward) × 2 micro-batches + one fp32 reduce-scatter, over 4 shards
    assert c.fsdp == pytest.approx(3 / 4 * 82080 * (2 * 2 * 2 + 4))  # 738,720
    # tp: per micro-batch 2 layers × 8 collectives + 4 at the ends, of 32·8·64 bf16 values, 1/2 sent
    assert c.tp == pytest.approx(2 * (1 / 2) * (32 * 8 * 64 * 2) * (2 * 8 + 4))  # 655,360
    assert c.pp == 0 and c.dp_replicate == 0
    assert c.total == pytest.approx(738720 + 655360)
    d = plan.to_dict()
    assert d["communication"]["total"] == pytest.approx(c.total)
    assert d["communicationBytesPerStep"] == pytest.approx(8 * c.total)
    status = plan.to_status().model_dump(by_alias=True, exclude_none=True)
    assert status["communicationBytesPerGpu"]["tp"] == pytest.approx(655360)
    assert "1.4 MB sent by each GPU (FSDP 0.7 MB, TP 0.7 MB)" in explain(plan)


def test_activation_checkpointing_adds_the_recomputed_forward_to_tensor_parallel() -> None:
    plan = plan_pretrain(
        spec(
            {"gpusPerNode": 2, "strategy": "fsdp", "tensorParallel": 2, "activationCheckpointing": True},
            1024,
            8,
            precision="fp32",
        )
    )
    # 4 accumulation steps (1024 = 32 · 8 · 1 rank · 4), fp32 activations, 12 collectives per layer
    assert plan.communication.tp == pytest.approx(4 * (1 / 2) * (32 * 8 * 64 * 4) * (2 * 12 + 4))
    assert plan.communication.fsdp == 0  # dp_shard 1: nothing to shard


def test_pipeline_with_hsdp() -> None:
    # 8 GPUs: pp 2 × dp_replicate 2 × dp_shard 2; micro-batch 4 in 2 pieces; 1 accumulation step
    plan = plan_pretrain(
        spec(
            {"gpusPerNode": 8, "strategy": "fsdp", "pipelineParallel": 2, "dataParallelReplicate": 2},
            512,
            4,
            precision="bf16",
        )
    )
    c = plan.communication
    held = 98624 / 2 + 65536 / 2  # one stage's blocks and one end: 82080
    assert c.fsdp == pytest.approx(1 / 2 * held * (2 * 1 * 2 + 4))  # 328,320
    assert c.dp_replicate == pytest.approx(2 * (1 / 2) * (held / 2) * 4)  # 164,160
    assert c.pp == pytest.approx(1 * 2 * 32 * 4 * 64 * 2)  # activations forward, gradients back: 32,768
    assert c.tp == 0


def test_ddp_all_reduces_every_gradient_and_one_gpu_sends_nothing() -> None:
    ddp = plan_pretrain(spec({"gpusPerNode": 4, "strategy": "ddp"}, 4096, 8))
    assert ddp.communication.dp_replicate == pytest.approx(2 * 3 / 4 * 164160 * 4)
    assert ddp.communication.fsdp == ddp.communication.tp == ddp.communication.pp == 0
    one = plan_pretrain(spec({"gpusPerNode": 1}, 1024, 8))
    assert one.communication.total == 0
