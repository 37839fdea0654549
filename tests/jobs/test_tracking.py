"""Experiment tracking (lmforge_jobs.tracking): what Telemetry reports reaches MLflow (a real server on
127.0.0.1, read back with MlflowClient) and TensorBoard event files; a resumed run continues its MLflow run;
a tracking server that is down never fails a run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from manifests import tiny_pretrain, write_manifest

from lmforge_jobs import tracking
from lmforge_jobs.manifest import MODELS
from lmforge_jobs.telemetry import Telemetry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a SQLite store in a temporary folder, on 127.0.0.1 only."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        pytest.skip("mlflow (the server, the dev extra) is not installed")
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    args = [mlflow, "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db"]
    args += ["--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", "1"]
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.05)  # ready within seconds: poll often
    try:
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    for key in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "RANK", "JOB_COMPLETION_INDEX", "LMFORGE_RUN_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("LMFORGE_TERMINATION_LOG", raising=False)
    yield
    tracking.deactivate()


def resource(
    output: Path | str,
    name: str = "tiny",
    tracking_spec: dict[str, Any] | None = None,
    init: str | None = None,
    **meta: Any,
) -> Any:
    spec: dict[str, Any] = {
        "data": {"tokens": "/data/tokens", "heldOut": "/data/held", "tokenizer": "/data/tok"},
        "output": str(output),
        "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 32},
    }
    if tracking_spec is not None:
        spec["tracking"] = tracking_spec
    if init is not None:
        spec["model"]["init"] = {"path": init}
    metadata = {"name": name, "namespace": "team", **meta}
    doc = {"apiVersion": "lmforge.io/v1alpha1", "kind": "PretrainRun", "metadata": metadata, "spec": spec}
    return MODELS["PretrainRun"].model_validate(doc)


def train(output: Path, steps: range, res: Any) -> Telemetry:
    """What a training loop reports, through Telemetry, for ``steps``."""
    tracking.activate(res)
    tel = Telemetry("PretrainRun", output, total_steps=10)
    for step in steps:
        tel.update(step=step, tokens=step * 1024, metrics={"loss": 5.0 - step / 10, "tokensPerSecond": 1e4})
    return tel


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def only_run(uri: str, experiment: str) -> Any:
    exp = client(uri).get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = client(uri).search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


# ----------------------------------------------------------------------------------------- helpers
def test_long_parameters_are_cut_with_their_digest() -> None:
    assert tracking.param_value("short") == "short"
    long = "x" * 2000
    cut = tracking.param_value(long)
    assert len(cut) == tracking.MAX_PARAM_LENGTH and cut.startswith("xxx") and "…sha256:" in cut
    assert tracking.param_value("y" * 2000) != cut
    flat = tracking.flatten(
        {"model": {"layers": 2}, "sources": [{"jsonl": "a"}, {"jsonl": "b"}], "l": [1, 2]}
    )
    assert flat == {"model.layers": "2", "sources.0.jsonl": "a", "sources.1.jsonl": "b", "l": "[1, 2]"}
    assert tracking.metric_key("hellaswag.acc,none") == "hellaswag.acc_none"


def test_spec_tracking_fields_are_validated(tmp_path: Path) -> None:
    ok = resource(
        tmp_path, tracking_spec={"mlflow": True, "tensorboard": True, "experiment": "team/llm-1.3b"}
    )
    assert ok.spec.tracking.experiment == "team/llm-1.3b"
    for bad in ({"experiment": "bad name!"}, {"experiment": "x" * 129}, {"uri": "http://127.0.0.1:5000"}):
        with pytest.raises(Exception, match="tracking"):
            resource(tmp_path, tracking_spec=bad)


def test_nothing_is_tracked_unless_asked(tmp_path: Path) -> None:
    assert tracking.activate(resource(tmp_path)) is None
    assert (
        tracking.activate(resource(tmp_path, tracking_spec={"mlflow": False, "tensorboard": False})) is None
    )
    tel = train(tmp_path, range(1, 3), resource(tmp_path))
    tel.finish({"model": str(tmp_path / "model")})
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / tracking.STATE_FILE).exists()


def test_tensorboard_event_files_beside_the_outputs(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tel = train(tmp_path, range(1, 6), resource(tmp_path, tracking_spec={"tensorboard": True}))
    tel.finish({"model": str(tmp_path / "model")})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "tokensPerSecond", "tokens"} <= set(acc.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [
        (s, 5.0 - s / 10) for s in range(1, 6)
    ]


def test_tensorboard_on_object_storage_is_uploaded_and_kept_on_resume(s3: Any, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge_jobs import storage

    output = f"s3://{s3.bucket}/tb-run"
    res = resource(output, tracking_spec={"tensorboard": True})
    for steps in (range(1, 4), range(4, 7)):  # a run stopped after step 3, then resumed
        tracking.activate(res)
        tel = Telemetry("PretrainRun", None)
        for step in steps:
            tel.update(step=step, metrics={"loss": float(step)})
        if steps.start == 1:
            assert not storage.exists(storage.join(output, "tensorboard"))  # not yet: written locally
            tel.saved()  # a checkpoint: uploaded now
            assert storage.list_files(storage.join(output, "tensorboard"))
        tracking.deactivate("KILLED")
    local = storage.download_tree(storage.join(output, "tensorboard"), tmp_path / "tb")
    acc = EventAccumulator(str(local))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]


def test_a_server_that_is_down_never_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tel = train(tmp_path, range(1, 4), resource(tmp_path, tracking_spec={"tensorboard": True}))
    tel.finish({"model": str(tmp_path / "model")})
    out = capsys.readouterr().out
    assert out.count("warning: MLflow tracking switched off") == 1, out
    assert json.loads((tmp_path / "outputs.json").read_text()) == {"model": str(tmp_path / "model")}
    assert list((tmp_path / "tensorboard").iterdir())  # the other tracker carries on


def test_wandb_offline_without_wandb_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    assert tracking.activate(resource(tmp_path)) is None
    assert "WANDB_MODE=offline but wandb is not installed" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- a real server
@pytest.mark.slow  # starts an MLflow server
def test_metrics_params_and_artifacts_reach_mlflow(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    res = resource(tmp_path, name="direct", init="/" + "m" * 900)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("# tiny\n")
    (tmp_path / "loss.png").write_bytes(b"\x89PNG\r\n")
    tracking.activate(res, tmp_path)
    tel = Telemetry("PretrainRun", tmp_path, total_steps=10)
    for step in range(1, 11):
        tel.update(step=step, metrics={"loss": 5.0 - step / 10, "mfu": 0.4, "lr": 1e-3})
    tel.update(step=10, metrics={"evalLoss": 4.1})
    tel.finish({"model": str(tmp_path / "model")}, results={"benchmarks": {"arc": {"acc,none": 0.5}}})

    run = only_run(mlflow_server, "team/direct")
    assert run.info.status == "FINISHED" and run.info.run_name == "direct"
    assert run.data.params["spec.model.layers"] == "2" and run.data.params["spec.output"] == str(tmp_path)
    assert run.data.tags["lmforge.kind"] == "PretrainRun"
    cut = run.data.params["spec.model.init.path"]
    assert len(cut) == tracking.MAX_PARAM_LENGTH and cut.startswith("/mmm") and "…sha256:" in cut
    history = client(mlflow_server).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(s, 5.0 - s / 10) for s in range(1, 11)]
    assert run.data.metrics["evalLoss"] == 4.1 and run.data.metrics["results.benchmarks.arc.acc_none"] == 0.5
    files = {a.path for a in client(mlflow_server).list_artifacts(run.info.run_id)}
    assert {"outputs.json", "results.json", "model", "report"} <= files
    assert [a.path for a in client(mlflow_server).list_artifacts(run.info.run_id, "model")] == [
        "model/README.md"
    ]
    state = json.loads((tmp_path / tracking.STATE_FILE).read_text())
    assert state["mlflow"]["runId"] == run.info.run_id


@pytest.mark.slow  # starts an MLflow server
def test_a_resumed_run_continues_its_mlflow_run(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    res = resource(tmp_path, name="resumed", tracking_spec={"experiment": "resume-test"})
    train(tmp_path, range(1, 4), res)
    tracking.deactivate("KILLED")  # a stopped job
    assert only_run(mlflow_server, "resume-test").info.status == "KILLED"
    tel = train(tmp_path, range(4, 7), res)
    tel.finish({})
    run = only_run(mlflow_server, "resume-test")  # still one run
    assert run.info.status == "FINISHED"
    history = client(mlflow_server).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]

    changed = resource(tmp_path, name="resumed", tracking_spec={"experiment": "resume-test"})
    changed.spec.budget.steps = 99  # another spec in the same output: a run of its own
    train(tmp_path, range(1, 2), changed).finish({})
    exp = client(mlflow_server).get_experiment_by_name("resume-test")
    assert len(client(mlflow_server).search_runs([exp.experiment_id])) == 2


@pytest.mark.slow  # starts an MLflow server
def test_sweep_trials_are_children_of_one_parent_run(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for i in range(2):
        res = resource(tmp_path / f"t{i}", name=f"lr-t00{i}", labels={tracking.SWEEP_LABEL: "lr"})
        train(tmp_path / f"t{i}", range(1, 3), res).finish({})
    exp = client(mlflow_server).get_experiment_by_name("team/lr")
    runs = client(mlflow_server).search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lmforge.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_name == "lr"
    children = sorted(
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    )
    assert children == ["lr-t000", "lr-t001"]
    assert all(r.data.tags["lmforge.sweep"] == "lr" for r in runs)


@pytest.mark.slow  # a tiny PretrainRun trains, then resumes, against a real MLflow server
def test_a_pretrain_run_logs_to_mlflow_and_resumes_into_the_same_run(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge_jobs.pretrain.__main__ import main
    from lmforge_jobs.pretrain.testing import make_token_data

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    data = make_token_data(tmp_path / "tokens", vocab_size=320, documents=100, max_tokens_per_file=9000)
    out = tmp_path / "run"
    spec = tiny_pretrain(data, out, tracking={"tensorboard": True, "experiment": "pretrain-e2e"})
    path = write_manifest(tmp_path / "run.yaml", "PretrainRun", "run", spec)
    assert main(["--manifest", str(path)]) == 0
    run = only_run(mlflow_server, "pretrain-e2e")
    assert run.info.status == "FINISHED"
    history = client(mlflow_server).get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    assert {"tokensPerSecond", "evalLoss"} <= set(run.data.metrics)
    assert "outputs.json" in {a.path for a in client(mlflow_server).list_artifacts(run.info.run_id)}
    assert list((out / "tensorboard").iterdir())

    assert main(["--manifest", str(path)]) == 0  # again: it resumes from the last checkpoint
    assert only_run(mlflow_server, "pretrain-e2e").info.run_id == run.info.run_id


@pytest.mark.slow  # a tiny PretrainRun trains with MLflow's default retries against a closed port
def test_a_pretrain_run_succeeds_with_the_server_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge_jobs.pretrain.__main__ import main
    from lmforge_jobs.pretrain.testing import make_token_data

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    data = make_token_data(tmp_path / "tokens", vocab_size=320, documents=100, max_tokens_per_file=9000)
    out = tmp_path / "run"
    path = write_manifest(tmp_path / "run.yaml", "PretrainRun", "run", tiny_pretrain(data, out))
    started = time.monotonic()
    assert main(["--manifest", str(path)]) == 0
    assert json.loads((out / "progress.json").read_text())["state"] == "Succeeded"
    assert time.monotonic() - started < 120


def test_a_backend_failing_mid_run_is_dropped_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken:
        calls = 0

        def log(self, step: int, metrics: Any, wall: float) -> None:
            Broken.calls += 1
            raise ConnectionError("server went away")

    tracker = tracking.activate(resource(tmp_path, tracking_spec={"tensorboard": True}))
    assert tracker is not None
    tracker.backends["MLflow"] = Broken()
    tel = Telemetry("PretrainRun", tmp_path)
    for step in range(1, 5):
        tel.update(step=step, metrics={"loss": 1.0})
    tel.finish({})
    out = capsys.readouterr().out
    assert Broken.calls == 1 and out.count("MLflow tracking switched off") == 1
    assert "ConnectionError: server went away" in out
    assert list((tmp_path / "tensorboard").iterdir())  # TensorBoard went on


def test_wandb_offline_run_resumes_by_its_kept_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The W&B calls, against a stand-in module (wandb itself is an opt-in extra)."""
    import types

    calls: list[tuple[str, Any]] = []

    class Run:
        def log(self, metrics: dict[str, float], step: int) -> None:
            calls.append(("log", (step, metrics)))

        def finish(self, exit_code: int) -> None:
            calls.append(("finish", exit_code))

    def init(**kw: Any) -> Run:
        calls.append(("init", kw))
        return Run()

    fake = types.ModuleType("wandb")
    fake.init = init  # type: ignore[attr-defined]
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    res = resource(tmp_path, name="wb", labels={tracking.SWEEP_LABEL: "lr"})
    train(tmp_path, range(1, 3), res)
    tracking.deactivate("KILLED")
    fake.util.generate_id = lambda: "another"  # type: ignore[attr-defined]
    train(tmp_path, range(3, 4), res).finish({})
    inits = [kw for name, kw in calls if name == "init"]
    assert [kw["id"] for kw in inits] == ["abc123", "abc123"]  # the resumed job continues the run
    assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(tmp_path) and inits[0]["group"] == "lr"
    assert inits[0]["project"] == "team-lr" and inits[0]["config"]["spec.model.layers"] == "2"
    assert [args[0] for name, args in calls if name == "log"] == [1, 2, 3]
    assert [a for n, a in calls if n == "finish"] == [1, 0]  # stopped, then finished


