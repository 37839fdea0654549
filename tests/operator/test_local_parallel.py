"""`lmforge run` of a Sweep with trials side by side: at most N at once, each with its own GPUs or CPU
threads, a consistent sweep status, pruning of the right trial, and Ctrl-C stopping every running trial
to be resumed by the next run. The trials are a stand-in job (a short Python script that writes what a
PretrainRun writes: progress.json, metrics.jsonl, outputs.json, a checkpoint on SIGTERM). Where a test needs
trials to overlap, the stand-in first waits until that many trials have started (or 10 s), rather than
taking long steps."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from manifests import resource, tiny_pretrain

from lmforge_jobs.manifest import parse_resource
from lmforge_operator.local import LocalRunner
from lmforge_operator.local import runner as local_runner
from lmforge_operator.local.parallel import ALONE, Slot, slots

JOB = r"""
import glob, json, os, signal, sys, time
import yaml

manifest, losses, pace, together = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
doc = yaml.safe_load(open(manifest))
name, steps = doc["metadata"]["name"], doc["spec"]["budget"].get("steps", 3)  # a study's point: tokens
run_dir = os.environ["LMFORGE_RUN_DIR"]
loss = losses.get(name[-4:], 1.0)
step_seconds = pace.get(name[-4:], pace["*"])
checkpoint = os.path.join(run_dir, "checkpoint")
first = int(open(checkpoint).read()) if os.path.exists(checkpoint) else 0
step = first


def record(**fields):
    with open(os.path.join(run_dir, "runs.jsonl"), "a") as fh:
        fh.write(json.dumps(fields) + "\n")


def write(path, data):
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)


def stop(signum, frame):
    open(checkpoint, "w").write(str(step))
    record(stopped=time.time(), step=step)
    sys.exit(143)


def started_so_far():  # how many of the runner's jobs (this one's siblings, and itself) ever started
    count = 0
    for path in glob.glob(os.path.join(os.path.dirname(run_dir), "*", "runs.jsonl")):
        count += '"started"' in open(path).read()
    return count


signal.signal(signal.SIGTERM, stop)
record(
    started=time.time(),
    first=first,
    threads=os.environ.get("OMP_NUM_THREADS"),
    devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
)
deadline = time.time() + 10  # run alone, the job goes on after this: the test's overlap check fails
while started_so_far() < together and time.time() < deadline:
    time.sleep(0.01)
for step in range(first + 1, steps + 1):
    time.sleep(step_seconds)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": step, "evalLoss": loss}) + "\n")
    progress = {"kind": "PretrainRun", "state": "Running", "step": step, "totalSteps": steps,
                "percent": 100.0 * step / steps, "metrics": {"evalLoss": loss}}
    write(os.path.join(run_dir, "progress.json"), progress)
