"""The README's main command end to end: `lmforge run examples/quickstart` on CPU, offline.

One pipeline run covers the whole pipeline's promises: it is interrupted with SIGINT during pretraining, rerun
(finished resources are skipped, pretraining resumes from its checkpoint), and must end with every
resource Succeeded, the report written, a held-out perplexity below the untrained model's and a positive
DPO reward margin. A third run finds everything up to date.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import offline_env
from repo import ROOT

KINDS = {"corpus": "tiny-web", "pretrainrun": "tiny-gpt", "evaluation": "tiny-eval"}


def _lmforge() -> str:
    return shutil.which("lmforge") or str(Path(sys.executable).parent / "lmforge")


def _status(workdir: Path, kind: str, name: str) -> dict:
    return json.loads((workdir / kind / name / "status.json").read_text())


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"step"' in line]


def _untrained_perplexity(model_dir: Path, held_out: str) -> float:
    """Perplexity of a randomly initialised model with the trained model's config, on the same data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge_jobs.evaluate.perplexity import perplexity_of_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return perplexity_of_model(model, model_dir, held_out, seq_len=64, batch_size=8)


@pytest.mark.slow
def test_quickstart_interrupt_resume_complete(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"
    cmd = [_lmforge(), "run", "examples/quickstart", "--workdir", str(workdir), "--plain"]
    log = open(tmp_path / "run1.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=offline_env(), stdout=log, stderr=subprocess.STDOUT)
    progress = workdir / "pretrainrun" / "tiny-gpt" / "progress.json"
    deadline = time.monotonic() + 240
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            step = json.loads(progress.read_text()).get("step", 0)
        except (OSError, ValueError):
            step = 0
        if step >= 60:
            break
        time.sleep(0.3)
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
    assert step >= 60, "pretraining did not get going in time"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    log.close()
    out1 = (tmp_path / "run1.log").read_text()
    assert code == 130, out1[-3000:]
    status = _status(workdir, "pretrainrun", "tiny-gpt")
    assert status["phase"] == "Failed"
    assert any(c["reason"] == "Interrupted" for c in status["conditions"]), status
    assert _status(workdir, "corpus", "tiny-web")["phase"] == "Succeeded"
    stats_mtime = (workdir / "corpus" / "tiny-web" / "stats.json").stat().st_mtime
    interrupted_at = max(_steps(workdir / "pretrainrun" / "tiny-gpt" / "metrics.jsonl"))

    run2 = subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert run2.returncode == 0, (run2.stdout + run2.stderr)[-4000:]
    assert "Corpus/tiny-web: up to date, skipped" in run2.stdout
    assert (workdir / "corpus" / "tiny-web" / "stats.json").stat().st_mtime == stats_mtime
    steps = _steps(workdir / "pretrainrun" / "tiny-gpt" / "metrics.jsonl")
    # the resumed run's first row repeats (or precedes) the last step logged before the interruption
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    # SIGINT → the job saves the step in flight, so at most one step is lost (not 50 back to the last
    # periodic checkpoint)
    assert steps[restart] >= interrupted_at - 1, (
        f"resumed at step {steps[restart]}, interrupted at {interrupted_at}"
    )

    for kind, name in [
        ("corpus", "tiny-web"),
        ("pretrainrun", "tiny-gpt"),
        ("alignmentrun", "tiny-sft"),
        ("alignmentrun", "tiny-dpo"),
        ("evaluation", "tiny-eval"),
    ]:
        assert _status(workdir, kind, name)["phase"] == "Succeeded", (kind, name)
    html = (workdir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert {"corpus-tiny-web-funnel.png", "pretrainrun-tiny-gpt-loss.png"} <= {
        p.name for p in (workdir / "report").glob("*.png")
    }

    corpus = _status(workdir, "corpus", "tiny-web")
    docs = corpus["documents"]
    assert docs["read"] == docs["kept"] + sum(docs["removedBy"].values())
    dpo = _status(workdir, "alignmentrun", "tiny-dpo")
    assert dpo["metrics"]["rewardMargin"] > 0, dpo["metrics"]
    results = _status(workdir, "evaluation", "tiny-eval")["results"]
    assert results["benchmarks"], results
    model_dir = workdir / "pretrainrun" / "tiny-gpt" / "model"
    untrained = _untrained_perplexity(model_dir, corpus["outputs"]["heldOut"])
    trained = _status(workdir, "pretrainrun", "tiny-gpt")
    assert results["perplexity"] < untrained, (results["perplexity"], untrained)
    assert trained["metrics"]["loss"] < 5.0

    run3 = subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert run3.returncode == 0, run3.stderr[-2000:]
    assert run3.stdout.count("up to date, skipped") == 5, run3.stdout
    status_out = subprocess.run(
        [_lmforge(), "status", "--workdir", str(workdir)], capture_output=True, text=True, check=True
    ).stdout
    assert status_out.count("Succeeded") == 5
