"""torchrun on CPU with gloo: two simulated nodes (c10d rendezvous on 127.0.0.1) with DDP, and FSDP2 on two
processes, must train the same tiny model to the same losses as one process (the global batch is the same
sequences however the processes are arranged)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import job_env
from manifests import tiny_pretrain, write_manifest

from lmforge_jobs.pretrain.__main__ import main
from lmforge_jobs.pretrain.testing import make_token_data

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _manifest(tmp: Path, data: dict[str, str], name: str, strategy: str, nodes: int) -> Path:
    spec = tiny_pretrain(
        data,
        tmp / name,
        budget={"steps": STEPS},
        parallelism={"nodes": nodes, "strategy": strategy},
        checkpoint={"everySteps": 3, "keep": 1},
        eval={"everySteps": STEPS},
    )
    return write_manifest(tmp / f"{name}.yaml", "PretrainRun", name, spec)


def _losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return [by_step[s] for s in range(1, STEPS + 1)]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "lmforge_jobs.pretrain", "--manifest"]


@pytest.mark.slow
def test_two_nodes_ddp_and_fsdp_match_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_token_data(tmp_path / "data", vocab_size=320, documents=200, held_out=30)

    # two simulated nodes, one process each, c10d rendezvous on 127.0.0.1
    ddp = _manifest(tmp_path, data, "ddp", "ddp", nodes=2)
    port = _free_port()
    node_args = (
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=lmforge-test",
    )
    nodes = [
        subprocess.Popen(
            [*_torchrun(*node_args), str(ddp)],
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs

    fsdp = _manifest(tmp_path, data, "fsdp", "fsdp", nodes=2)
    done = subprocess.run(
        [*_torchrun("--standalone", "--nnodes=1", "--nproc-per-node=2"), str(fsdp)],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    single = _manifest(tmp_path, data, "single", "ddp", nodes=1)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    assert main(["--manifest", str(single)]) == 0  # one plain process, in this one

    l_ddp, l_fsdp, l_one = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    assert l_ddp[-1] < l_ddp[0] - 0.5  # it learns
    assert l_fsdp == pytest.approx(l_ddp, abs=1e-4)
    assert l_one == pytest.approx(l_ddp, abs=1e-4)
    for name in ("ddp", "fsdp"):
        out = tmp_path / name
        assert (out / "model" / "model.safetensors").exists() and (out / "outputs.json").exists()
        assert (
            json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "lmforge.json").read_text())["worldSize"]
            == 2
        )
