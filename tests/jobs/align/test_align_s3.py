"""The AlignmentRun job on object storage (a moto S3 server on loopback, tests/s3_fixtures.py), offline.

Base model, data and output on s3://; checkpoints published to the output with their marker last; a stop by
SIGTERM saves one and exits 143, and a run in a fresh pod (an empty scratch directory) resumes from it;
storage and Secret problems are one line naming the field and exit 64; hub tokens come from Secrets and
never show in logs or records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from repo import ROOT
from tiny_models import tiny_llama

from lmforge_jobs import storage
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED

DATA = ROOT / "examples" / "data"
HYPER = {"lr": 1.0e-3, "maxSteps": 4, "batchSize": 4, "microBatchSize": 4, "maxLength": 48}


@pytest.fixture(autouse=True)
def _scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline as every AlignmentRun test (conftest.py), with this test's own cache, scratch and secrets."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("base"), chat_template=False)


def put(local: str | Path, uri: str) -> str:
    storage.upload_tree(local, uri)
    return uri


def manifest(tmp: Path, name: str, spec: dict[str, Any]) -> Path:
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentRun",
        "metadata": {"name": name},
        "spec": {"precision": "fp32", "output": str(tmp / name), **spec},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def run_job(tmp: Path, name: str, spec: dict[str, Any]) -> int:
    from lmforge_jobs.align.__main__ import main

    return main(["--manifest", str(manifest(tmp, name, spec))])


def one_error(capsys: pytest.CaptureFixture[str], tmp: Path, name: str, spec: dict[str, Any]) -> str:
    assert run_job(tmp, name, spec) == EXIT_CONFIG_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def sft(base: str, data: str, **extra: Any) -> dict[str, Any]:
    return {
        "base": {"path": base},
        "method": "sft",
        "dataset": {"path": data, "format": "messages", "evalFraction": 0},
        "hyperparameters": HYPER,
        "checkpoint": {"everySteps": 100, "keep": 2},
        **extra,
    }


def logged_steps(metrics_jsonl: str) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics_jsonl.splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_publish_marker_last_prune_and_restore(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmforge_jobs.align import checkpoints

    output = f"{s3.uri}/runs/ck"
    work = tmp_path / "work"
    for step in (2, 4, 6):
        local = work / "checkpoints" / f"checkpoint-{step}"
        (local / "sub").mkdir(parents=True)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (local / "sub" / "weights.bin").write_bytes(bytes([step]) * 10)
        checkpoints.publish(local, output, keep=2)
    # a save cut short (no marker) newer than the newest complete one is not a checkpoint, but kept
    s3.client.put_object(
        Bucket=s3.bucket, Key="runs/ck/checkpoints/checkpoint-8/trainer_state.json", Body=b"{}"
    )
    assert s3.keys("runs/ck/") == [
        f"runs/ck/checkpoints/checkpoint-{s}/{f}"
        for s in (4, 6)
        for f in ("COMPLETE", "sub/weights.bin", "trainer_state.json")
    ] + ["runs/ck/checkpoints/checkpoint-8/trainer_state.json"]
    assert checkpoints.complete(output, "checkpoint") == [
        f"{output}/checkpoints/checkpoint-4",
        f"{output}/checkpoints/checkpoint-6",
    ]
    # a fresh pod: an empty working directory (a stale one is replaced) gets the newest complete one
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / "checkpoint-8").mkdir(parents=True)
    restored = checkpoints.restore(output, fresh, "checkpoint")
    assert restored == str(fresh / "checkpoints" / "checkpoint-6")
    assert (fresh / "checkpoints" / "checkpoint-6" / "sub" / "weights.bin").read_bytes() == bytes([6]) * 10
    assert sorted(p.name for p in (fresh / "checkpoints").iterdir()) == ["checkpoint-6"]
    assert checkpoints.restore(f"{s3.uri}/runs/none", tmp_path / "w2", "checkpoint") is None
    # a local output: the marker goes into the directory itself, which is also what restore returns
    local = tmp_path / "out" / "checkpoints" / "ppo-3"
    local.mkdir(parents=True)
    checkpoints.publish(local, str(tmp_path / "out"), keep=1)
    assert (local / "COMPLETE").exists()
    assert checkpoints.restore(str(tmp_path / "out"), tmp_path / "out", "ppo") == str(local)


# ------------------------------------------------------------------------------- stop, resume, outputs
@pytest.mark.slow
def test_sft_on_s3_stops_on_sigterm_and_a_fresh_pod_resumes(  # type: ignore[no-untyped-def]
    s3, tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Base, data and output on S3. SIGTERM at step 2 saves checkpoint-2 to the bucket (marker last) and
    exits 143; the next run, with an empty scratch directory, continues at step 3 and uploads the outputs."""
    import lmforge_jobs.align.trainers as trainers

    base_uri = put(base, f"{s3.uri}/models/base")
    data_uri = put(DATA / "sft.jsonl", f"{s3.uri}/data/chat.jsonl")
    output = f"{s3.uri}/runs/sft"
    spec = sft(base_uri, f"{s3.uri}/data/", output=output, peft={"lora": {"r": 4, "alpha": 8}})
    assert data_uri.startswith(spec["dataset"]["path"])

    real = trainers.make_callback

    def sigterm_at_step_2(tel: Any, ws: int) -> Any:
        callback = real(tel, ws)
        forward = callback.on_step_end

        def on_step_end(args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends a preempted pod
            return forward(args, state, control, **kw)

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(trainers, "make_callback", sigterm_at_step_2)
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "pod-1"))
    assert run_job(tmp_path, "sft", spec) == EXIT_STOPPED
    assert "stopped by signal after step 2" in capfd.readouterr().out
    keys = s3.keys("runs/sft/")
    assert "runs/sft/checkpoints/checkpoint-2/COMPLETE" in keys
    assert "runs/sft/checkpoints/checkpoint-2/trainer_state.json" in keys
    assert "runs/sft/outputs.json" not in keys and not any(k.startswith("runs/sft/model/") for k in keys)
    first = logged_steps(
        s3.client.get_object(Bucket=s3.bucket, Key="runs/sft/metrics.jsonl")["Body"].read().decode()
    )
    assert first == [1, 2]

    monkeypatch.setattr(trainers, "make_callback", real)
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "pod-2"))  # the replacement pod starts empty
    assert run_job(tmp_path, "sft", spec) == 0
    assert "resuming from" in capfd.readouterr().out
    metrics = s3.client.get_object(Bucket=s3.bucket, Key="runs/sft/metrics.jsonl")["Body"].read().decode()
    assert logged_steps(metrics) == [3, 4]  # continued from checkpoint-2, did not start over
    keys = s3.keys("runs/sft/")
    outputs = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="runs/sft/outputs.json")["Body"].read())
    assert outputs == {"model": f"{output}/model", "adapter": f"{output}/adapter"}
    assert "runs/sft/adapter/adapter_model.safetensors" in keys and "runs/sft/model/tokenizer.json" in keys
    adapter_cfg = json.loads(
        s3.client.get_object(Bucket=s3.bucket, Key="runs/sft/adapter/adapter_config.json")["Body"].read()
    )
    assert adapter_cfg["base_model_name_or_path"] == base_uri  # what a later run fetches again
    assert "runs/sft/checkpoints/checkpoint-4/COMPLETE" in keys  # the final save is published too
    progress = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="runs/sft/progress.json")["Body"].read())
    assert progress["state"] == "Succeeded"