write(os.path.join(run_dir, "progress.json"), {**progress, "state": "Succeeded"})
write(os.path.join(run_dir, "outputs.json"), {"model": os.path.join(run_dir, "model")})
record(finished=time.time())
"""


def fake_jobs(
    monkeypatch: pytest.MonkeyPatch,
    losses: dict[str, float],
    step_seconds: float = 0.1,
    together: int = 1,
    slower: dict[str, float] | None = None,
    torchx: bool = True,
) -> None:
    """Every job the runner starts is the stand-in: ``losses`` by trial suffix (``t002``), else 1.0; its
    steps take ``step_seconds`` (``slower``: by trial suffix); it takes its first step once ``together``
    jobs have started. ``torchx=False``: started as plain subprocesses, as where torchx is not installed
    (cheaper, for the tests of what runs when; the interrupt and GPU tests launch through torchx)."""
    pace = {**(slower or {}), "*": step_seconds}
    if not torchx:
        monkeypatch.setitem(sys.modules, "torchx", None)

    def command(job: Any, manifest: Path, processes: int) -> list[str]:
        return [sys.executable, "-c", JOB, str(manifest), json.dumps(losses), json.dumps(pace), str(together)]

    monkeypatch.setattr(local_runner, "command", command)


def sweep(tmp_path: Path, trials: int = 4, steps: int = 6, gpus_per_node: int = 0, **changes: Any) -> Any:
    template = tiny_pretrain(
        {"tokens": str(tmp_path / "tokens"), "tokenizer": str(tmp_path / "tokenizer")},
        tmp_path / "unused",
        budget={"steps": steps},
        optimizer={"lr": 1e-3, "warmupSteps": 1},
        parallelism={"gpusPerNode": gpus_per_node},
    )
    template.pop("output")
    spec = {
        "template": {"kind": "PretrainRun", "spec": template},
        "parameters": [{"path": "optimizer.lr", "values": [1e-4 * (i + 1) for i in range(trials)]}],
        "algorithm": "grid",
        "objective": {"metric": "evalLoss"},
        "maxTrials": trials,
        "maxParallel": 2,
        **changes,
    }
    parsed, problems = parse_resource(resource("Sweep", "lr", spec))
    assert not problems, problems
    return parsed


def runs(workdir: Path, trial: str) -> list[dict[str, Any]]:
    """What the stand-in recorded of ``lr-<trial>``, or of the PretrainRun ``trial`` named in full."""
    name = trial if "-" in trial else f"lr-{trial}"
    path = workdir / "pretrainrun" / name / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def intervals(workdir: Path, trials: int | list[str]) -> list[tuple[float, float]]:
    """(start, end) of each run of each trial (the first ``trials``, or those named)."""
    spans = []
    for name in range(trials) if isinstance(trials, int) else trials:
        rows = runs(workdir, f"t{name:03d}") if isinstance(name, int) else runs(workdir, name)
        starts = [r["started"] for r in rows if "started" in r]
        ends = [r.get("finished") or r.get("stopped") for r in rows if "finished" in r or "stopped" in r]
        spans += list(zip(starts, ends, strict=True))
    return spans


def most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = current = 0
    for _, change in events:
        current += change
        best = max(best, current)
    return best


def sweep_status(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / "sweep" / "lr" / "status.json").read_text())


def runner(workdir: Path, **kwargs: Any) -> LocalRunner:
    return LocalRunner(workdir=workdir, gpus=0, poll_seconds=0.02, stop_grace_seconds=5.0, **kwargs)


# ---------------------------------------------------------------------------------------------- slots
def test_how_many_run_at_once() -> None:
    # CPU: one at a time unless --parallel asks for more, then the cores shared out
    assert slots(4, None, gpus=0, per_child=0, cores=8) == [ALONE]
    assert slots(4, 2, gpus=0, per_child=0, cores=8) == [Slot(threads=4)] * 2
    assert slots(2, 3, gpus=0, per_child=0, cores=2) == [Slot(threads=1)] * 2  # maxParallel caps it
    assert slots(4, 1, gpus=0, per_child=0, cores=8) == [ALONE]
    # GPUs: one child per free set of its GPUs, each its own
    assert slots(4, None, gpus=4, per_child=2) == [Slot(devices=("0", "1")), Slot(devices=("2", "3"))]
    assert slots(4, None, gpus=3, per_child=2) == [ALONE]  # one child fits: it runs as always
    assert slots(4, 1, gpus=4, per_child=1) == [ALONE]
    assert len(slots(3, None, gpus=8, per_child=1)) == 3


def test_gpu_slots_follow_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert slots(3, None, gpus=3, per_child=1) == [Slot(devices=(d,)) for d in "567"]


# ------------------------------------------------------------------------------------------ a sweep
def test_two_trials_overlap_and_never_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_jobs(
        monkeypatch,
        {"t000": 3.0, "t001": 2.0, "t002": 1.5, "t003": 0.5},
        step_seconds=0.05,
        together=2,
        torchx=False,
    )
    workdir = tmp_path / "work"
    [outcome] = runner(workdir, parallel=2).run([sweep(tmp_path, steps=3, maxParallel=3)])
    assert outcome.phase == "Succeeded", outcome.message
    spans = intervals(workdir, 4)
    assert len(spans) == 4 and most_at_once(spans) == 2, spans
    (a_start, a_end), (b_start, b_end) = spans[:2]
    assert a_start < b_end and b_start < a_end  # trials 0 and 1 ran at the same time
    threads = {runs(workdir, f"t{n:03d}")[0]["threads"] for n in range(4)}
    assert threads == {str(max(1, (os.cpu_count() or 1) // 2))}

    status = sweep_status(workdir)
    assert [row["name"] for row in status["trials"]] == [f"lr-t{n:03d}" for n in range(4)]
    assert [row["phase"] for row in status["trials"]] == ["Succeeded"] * 4
    assert status["trialsDone"] == status["trialsTotal"] == 4 and status["phase"] == "Succeeded"
    assert status["best"]["name"] == "lr-t003" and status["best"]["objective"] == 0.5
    assert status["outputs"]["model"].endswith("pretrainrun/lr-t003/model")


def test_on_cpu_trials_run_one_at_a_time_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_jobs(monkeypatch, {}, step_seconds=0.05, torchx=False)
    workdir = tmp_path / "work"
    [outcome] = runner(workdir).run([sweep(tmp_path, trials=2, steps=3)])
    assert outcome.phase == "Succeeded", outcome.message
    assert most_at_once(intervals(workdir, 2)) == 1
    assert [runs(workdir, f"t{n:03d}")[0]["threads"] for n in range(2)] == [None, None]  # as always


def test_each_trial_gets_its_own_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (pretend) four-GPU machine, two one-GPU trials at once, each seeing only its own GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_jobs(monkeypatch, {}, step_seconds=0.05, together=2)
    workdir = tmp_path / "work"
    doc = sweep(tmp_path, trials=2, steps=3, gpus_per_node=1)
    [outcome] = LocalRunner(workdir=workdir, gpus=4, poll_seconds=0.02).run([doc])
    assert outcome.phase == "Succeeded", outcome.message
    assert sorted(runs(workdir, f"t{n:03d}")[0]["devices"] for n in range(2)) == ["0", "1"]
    assert most_at_once(intervals(workdir, 2)) == 2


def test_pruning_stops_the_bad_trial_among_parallel_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trials 0 and 1 finish (the median's startup trials); of trials 2 and 3, running together, only
    the one worse than their median is stopped (its slow steps leave ample time to stop it before its end)."""
    fake_jobs(
        monkeypatch,
        {"t000": 1.0, "t001": 1.2, "t002": 5.0, "t003": 0.9},
        step_seconds=0.02,
        slower={"t002": 0.2},
        torchx=False,
    )
    workdir = tmp_path / "work"
    doc = sweep(tmp_path, steps=10, earlyStopping={"pruner": "median", "startupTrials": 2})
    [outcome] = runner(workdir, parallel=2).run([doc])
    assert outcome.phase == "Succeeded", outcome.message
    status = sweep_status(workdir)
    assert [row["phase"] for row in status["trials"]] == ["Succeeded", "Succeeded", "Pruned", "Succeeded"]
    assert status["best"]["name"] == "lr-t003"
    pruned = runs(workdir, "t002")
    assert "stopped" in pruned[-1] and pruned[-1]["step"] < 10  # stopped before its end
    child = json.loads((workdir / "pretrainrun" / "lr-t002" / "status.json").read_text())
    assert any(c["reason"] == "TrialPruned" for c in child["conditions"])


