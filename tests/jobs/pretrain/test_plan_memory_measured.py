"""The planner's memory per process against a measured peak, for a tensor-parallel and a pipeline-parallel
mesh of two gloo processes on CPU (fp32), within 10 %.

How the peak is measured: each rank runs PretrainRun's own ``setup_world`` → ``Trainer`` → ``train_step``
under torchrun. glibc is told to serve every allocation of 64 KiB or more with its own mmap
(``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the resident set at once and the resident set follows
the live tensors; the baseline is the resident set before the Trainer is built (after one step of a tiny
model, so the libraries' own lazily made buffers are in it), the peak resident set
(``VmHWM``) is reset once the model is built and sharded (``/proc/self/clear_refs``: the full model a
non-sharded initialisation would hold for a moment is not training memory) and read after three optimizer
steps (the AdamW states exist from the first). The shape is chosen so the states (16 bytes per parameter
in fp32, ~545 MB per rank) dominate, as they do in the runs the planner is for; activations and logits
are a few MB here, so this checks the states' division by tp and by pipeline stage, not the activation
model (Korthikanti et al.'s approximation, which wants a GPU measurement: ``torch.cuda.max_memory_allocated``).
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

MODEL = {
    "layers": 4,
    "hidden": 1024,
    "heads": 8,
    "kvHeads": 8,
    "ffnHidden": 2816,
    "seqLen": 64,
    "vocabSize": 8192,
}
TOLERANCE = 0.10


def read_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def warm_up() -> None:
    """One step of a tiny model first: the libraries' lazily made buffers (about 85 MB: oneDNN, the
    fused AdamW kernels) are then part of the baseline, not of the model's memory."""
    import torch

    from lmforge_jobs.pretrain.model import ModelArgs, Transformer

    tiny = Transformer(ModelArgs("decoder", 512, 1, 64, 4, 4, 128, 64))
    tiny.init_weights(0)
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-4, fused=True)
    tiny(torch.randint(0, 512, (1, 64)), torch.randint(0, 512, (1, 64))).backward()
    torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
    opt.step()


def worker(manifest: str, out_dir: str) -> None:
    """One rank (under torchrun): the measurement described in the module docstring."""
    import gc

    import torch.distributed as dist

    from lmforge_jobs.pretrain.config import PretrainRunSpec
    from lmforge_jobs.pretrain.train import Trainer, setup_world

    spec = PretrainRunSpec.model_validate(yaml.safe_load(Path(manifest).read_text())["spec"])
    world = setup_world(spec)
    warm_up()
    gc.collect()
    baseline = read_status("VmRSS")
    trainer = Trainer(spec, world)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(3):
        trainer.train_step(stop_requested=False)
    peak = read_status("VmHWM")
    result = {"rank": world.rank, "baseline": baseline, "peak": peak, "measured": peak - baseline}
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure(
    tmp_path: Path, data: dict[str, str], name: str, parallelism: dict[str, Any], batch: dict[str, int]
) -> tuple[Any, list[dict[str, int]]]:
    from lmforge_jobs.pretrain.config import PretrainRunSpec

    spec = {
        "data": data,
        "model": MODEL,
        "budget": {"steps": 100},
        "optimizer": {"lr": 1e-4, "warmupSteps": 2},
        "batch": batch,
        "precision": "fp32",
        "parallelism": {"nodes": 2, "gpusPerNode": 0, "strategy": "fsdp", "compile": False, **parallelism},
        "checkpoint": {"everySteps": 1000, "keep": 1},
        "output": str(tmp_path / name),
    }
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"spec": spec}), encoding="utf-8")
    out = tmp_path / f"{name}-peaks"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_METRICS_PORT="off", MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("LMFORGE_TERMINATION_LOG", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
         __file__, str(manifest), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    peaks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return PretrainRunSpec.model_validate(spec), peaks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from lmforge_jobs.pretrain.testing import make_token_data

    return make_token_data(tmp_path_factory.mktemp("data"), vocab_size=320, documents=100, held_out=10)


def clear_refs_works() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not clear_refs_works(), reason="needs Linux /proc"
)
@pytest.mark.parametrize(
    ("name", "parallelism", "batch"),
    [
        ("tp", {"tensorParallel": 2}, {"globalTokens": 64, "microBatchSize": 1}),
        ("pp", {"pipelineParallel": 2}, {"globalTokens": 128, "microBatchSize": 2}),
    ],
)
def test_planned_memory_per_process_matches_the_measured_peak(
    tmp_path: Path, data: dict[str, str], name: str, parallelism: dict[str, Any], batch: dict[str, int]
) -> None:
    from lmforge_jobs.plan import plan_pretrain

    spec, peaks = measure(tmp_path, data, name, parallelism, batch)
    planned = plan_pretrain(spec).memory.total
    measured = max(p["measured"] for p in peaks)  # the planner plans the busiest rank
    print(f"{name}: planned {planned / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB per rank")
    assert planned > 400e6  # the states dominate, as intended
    assert abs(measured - planned) <= TOLERANCE * planned, (
        f"{name}: planned {planned / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB per rank ({peaks})"
    )


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
