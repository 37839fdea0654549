"""Telemetry's files: progress.json and metrics.jsonl beside local outputs, nothing local for remote ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge_jobs.telemetry import Telemetry, local_dir


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
