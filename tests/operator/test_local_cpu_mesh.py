"""`lmforge run` on a machine without GPUs: a PretrainRun with gpusPerNode 0 whose parallelism asks for a mesh
(strategy fsdp, nodes × gpusPerNode = P > 1) starts P gloo processes here (torchrun --standalone
--nproc-per-node P); a mesh the CPU cannot run (fp8, context parallel, far more processes than cores) is
refused before anything starts, naming the spec field, as the job itself would with exit 64. Without a mesh
nothing changes: one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from manifests import tiny_pretrain, write_manifest

from lmforge_jobs.manifest import load_resources
from lmforge_operator.local import LocalRunner, command, processes_for
from lmforge_operator.local.launch import CPU_PROCESSES_PER_CORE, MeshRefused

DATA = {"tokens": "/nonexistent/tokens", "tokenizer": "/nonexistent/tokenizer"}


def pretrain(tmp_path: Path, **changes: Any) -> Any:
    path = write_manifest(
        tmp_path / "run.yaml", "PretrainRun", "mesh", tiny_pretrain(DATA, tmp_path / "out", **changes)
    )
    resources, problems = load_resources([path])
    assert not problems, problems
    return resources[0]


def cpu_mesh(**parallelism: Any) -> dict[str, Any]:
    return {"parallelism": {"gpusPerNode": 0, "compile": False, "strategy": "fsdp", **parallelism}}


def test_a_cpu_mesh_starts_one_gloo_process_per_rank(tmp_path: Path) -> None:
    job = pretrain(tmp_path, **cpu_mesh(nodes=2, tensorParallel=2))
    assert processes_for(job, gpus=0) == 2
    assert processes_for(job, gpus=8) == 2  # gpusPerNode 0 asks for the CPU, GPUs or not
    assert "--nproc-per-node=2" in command(job, tmp_path / "m.yaml", 2)
    fsdp_tp = pretrain(tmp_path, **cpu_mesh(nodes=4, tensorParallel=2))  # dataParallelShard takes 2
    assert processes_for(fsdp_tp, gpus=0) == 4


def test_without_a_mesh_one_process_as_before(tmp_path: Path) -> None:
    assert processes_for(pretrain(tmp_path), gpus=0) == 1
    assert processes_for(pretrain(tmp_path, parallelism={"nodes": 2, "gpusPerNode": 0}), gpus=0) == 1  # ddp
    assert processes_for(pretrain(tmp_path, **cpu_mesh(nodes=1)), gpus=0) == 1
    gpu = pretrain(
        tmp_path, parallelism={"nodes": 1, "gpusPerNode": 4, "strategy": "fsdp", "tensorParallel": 2}
    )
    assert processes_for(gpu, gpus=0) == 1 and processes_for(gpu, gpus=4) == 4


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"precision": "fp8", **cpu_mesh(nodes=2, tensorParallel=2)}, "precision", "GPU"),
        (cpu_mesh(nodes=2, contextParallel=2), "parallelism.contextParallel", "CUDA"),
        (
            cpu_mesh(nodes=2, tensorParallel=2, asyncTensorParallel=True, compile=True),
            "parallelism.asyncTensorParallel",
            "CUDA",
        ),
    ],
)
def test_meshes_the_cpu_cannot_run_are_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(MeshRefused) as refused:
        processes_for(pretrain(tmp_path, **changes), gpus=0)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"spec.{field}: ") and words in str(refused.value)


def test_more_processes_than_the_cores_can_carry_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    fits = 2 * CPU_PROCESSES_PER_CORE
    batch = {"batch": {"globalTokens": 4096, "microBatchSize": 8}}
    assert (
        processes_for(pretrain(tmp_path, **batch, **cpu_mesh(nodes=fits, tensorParallel=2)), gpus=0) == fits
    )
    with pytest.raises(MeshRefused, match=r"^spec\.parallelism\.nodes: .* 16 gloo processes .* 2 CPU cores"):
        processes_for(pretrain(tmp_path, **batch, **cpu_mesh(nodes=2 * fits, tensorParallel=2)), gpus=0)


def test_the_runner_marks_a_refused_mesh_invalid_without_starting_it(tmp_path: Path) -> None:
    job = pretrain(tmp_path, precision="fp8", **cpu_mesh(nodes=2, tensorParallel=2))
    runner = LocalRunner(workdir=tmp_path / "runs", gpus=0)
    outcome = runner.run_one(job)
    assert outcome.phase == "Invalid" and outcome.message.startswith("spec.precision: ")
    status = json.loads((tmp_path / "runs" / "pretrainrun" / "mesh" / "status.json").read_text())
    assert status["phase"] == "Invalid"
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.precision: ")
    assert not (tmp_path / "runs" / "pretrainrun" / "mesh" / "logs").exists()  # nothing was started


@pytest.mark.slow
def test_lmforge_run_trains_a_tensor_parallel_pretrainrun_on_cpu(tmp_path: Path, monkeypatch) -> None:
    from lmforge_jobs.pretrain.testing import make_token_data
    from lmforge_operator.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    token_data = make_token_data(tmp_path / "data", vocab_size=320, documents=200, held_out=20)

    spec = tiny_pretrain(
        token_data, tmp_path / "out", budget={"steps": 4}, **cpu_mesh(nodes=2, tensorParallel=2)
    )
    manifest = write_manifest(tmp_path / "tp.yaml", "PretrainRun", "tp", spec)
    code = main(["run", str(manifest), "--workdir", str(tmp_path / "runs"), "--plain", "--no-report"])
    run_dir = tmp_path / "runs" / "pretrainrun" / "tp"
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").rglob("*.log")))
    assert code == 0, logs[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert status["progress"]["step"] == 4 and status["metrics"]["loss"] > 0
    assert "× 2 processes" in logs and "tp 2" in logs  # two gloo ranks holding a tensor-parallel mesh