def test_unmerged_adapter_on_s3_as_the_next_base(  # type: ignore[no-untyped-def]
    s3, tmp_path: Path, base: str
) -> None:
    """An AlignmentRun's LoRA output on S3 (whose adapter names its base by s3:// URI) is the next base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge_jobs.align.models import load_causal_lm, model_source
    from lmforge_jobs.spec import ModelRef

    base_uri = put(base, f"{s3.uri}/models/base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.peft_config["default"].base_model_name_or_path = base_uri
    model.save_pretrained(tmp_path / "adapter")
    put(tmp_path / "adapter", f"{s3.uri}/runs/a/model")
    source, kwargs = model_source(ModelRef(path=f"{s3.uri}/runs/a/model"), "base")
    merged = load_causal_lm(source, kwargs, "base")
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_ppo_on_s3_stops_on_sigterm_and_resumes(  # type: ignore[no-untyped-def]
    s3, tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """ppo's own loop, with the reward model on S3 too: SIGTERM during iteration 2 publishes ppo-2 after it
    and exits 143; a fresh pod resumes at iteration 3."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import lmforge_jobs.align.ppo as ppo

    reward = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(base)
    reward.config.pad_token_id = tok.pad_token_id
    reward.save_pretrained(tmp_path / "reward")
    tok.save_pretrained(tmp_path / "reward")
    output = f"{s3.uri}/runs/ppo"
    spec = {
        "base": {"path": put(base, f"{s3.uri}/models/base")},
        "method": "ppo",
        "rewardModel": {"path": put(tmp_path / "reward", f"{s3.uri}/models/reward")},
        "dataset": {"path": put(DATA / "prompts.jsonl", f"{s3.uri}/data/p.jsonl"), "format": "prompts"},
        "hyperparameters": {
            "maxSteps": 4,
            "batchSize": 4,
            "microBatchSize": 4,
            "ppo": {"rolloutBatchSize": 4, "maxNewTokens": 4, "ppoEpochs": 1},
        },
        "checkpoint": {"everySteps": 100},
        "output": output,
    }
    real = ppo.any_rank

    def sigterm_once(flag: bool, device: Any) -> bool:
        if not sent:  # at the end of iteration 1, after its flag was read: iteration 2 sees it
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(flag, device)

    sent: list[bool] = []

    monkeypatch.setattr(ppo, "any_rank", sigterm_once)
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "pod-1"))
    assert run_job(tmp_path, "ppo", spec) == EXIT_STOPPED
    assert "runs/ppo/checkpoints/ppo-2/COMPLETE" in s3.keys("runs/ppo/")
    monkeypatch.setattr(ppo, "any_rank", real)
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "pod-2"))
    capfd.readouterr()
    assert run_job(tmp_path, "ppo", spec) == 0
    assert "resuming PPO from" in capfd.readouterr().out
    metrics = s3.client.get_object(Bucket=s3.bucket, Key="runs/ppo/metrics.jsonl")["Body"].read().decode()
    steps = [r["step"] for r in map(json.loads, metrics.splitlines()) if "meanReward" in r]
    assert steps == [3, 4], steps
    assert "runs/ppo/outputs.json" in s3.keys("runs/ppo/")


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "problem", ["base-missing", "data-missing", "data-bucket", "output-bucket", "denied"]
)
def test_storage_problems_are_one_line_naming_the_field(  # type: ignore[no-untyped-def]
    problem: str,
    s3,
    tmp_path: Path,
    base: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = put(DATA / "sft.jsonl", f"{s3.uri}/data/chat.jsonl")
    spec = sft(base, data)
    if problem == "base-missing":
        spec["base"]["path"] = f"{s3.uri}/models/none"
        expected = (
            f"error: spec.base.path: no Hugging Face model directory (config.json) at {s3.uri}/models/none"
        )
    elif problem == "data-missing":
        spec["dataset"]["path"] = f"{s3.uri}/data/nothing.jsonl"
        expected = f"error: spec.dataset.path: no JSONL or Parquet files at {s3.uri}/data/nothing.jsonl"
    elif problem == "data-bucket":
        spec["dataset"]["path"] = "s3://no-such-bucket/chat.jsonl"
        expected = "error: spec.dataset.path: bucket s3://no-such-bucket does not exist"
    elif problem == "output-bucket":
        spec["output"] = "s3://no-such-bucket/run"
        expected = "error: spec.output: bucket s3://no-such-bucket does not exist"
    else:
        spec["base"]["path"] = put(base, f"{s3.uri}/models/base")
        s3.enforce_auth()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zq9-secret-value")
        expected = f"error: spec.base.path: access denied to {s3.uri}/models/base"
    line = one_error(capsys, tmp_path, problem, spec)
    assert line.startswith(expected), line
    assert "AKIAWRONG" not in line and "zq9-secret" not in line
    if problem != "output-bucket":
        progress = json.loads((tmp_path / problem / "progress.json").read_text())
        assert progress["state"] == "Invalid" and progress["field"] == expected.split(":")[1].strip()


# ------------------------------------------------------------------------------------------ hub tokens
def _hub_spec(base: str) -> dict[str, Any]:
    spec = sft(base, str(DATA / "sft.jsonl"))
    spec["base"] = {
        "huggingface": "acme/private-tiny",
        "token": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    spec["hyperparameters"] = {**HYPER, "maxSteps": 1}
    return spec


def test_missing_hub_token_secret_names_the_field(  # type: ignore[no-untyped-def]
    tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LMFORGE_SECRET_HF_TOKEN", raising=False)
    line = one_error(capsys, tmp_path, "no-token", _hub_spec(base))
    assert line.startswith("error: spec.base.token: Secret 'hf' key 'token' is not available"), line


def test_hub_token_reaches_the_loader_and_never_the_records(  # type: ignore[no-untyped-def]
    tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The hub stands in as a fake from_pretrained serving the local tiny model (no download)."""
    import transformers

    token = "hf_zq9SecretTokenValue"
    monkeypatch.setenv("LMFORGE_SECRET_HF_TOKEN", token)
    monkeypatch.setenv("LMFORGE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    seen: list[tuple[str, str, Any]] = []

    def hub(cls: Any) -> Any:
        real = cls.from_pretrained

        def from_pretrained(source: Any, *args: Any, **kwargs: Any) -> Any:
            if source == "acme/private-tiny":
                seen.append((cls.__name__, source, kwargs.pop("token", None)))
                source = base
            return real(source, *args, **kwargs)

        return from_pretrained

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", hub(cls))
    assert run_job(tmp_path, "hub", _hub_spec(base)) == 0
    assert ("AutoTokenizer", "acme/private-tiny", token) in seen
    assert ("AutoModelForCausalLM", "acme/private-tiny", token) in seen
    captured = capfd.readouterr()
    assert token not in captured.out + captured.err
    records = [p for p in (tmp_path / "hub").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert any(p.name == "progress.json" for p in records)
    for path in [*records, tmp_path / "termination-log"]:
        assert token not in path.read_text(encoding="utf-8"), path


# ----------------------------------------------------------------------- a real SIGTERM, as a process
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigterm_to_the_process_exits_143_and_the_rerun_resumes(  # type: ignore[no-untyped-def]
    where: str, s3, tmp_path: Path, base: str
) -> None:
    """``python -m lmforge_jobs.align`` gets SIGTERM mid-training: exit 143 with a complete checkpoint;
    running it again (for S3 from an empty scratch directory) continues from that step and finishes."""
    output = f"{s3.uri}/runs/proc" if where == "s3" else str(tmp_path / "proc")
    spec = sft(base, str(DATA / "sft.jsonl"), output=output)
    spec["hyperparameters"] = {**HYPER, "maxSteps": 400}
    path = manifest(tmp_path, "proc", spec)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_SCRATCH": str(tmp_path / "pod-1")}
    cmd = [sys.executable, "-m", "lmforge_jobs.align", "--manifest", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("{'loss'") and sum(x.startswith("{'loss'") for x in lines) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == EXIT_STOPPED, log
    from lmforge_jobs.align import checkpoints

    done = checkpoints.complete(output, "checkpoint")
    assert len(done) == 1, log
    step = int(done[0].rsplit("-", 1)[1])
    assert 2 <= step < 400

    spec["hyperparameters"]["maxSteps"] = step + 2
    manifest(tmp_path, "proc", spec)
    env["LMFORGE_SCRATCH"] = str(tmp_path / "pod-2")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming from" in second.stdout
    fs, root = storage.filesystem(output)
    metrics = fs.cat_file(f"{root}/metrics.jsonl").decode()
    assert logged_steps(metrics)[-2:] == [step + 1, step + 2]
    assert step + 1 not in logged_steps(metrics)[:-2]
    assert fs.isfile(f"{root}/outputs.json") and fs.isfile(f"{root}/model/model.safetensors")
