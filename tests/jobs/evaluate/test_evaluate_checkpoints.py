"""checkpoints: every — the Evaluation follows a PretrainRun's checkpoints while it runs, evaluates each
complete one once, keeps a per-checkpoint history, resumes, and stops by the documented rule.

The checkpoints come from a real 4-step PretrainRun (a checkpoint every 2 steps) on generated token shards;
perplexity is measured on that corpus's held-out shards.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from manifests import tiny_pretrain, write_manifest

from lmforge_jobs.evaluate.__main__ import main
from lmforge_jobs.pretrain.__main__ import main as pretrain_main
from lmforge_jobs.pretrain.testing import make_token_data
from lmforge_jobs.spec import EXIT_CONFIG_ERROR


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished PretrainRun with complete checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("pretrain")
    data = make_token_data(root / "data", vocab_size=320, documents=60, held_out=8)
    spec = tiny_pretrain(
        data,
        root / "run",
        budget={"steps": 4},
        optimizer={"warmupSteps": 1},
        batch={"globalTokens": 512},
        checkpoint={"everySteps": 2, "keep": 5},
        eval={"everySteps": 100, "batches": 1},
    )
    write_manifest(root / "run.yaml", "PretrainRun", "run", spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_METRICS_PORT", "off")
        assert pretrain_main(["--manifest", str(root / "run.yaml")]) == 0
    steps = sorted(p.name for p in (root / "run" / "checkpoints").glob("step-*"))
    assert steps == ["step-00000002", "step-00000004"], steps
    return {"run": root / "run", "heldOut": Path(data["heldOut"])}


def manifest(tmp: Path, checkpoint_dir: Path, held_out: Path, **extra: object) -> Path:
    spec = {
        # resolved as lmforge run does it: model.path is the run's final export, checkpointDir its checkpoints
        "model": {"path": str(checkpoint_dir.parent / "model")},
        "checkpoints": "every",
        "checkpointDir": str(checkpoint_dir),
        "perplexity": {"data": str(held_out), "seqLen": 32},
        "precision": "fp32",
        "checkpointPollSeconds": 1,
        "output": str(tmp / "out"),
        **extra,
    }
    return write_manifest(tmp / "ev.yaml", "Evaluation", "ev", spec)


def results(tmp: Path) -> dict:
    try:
        return json.loads((tmp / "out" / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def test_finished_run_every_checkpoint_once(tmp_path: Path, run: dict[str, Path]) -> None:
    path = manifest(tmp_path, run["run"] / "checkpoints", run["heldOut"])
    assert main(["--manifest", str(path)]) == 0
    res = results(tmp_path)
    assert [h["step"] for h in res["history"]] == [2, 4]
    assert [h["checkpoint"] for h in res["history"]] == ["step-00000002", "step-00000004"]
    assert res["step"] == 4 and res["perplexity"] == res["history"][-1]["perplexity"]
    assert res["history"][1]["perplexity"] < res["history"][0]["perplexity"]  # training helps
    assert json.loads((tmp_path / "out" / "outputs.json").read_text())["results"].endswith("results.json")
    # a rerun of the same spec resumes: nothing is evaluated again
    before = (tmp_path / "out" / "results.json").read_text()
    start = time.monotonic()
    assert main(["--manifest", str(path)]) == 0
    assert (
        json.loads((tmp_path / "out" / "results.json").read_text())["history"]
        == json.loads(before)["history"]
    )
    assert time.monotonic() - start < 10


def test_follows_a_running_pretrain_run_until_it_finishes(
    tmp_path: Path, run: dict[str, Path], poll_clock: Any
) -> None:
    live = tmp_path / "live"
    (live / "checkpoints").mkdir(parents=True)
    shutil.copytree(run["run"] / "checkpoints" / "tokenizer", live / "checkpoints" / "tokenizer")
    shutil.copytree(run["run"] / "checkpoints" / "step-00000002", live / "checkpoints" / "step-00000002")
    # a checkpoint being written (no COMPLETE marker yet) does not count
    partial = live / "checkpoints" / "step-00000004"
    shutil.copytree(run["run"] / "checkpoints" / "step-00000004", partial)
    (partial / "COMPLETE").unlink()
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(
            main(["--manifest", str(manifest(tmp_path, live / "checkpoints", run["heldOut"]))])
        )
    )
    thread.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(results(tmp_path).get("history", [])) < 1:
        time.sleep(0.05)
    assert [h["step"] for h in results(tmp_path)["history"]] == [2]
    while time.monotonic() < deadline and poll_clock.polls < 2:
        time.sleep(0.01)
    # two polls found nothing new: the run is not finished, the job keeps waiting
    assert poll_clock.polls >= 2
    assert thread.is_alive() and not (tmp_path / "out" / "outputs.json").exists()
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["stage"] == "waiting for checkpoints"
    (partial / "COMPLETE").write_text("")  # the save completes, then the run finishes
    (live / "outputs.json").write_text(json.dumps({"model": str(live / "model")}))
    thread.join(timeout=90)
    assert codes == [0]
    assert [h["step"] for h in results(tmp_path)["history"]] == [2, 4]


def test_gives_up_when_the_run_stalls(
    tmp_path: Path, run: dict[str, Path], capsys: pytest.CaptureFixture[str], poll_clock: Any
) -> None:
    stalled = tmp_path / "stalled" / "checkpoints"
    stalled.mkdir(parents=True)
    path = manifest(tmp_path, stalled, run["heldOut"], checkpointTimeoutSeconds=1)
    assert main(["--manifest", str(path)]) == EXIT_CONFIG_ERROR
    assert "error: spec.checkpoints: no new checkpoint in" in capsys.readouterr().err
    assert poll_clock.skipped >= 1  # it waited out checkpointTimeoutSeconds on the job's clock
    # finished without any complete checkpoint: a clear error too
    (stalled.parent / "outputs.json").write_text("{}")
    assert main(["--manifest", str(path)]) == EXIT_CONFIG_ERROR
    assert "error: spec.checkpointDir: the PretrainRun finished but" in capsys.readouterr().err
