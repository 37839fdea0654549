"""bench/gpu.py (the one-GPU check) stays runnable: its CPU smoke run goes end to end and writes a JSON and a
Markdown table in which every row has a value or says why not; without a GPU and without --smoke it refuses
with exit 2; the peak table tells H100 SXM from PCIe; a failed or timed-out measurement becomes a row.

The numbers themselves come from running it on a GPU (bench/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from repo import ROOT

BENCH = ROOT / "bench" / "gpu.py"
ROW_NAMES = [
    "pretrain-124m/lmforge",
    "pretrain-124m/transformers",
    "pretrain-124m/ratio",
    "pretrain-1b/lmforge",
    "pretrain-1b/transformers",
    "pretrain-1b/ratio",
    "fp8-1b/ratio",
    "fsdp2-124m/ratio",
    "sft/ratio",
    "dpo/ratio",
    "nvml",
]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lmforge_bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_rows(rows: list[dict[str, Any]]) -> None:
    assert [r["name"] for r in rows] == ROW_NAMES
    for r in rows:
        has_value = r["value"] is not None
        assert has_value or (r["reason"] and r["reason"].strip()), r
        if r["met"] is not None:
            assert has_value and r["goal"], r


def test_peak_table_matches_by_name_substring() -> None:
    bench = load_bench()

    def peak(name: str) -> float | None:
        return next((tflops for key, _, tflops in bench.PEAKS if key in name.lower()), None)

    assert peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA L4") == 121.0
    assert peak("NVIDIA L40S") == 362.0
    assert peak("Tesla T4") is None


def test_failed_and_timed_out_measurements_become_rows_with_a_reason() -> None:
    bench = load_bench()
    ok = {"ok": True, "secondsPerStep": 0.1, "tokensPerStep": 16384, "flopsPerToken": 1e9}
    results = {m.name: dict(ok) for m in bench.measurements(smoke=False)}
    results["pretrain-1b/transformers"] = {"ok": False, "error": "OutOfMemoryError: CUDA out of memory"}
    results["fp8-1b/lmforge"] = {"ok": False, "skipped": "skipped: time budget"}
    results["sft/trl"] = {"ok": False, "error": "ModuleNotFoundError: No module named 'trl'"}
    results["pretrain-124m/lmforge"]["prometheus"] = {
        "values": {"lmforge_gpu_utilization_ratio": 0.97, "lmforge_train_tokens_per_second": 1.6e5}
    }
    info = {"peakTflops": 989.0}
    rows = {r["name"]: r for r in bench.build_rows(results, info, smoke=False)}
    check_rows(list(rows.values()))
    assert rows["pretrain-124m/lmforge"]["mfu"] == pytest.approx(1e9 * 163840 / 989e12)
    assert rows["pretrain-124m/lmforge"]["met"] is False  # 16.6 % < 45 %
    assert rows["pretrain-124m/ratio"]["value"] == 1.0 and rows["pretrain-124m/ratio"]["met"] is False
    assert "out of memory" in rows["pretrain-1b/ratio"]["reason"]
    assert rows["fp8-1b/ratio"]["reason"] == "skipped: time budget"
    assert "trl" in rows["sft/ratio"]["reason"]
    assert rows["nvml"]["value"] == 0.97 and rows["nvml"]["met"] is True
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "peakTflops": 989.0,
           "peakSource": "table: H100 SXM dense bf16"}  # fmt: skip
    table = bench.markdown(
        {
            "date": "2026-12-06",
            "smoke": False,
            "environment": env,
            "wallSeconds": 400.0,
            "rows": list(rows.values()),
        }
    )
    assert (
        "| pretrain-124m/lmforge |" in table and "163,840 tokens/s | 16.6% | MFU ≥ 45% | not met |" in table
    )
    assert "| nvml |" in table and "| met |" in table and "NVIDIA H100 80GB HBM3" in table
    unknown = {r["name"]: r for r in bench.build_rows(results, {"peakTflops": None}, smoke=False)}
    assert unknown["pretrain-124m/lmforge"]["met"] is None
    assert "MFU not computed" in unknown["pretrain-124m/lmforge"]["reason"]


@pytest.mark.slow  # importing torch alone takes seconds
def test_without_a_gpu_it_exits_2_unless_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert load_bench().main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--smoke" in err
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_smoke_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["smoke"] is True
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and "MFU not computed" in env["peakSource"]
    check_rows(report["rows"])
    rows = {r["name"]: r for r in report["rows"]}
    # the CPU measurements ran (a slow machine may still skip one: then it says so)
    for name in ("pretrain-124m/lmforge", "pretrain-124m/transformers", "fsdp2-124m/ratio"):
        assert rows[name]["value"] is not None or "time budget" in rows[name]["reason"], rows[name]
    assert rows["fp8-1b/ratio"]["reason"].startswith("unsupported on cpu")
    assert rows["nvml"]["reason"].startswith("unsupported on cpu")
    assert rows["nvml"]["scraped"] is True  # the Trainer's Prometheus endpoint answered
    assert all(r["met"] is None for r in report["rows"])  # goals are judged on a GPU only
    measured = report["measurements"]["pretrain-124m/lmforge"]
    assert measured["ok"] and measured["timedSteps"] >= 3 and measured["flopsPerToken"] > 0
    table = (out / "gpu.md").read_text()
    assert table.startswith("# GPU check") and "| row | what | value | MFU | goal | met | note |" in table
    for name in ROW_NAMES:
        assert f"| {name} |" in table


@pytest.mark.slow
def test_measurements_past_their_budget_become_skipped_rows(tmp_path: Path) -> None:
    """Every measurement killed at a budget of about half a second (compile workers and all), the run's
    deadline reached part way: still a full report, every row skipped for time or unsupported on cpu."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--out",
            str(out),
            "--budget-scale",
            "0.002",
            "--deadline",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    check_rows(report["rows"])
    measured = report["measurements"]
    assert measured["pretrain-124m/lmforge"]["skipped"] == "skipped: time budget"
    assert measured["dpo/trl"]["skipped"].startswith("skipped: time budget")
    assert "deadline" in measured["dpo/trl"]["skipped"]
    for r in report["rows"]:
        assert r["value"] is None
        assert (
            "time budget" in r["reason"]
            or r["reason"].startswith("unsupported on cpu")
            or (r["name"] == "nvml" and "time budget" in r["reason"])
        ), r
