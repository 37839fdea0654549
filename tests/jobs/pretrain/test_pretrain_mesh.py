"""Model parallelism on CPU with gloo, several torchrun processes: tensor parallel (with sequence and loss
parallel), FSDP × TP, HSDP and pipeline parallel (1F1B, Interleaved1F1B, with FSDP or TP) train the same tiny model to the same losses as one process,
and a checkpoint saved under one mesh resumes under another.

Tolerance: every run draws the same initial weights from the seed and reads the same global batch, so the
runs compute the same mathematical function; they differ only in how fp32 sums are split (a row-wise
matmul sums partial products across ranks, the loss-parallel cross-entropy reduces its log-sum-exp across
ranks). Those reorderings change each step's loss by ~1e-6 relative and grow over a few Adam steps, so
1e-4 absolute on a loss of ~5 (2e-5 relative) separates "same training" from any real difference (a
wrong shard, a skipped gradient reduction or a lost micro-batch moves the loss by 1e-2 or more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge_jobs.pretrain.__main__ import main
from lmforge_jobs.pretrain.testing import make_token_data

STEPS = 4
TOLERANCE = 1e-4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", LMFORGE_METRICS_PORT="off", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LMFORGE_TERMINATION_LOG", None)
    return env


def _manifest(
    tmp: Path,
    data: dict[str, str],
    name: str,
    processes: int,
    output: str | None = None,
    steps: int = STEPS,
    **mesh: Any,
) -> Path:
    spec = {
        "data": data,
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 32},
        "budget": {"steps": steps},
        "optimizer": {"lr": 3.0e-3, "warmupSteps": 2},
        "batch": {"globalTokens": 1024, "microBatchSize": 8},
        "precision": "fp32",
        "parallelism": {
            "nodes": processes,
            "gpusPerNode": 0,
            "strategy": "fsdp" if processes > 1 else "ddp",
            "compile": False,
            **mesh,
        },
        "checkpoint": {"everySteps": 2, "keep": 2},
        "eval": {"everySteps": steps, "batches": 2},
        "export": {"huggingface": False},
        "output": output or str(tmp / name),
    }
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _losses(output: Path, steps: int = STEPS) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return [by_step[s] for s in range(1, steps + 1)]


def _torchrun(manifest: Path, processes: int) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={processes}",
            "-m",
            "lmforge_jobs.pretrain",
            "--manifest",
            str(manifest),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _one_process(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    assert main(["--manifest", str(manifest)]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_token_data(tmp_path_factory.mktemp("data"), vocab_size=320, documents=200, held_out=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: dict[str, str]) -> list[float]:
    """One process, no parallelism: the losses every mesh must reproduce."""
    tmp = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _one_process(_manifest(tmp, data, "one", 1), monkeypatch)
    losses = _losses(tmp / "one")
    assert losses[-1] < losses[0] - 0.3  # it learns
    return losses


@pytest.mark.slow
def test_tensor_parallel_matches_one_process(
    tmp_path: Path, data: dict[str, str], reference: list[float]
) -> None:
    _torchrun(_manifest(tmp_path, data, "tp", 2, tensorParallel=2), 2)
    assert _losses(tmp_path / "tp") == pytest.approx(reference, abs=TOLERANCE)
    meta = json.loads((tmp_path / "tp" / "checkpoints" / f"step-{STEPS:08d}" / "lmforge.json").read_text())
    assert meta["mesh"]["tp"] == 2 and meta["mesh"]["dp_shard"] == 1


def _resume_from(source: Path, step: int, target: Path) -> None:
    """``target`` holds only ``source``'s checkpoint of ``step`` (and the tokenizer beside it)."""
    import shutil

    (target / "checkpoints").mkdir(parents=True)
    for name in ("tokenizer", f"step-{step:08d}"):
        shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_resumes_on_one_process_and_under_fsdp(
    tmp_path: Path, data: dict[str, str], reference: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    _torchrun(_manifest(tmp_path, data, "tp", 2, tensorParallel=2), 2)
    _resume_from(tmp_path / "tp", 2, tmp_path / "one")
    _one_process(_manifest(tmp_path, data, "one", 1), monkeypatch)
    _resume_from(tmp_path / "tp", 2, tmp_path / "fsdp")
    _torchrun(_manifest(tmp_path, data, "fsdp", 2), 2)
    for name in ("one", "fsdp"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        resumed = {r["step"]: r["loss"] for r in rows if "loss" in r}
        assert sorted(resumed) == [3, 4], name  # it went on from step 2, it did not start over
        assert [resumed[3], resumed[4]] == pytest.approx(reference[2:], abs=TOLERANCE), name


@pytest.mark.slow
def test_fsdp_times_tensor_parallel_matches_one_process(
    tmp_path: Path, data: dict[str, str], reference: list[float]
) -> None:
    """Four processes on a mesh (dp_shard 2, tp 2): FSDP2 shards the TP-sharded parameters again."""
    _torchrun(_manifest(tmp_path, data, "fsdp-tp", 4, tensorParallel=2), 4)
    assert _losses(tmp_path / "fsdp-tp") == pytest.approx(reference, abs=TOLERANCE)


@pytest.mark.slow
def test_pipeline_parallel_matches_one_process_exports_every_block_and_resumes_elsewhere(
    tmp_path: Path, data: dict[str, str], reference: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stages (1F1B, two pieces per micro-batch): the loss is on the last stage only, the gradient
    norm is summed over the stages, the export gathers both stages' blocks, and the checkpoint (each
    stage saved its own blocks) resumes on one process."""
    from safetensors import safe_open

    manifest = _manifest(tmp_path, data, "pp", 2, pipelineParallel=2)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["export"]["huggingface"] = True
    manifest.write_text(yaml.safe_dump(doc))
    _torchrun(manifest, 2)
    assert _losses(tmp_path / "pp") == pytest.approx(reference, abs=TOLERANCE)
    with safe_open(str(tmp_path / "pp" / "model" / "model.safetensors"), "pt") as exported:
        names = set(exported.keys())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"0", "1"}

    _resume_from(tmp_path / "pp", 2, tmp_path / "one")
    _one_process(_manifest(tmp_path, data, "one", 1), monkeypatch)
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert [resumed[3], resumed[4]] == pytest.approx(reference[2:], abs=TOLERANCE)


@pytest.mark.slow
def test_hsdp_replicas_of_fsdp_shards_match_one_process(
    tmp_path: Path, data: dict[str, str], reference: list[float]
) -> None:
    """Four processes: two replicas (dataParallelReplicate) of a model sharded over two (dp_shard)."""
    _torchrun(_manifest(tmp_path, data, "hsdp", 4, dataParallelReplicate=2), 4)
    assert _losses(tmp_path / "hsdp") == pytest.approx(reference, abs=TOLERANCE)


@pytest.mark.slow
def test_interleaved_pipeline_matches_one_process(
    tmp_path: Path, data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interleaved1F1B: four layers in four stages, two per rank (0 and 2 on rank 0, 1 and 3 on rank 1)."""

    def four_layers(manifest: Path) -> Path:
        doc = yaml.safe_load(manifest.read_text())
        doc["spec"]["model"]["layers"] = 4
        manifest.write_text(yaml.safe_dump(doc))
        return manifest

    _one_process(four_layers(_manifest(tmp_path, data, "one", 1)), monkeypatch)
    mesh = {"pipelineParallel": 2, "pipelineSchedule": "Interleaved1F1B", "microBatches": 2}
    _torchrun(four_layers(_manifest(tmp_path, data, "interleaved", 2, **mesh)), 2)
    assert _losses(tmp_path / "interleaved") == pytest.approx(_losses(tmp_path / "one"), abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [{"pipelineParallel": 2}, {"pipelineParallel": 2, "tensorParallel": 2}],
    ids=["pp-x-fsdp", "pp-x-tp"],
)
def test_pipeline_combined_with_fsdp_or_tensor_parallel_matches_one_process(
    tmp_path: Path, data: dict[str, str], reference: list[float], mesh: dict[str, int]
) -> None:
    """Four processes: two stages, each FSDP-sharded over two ranks or tensor-parallel over two."""
    _torchrun(_manifest(tmp_path, data, "mesh", 4, **mesh), 4)
    assert _losses(tmp_path / "mesh") == pytest.approx(reference, abs=TOLERANCE)