def test_an_interrupt_stops_every_running_trial_and_a_rerun_resumes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_jobs(monkeypatch, {"t000": 2.0, "t001": 1.0}, step_seconds=0.1)
    workdir = tmp_path / "work"
    doc = sweep(tmp_path, trials=2, steps=20)

    def interrupt_once_both_run() -> None:
        """Once each trial has taken a step, long before its last."""
        deadline = time.monotonic() + 30
        metrics = [workdir / "pretrainrun" / f"lr-t{n:03d}" / "metrics.jsonl" for n in range(2)]
        while not all(path.exists() and path.stat().st_size for path in metrics):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt_once_both_run, daemon=True)
    sender.start()
    first = runner(workdir, parallel=2)
    [outcome] = first.run([doc])
    sender.join(timeout=5)
    assert first.interrupted and outcome.phase == "Failed"
    assert any(c["reason"] == "Interrupted" for c in sweep_status(workdir)["conditions"])
    for n in range(2):
        stopped = runs(workdir, f"t{n:03d}")[-1]
        assert "stopped" in stopped and 0 < stopped["step"] < 20
        child = json.loads((workdir / "pretrainrun" / f"lr-t{n:03d}" / "status.json").read_text())
        assert any(c["reason"] == "Interrupted" for c in child["conditions"])
    assert [row["phase"] for row in sweep_status(workdir)["trials"]] == ["Running", "Running"]

    fake_jobs(monkeypatch, {"t000": 2.0, "t001": 1.0}, step_seconds=0.002)  # the rest of the steps, quickly
    [again] = runner(workdir, parallel=2).run([doc])
    assert again.phase == "Succeeded", again.message
    for n in range(2):
        stopped, resumed = runs(workdir, f"t{n:03d}")[-3:-1]
        assert resumed["first"] == stopped["step"] > 0  # from its checkpoint
    status = sweep_status(workdir)
    assert [row["phase"] for row in status["trials"]] == ["Succeeded", "Succeeded"]
    assert status["trialsDone"] == 2 and status["best"]["name"] == "lr-t001"