@pytest.mark.slow  # a tiny Evaluation (perplexity and an lm-eval task) against a real MLflow server
def test_an_evaluation_logs_its_results(
    tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from repo import ROOT
    from tiny_models import tiny_llama

    from lmforge_jobs.evaluate.__main__ import main
    from lmforge_jobs.pretrain.testing import synthetic_texts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    texts = synthetic_texts(40, seed=3)
    model = tiny_llama(tmp_path / "model", texts=texts)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:8]), encoding="utf-8")
    spec = {
        "model": {"path": str(model)},
        "perplexity": {"data": str(held), "seqLen": 64, "stride": 32, "batchSize": 4},
        "benchmarks": [{"taskPath": str(ROOT / "examples" / "tasks" / "tiny_mcq.yaml")}],
        "precision": "fp32",
        "output": str(tmp_path / "out"),
        "tracking": {"experiment": "eval-e2e"},
    }
    assert main(["--manifest", str(write_manifest(tmp_path / "ev.yaml", "Evaluation", "ev", spec))]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    run = only_run(mlflow_server, "eval-e2e")
    assert run.info.status == "FINISHED" and run.data.tags["lmforge.kind"] == "Evaluation"
    assert run.data.metrics["results.perplexity"] == pytest.approx(results["perplexity"])
    assert run.data.metrics["results.benchmarks.tiny_mcq.acc"] == results["benchmarks"]["tiny_mcq"]["acc"]
    assert {"outputs.json", "results.json"} <= {
        a.path for a in client(mlflow_server).list_artifacts(run.info.run_id)
    }
