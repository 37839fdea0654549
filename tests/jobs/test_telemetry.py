"""Telemetry's files: progress.json and metrics.jsonl beside local outputs, nothing local for remote ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge_jobs.telemetry import TERMINATION_MAX_BYTES, Telemetry, fit_termination_message, local_dir


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/run", Path("/data/run")),
        ("file:///data/run", Path("/data/run")),
        ("relative/run", Path("relative/run")),
        ("s3://bucket/run", None),
        ("gs://bucket/run", None),
        ("memory://x/run", None),
        ("", None),
        (None, None),
    ],
)
def test_local_dir(uri: str | None, expected: Path | None) -> None:
    assert local_dir(uri) == expected


def test_remote_output_writes_no_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tel = Telemetry("PretrainRun", "s3://bucket/run", port="off")
    tel.update(step=1, total_steps=2, metrics={"loss": 1.0}, force=True)
    tel.fail("spec.output: unreachable", field="spec.output")
    assert list(tmp_path.iterdir()) == []


def test_local_output_progress_and_history(tmp_path: Path) -> None:
    tel = Telemetry("PretrainRun", str(tmp_path), port="off")
    tel.update(step=1, total_steps=4, metrics={"loss": 2.0}, force=True)
    tel.update(step=2, metrics={"loss": 1.5, "bogus": float("nan")}, force=True)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["step"] == 2 and progress["percent"] == 50.0
    assert progress["metrics"] == {"loss": 1.5}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.0, 1.5]
    tel.finish({"model": str(tmp_path / "model")})
    assert json.loads((tmp_path / "outputs.json").read_text()) == {"model": str(tmp_path / "model")}
    assert json.loads((tmp_path / "progress.json").read_text())["state"] == "Succeeded"


def _many_tasks(n: int) -> dict[str, dict[str, float]]:
    return {
        f"task_{i:03d}": {
            "acc": 0.25 + i / 1000,
            "acc_stderr": 0.01,
            "acc_norm": 0.3,
            "acc_norm_stderr": 0.02,
        }
        for i in range(n)
    }


def test_termination_message_small_summary_is_verbatim() -> None:
    summary = {
        "state": "Succeeded",
        "outputs": {"results": "/x/results.json"},
        "results": {"perplexity": 9.5},
    }
    assert json.loads(fit_termination_message(summary)) == summary


def test_termination_message_sheds_detail_before_results() -> None:
    """A many-task Evaluation keeps its perplexity and one metric per task in status (the termination
    message is all the operator reads once the pod is gone); standard errors, history and metrics go first."""
    results = {
        "perplexity": 12.5,
        "benchmarks": _many_tasks(60),
        "history": [{"perplexity": 13.0, "checkpoint": f"round {i}"} for i in range(30)],
    }
    summary = {
        "state": "Succeeded",
        "outputs": {"results": "/x/results.json"},
        "metrics": {"tokensPerSecond": 1.0},
        "results": results,
    }
    assert len(json.dumps(summary)) > TERMINATION_MAX_BYTES
    text = fit_termination_message(summary)
    assert len(text.encode()) <= TERMINATION_MAX_BYTES
    doc = json.loads(text)
    assert doc["results"]["perplexity"] == 12.5
    assert set(doc["results"]["benchmarks"]) == set(results["benchmarks"])  # every task still there
    assert doc["results"]["benchmarks"]["task_007"]["acc"] == results["benchmarks"]["task_007"]["acc"]
    assert "history" not in doc["results"]
    assert doc["outputs"] == summary["outputs"]
    assert doc["truncated"][:2] == ["results.history", "results.benchmarks.*_stderr"]


def test_termination_message_drops_results_only_when_nothing_smaller_fits() -> None:
    summary = {
        "state": "Succeeded",
        "outputs": {"results": "/x/results.json"},
        "results": {"benchmarks": _many_tasks(250)},
    }
    doc = json.loads(fit_termination_message(summary))
    assert "results" not in doc and doc["outputs"] == summary["outputs"]
    assert doc["truncated"][-1] == "results"


def test_termination_message_cuts_a_long_error_message_but_stays_json() -> None:
    summary = {"state": "Failed", "message": "boom " * 2000, "field": "spec.model"}
    text = fit_termination_message(summary)
    assert len(text.encode()) <= TERMINATION_MAX_BYTES
    doc = json.loads(text)
    assert (
        doc["state"] == "Failed" and doc["field"] == "spec.model" and doc["message"].startswith("boom boom")
    )


def test_finish_writes_the_fitted_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("LMFORGE_TERMINATION_LOG", str(log))
    tel = Telemetry("Evaluation", str(tmp_path / "out"), port="off")
    tel.finish({"results": str(tmp_path / "out" / "results.json")}, {"benchmarks": _many_tasks(60)})
    doc = json.loads(log.read_text())
    assert len(log.read_bytes()) <= TERMINATION_MAX_BYTES
    assert doc["state"] == "Succeeded" and len(doc["results"]["benchmarks"]) == 60