def test_the_cli_takes_a_parallel_option(tmp_path: Path) -> None:
    from lmforge_operator.cli import main

    with pytest.raises(SystemExit):
        main(["run", str(tmp_path), "--parallel", "0"])


# ------------------------------------------------------------------------------------ a scaling study
def test_a_studys_points_run_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_jobs(monkeypatch, {}, step_seconds=0.05, together=3, torchx=False)
    template = tiny_pretrain(
        {"tokens": str(tmp_path / "tokens"), "tokenizer": str(tmp_path / "tokenizer")},
        tmp_path / "unused",
        model={"vocabSize": 512},
    )
    template.pop("output")
    template.pop("budget")
    shapes = [
        {"layers": 1, "hidden": 16, "heads": 2, "kvHeads": 1, "ffnHidden": 48},
        {"layers": 1, "hidden": 32, "heads": 4, "kvHeads": 2, "ffnHidden": 96},
        {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192},
    ]
    # maxParallel unset: every point may run at once; --parallel 3 is what limits them here (the fit, by
    # approach 2 alone, is not what is checked: it is quick)
    spec = {"template": template, "budgets": [1.8e9, 3.6e9], "shapes": shapes, "fit": "approach2"}
    study, problems = parse_resource(resource("ScalingStudy", "iso", spec))
    assert not problems, problems
    workdir = tmp_path / "work"
    runner(workdir, parallel=3).run([study])
    status = json.loads((workdir / "scalingstudy" / "iso" / "status.json").read_text())
    names = [point["name"] for point in status["points"]]
    assert len(names) == 6 and [p["phase"] for p in status["points"]] == ["Succeeded"] * 6
    assert status["pointsDone"] == 6
    assert most_at_once(intervals(workdir, names)) == 3


# ---------------------------------------------------------------------------------------- real trials
@pytest.mark.slow
def test_a_tiny_pretrain_sweep_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real tiny PretrainRun trials at once on CPU: both train, each on its share of the cores, and
    the sweep keeps the better learning rate."""
    from lmforge_jobs.pretrain.testing import make_token_data

    data = make_token_data(tmp_path / "tokens", vocab_size=320, documents=300, max_tokens_per_file=9000)
    template = tiny_pretrain(data, tmp_path / "unused", checkpoint={"everySteps": 100, "keep": 1})
    template.pop("output")
    spec = {
        "template": {"kind": "PretrainRun", "spec": template},
        "parameters": [{"path": "optimizer.lr", "values": [1e-5, 3e-3]}],
        "algorithm": "grid",
        "objective": {"metric": "evalLoss"},
        "maxTrials": 2,
        "maxParallel": 2,
    }
    doc, problems = parse_resource(resource("Sweep", "lr", spec))
    assert not problems, problems
    workdir = tmp_path / "work"
    [outcome] = LocalRunner(workdir=workdir, gpus=0, parallel=2).run([doc])
    status = sweep_status(workdir)
    assert outcome.phase == "Succeeded", status
    assert [row["phase"] for row in status["trials"]] == ["Succeeded", "Succeeded"]
    assert status["best"]["parameters"] == {"optimizer.lr": 3e-3}
    children = [
        json.loads((workdir / "pretrainrun" / f"lr-t00{n}" / "status.json").read_text()) for n in range(2)
    ]
    # each started before the other finished
    assert children[0]["startTime"] <= children[1]["completionTime"]
    assert children[1]["startTime"] <= children[0]["completionTime"]
