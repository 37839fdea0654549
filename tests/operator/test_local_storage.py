"""Object storage on one machine: what `lmforge run` puts into a job's environment (``--s3-endpoint``,
``spec.storage``, the user's environment, ``$LMFORGE_SECRETS_DIR``), jobs reaching the loopback S3 server
(tests/s3_fixtures.py) through it, and a PretrainRun killed in the middle of a checkpoint upload resuming
from the checkpoint before it."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests import resource, tiny_pretrain

from lmforge_jobs.manifest import parse_resource
from lmforge_operator.cli import main
from lmforge_operator.local import read_status
from lmforge_operator.local.storage import storage_env

CLOSED = "http://127.0.0.1:1"  # nothing listens there: a job sent to it cannot find any bucket


def pretrain_doc(name: str, data: dict[str, str], output: str, **spec: Any) -> dict[str, Any]:
    """The tiny CPU PretrainRun keeping three checkpoints, with ``spec``'s changes."""
    return resource("PretrainRun", name, tiny_pretrain(data, output, **{"checkpoint": {"keep": 3}, **spec}))


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def parsed(doc: dict[str, Any]) -> Any:
    resource, problems = parse_resource(copy.deepcopy(doc))
    assert not problems, problems
    return resource


def condition_message(workdir: Path, kind: str, name: str) -> tuple[str, str]:
    status = read_status(workdir, kind, name) or {}
    phase = status.get("phase", "")
    messages = [c.get("message", "") for c in status.get("conditions", []) if c.get("type") == phase]
    return phase, " ".join(messages)


@pytest.fixture
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LMFORGE_TERMINATION_LOG", "LMFORGE_SECRETS_DIR"):
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------------------------ the job environment
def test_endpoint_precedence_flag_spec_then_environment(tmp_path: Path) -> None:
    data = {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"}
    bare = parsed(pretrain_doc("r", data, "s3://b/out"))
    with_spec = parsed(
        pretrain_doc(
            "r", data, "s3://b/out", storage={"endpoint": "http://minio.local:9000", "region": "eu-1"}
        )
    )
    environ = {"LMFORGE_S3_ENDPOINT": "http://from-env:9000"}
    # nothing configured here: the user's environment reaches the job unchanged (it inherits it)
    assert storage_env(bare, None, environ) == {}
    assert storage_env(bare, "http://flag:9000", environ) == {"LMFORGE_S3_ENDPOINT": "http://flag:9000"}
    assert storage_env(with_spec, None, environ) == {
        "LMFORGE_S3_ENDPOINT": "http://minio.local:9000",
        "AWS_REGION": "eu-1",
        "AWS_DEFAULT_REGION": "eu-1",
    }
    assert storage_env(with_spec, "http://flag:9000", environ)["LMFORGE_S3_ENDPOINT"] == "http://flag:9000"


def test_a_local_copy_of_the_secrets_in_lmforge_secrets_dir(tmp_path: Path) -> None:
    """spec.storage.credentials names a cluster Secret; locally its copy as files stands in for envFrom,
    below what the user's environment already sets."""
    secrets = tmp_path / "secrets"
    (secrets / "s3-credentials").mkdir(parents=True)
    (secrets / "s3-credentials" / "AWS_ACCESS_KEY_ID").write_text("AKIAFROMFILE\n")
    (secrets / "s3-credentials" / "AWS_SECRET_ACCESS_KEY").write_text("from-file")
    (secrets / "s3-credentials" / "not a variable").write_text("x")
    (secrets / "gcs").mkdir()
    (secrets / "gcs" / "key.json").write_text("{}")
    storage = {
        "credentials": {"secretName": "s3-credentials"},
        "gcsCredentials": {"secretKeyRef": {"name": "gcs", "key": "key.json"}},
    }
    resource = parsed(
        pretrain_doc("r", {"tokens": "s3://b/t", "tokenizer": "s3://b/k"}, "s3://b/o", storage=storage)
    )
    environ = {"LMFORGE_SECRETS_DIR": str(secrets)}
    assert storage_env(resource, None, environ) == {
        "AWS_ACCESS_KEY_ID": "AKIAFROMFILE",
        "AWS_SECRET_ACCESS_KEY": "from-file",
        "GOOGLE_APPLICATION_CREDENTIALS": str(secrets / "gcs" / "key.json"),
    }
    environ.update(AWS_ACCESS_KEY_ID="AKIAENV", GOOGLE_APPLICATION_CREDENTIALS="/mine.json")
    assert storage_env(resource, None, environ) == {"AWS_SECRET_ACCESS_KEY": "from-file"}
    assert storage_env(resource, None, {"LMFORGE_SECRETS_DIR": str(tmp_path / "none")}) == {}


def test_a_bad_s3_endpoint_flag_is_a_usage_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, pretrain_doc("r", {"tokens": "s3://b/t", "tokenizer": "s3://b/k"}, "s3://b/o"))
    code = main(
        ["run", "--workdir", str(tmp_path / "w"), "--s3-endpoint", "http://k:secret@minio:9000", str(path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("--s3-endpoint: endpoint with credentials") and "secret@" not in err
    assert not (tmp_path / "w").exists()


def _run(tmp_path: Path, doc: dict[str, Any], *flags: str) -> int:
    args = ["run", "--workdir", str(tmp_path / "w"), "--plain", "--no-report", "--metrics-port", "-1"]
    return main([*args, *flags, str(write(tmp_path, doc))])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["flag", "spec"])
def test_the_endpoint_reaches_the_job(
    tmp_path: Path, s3, monkeypatch: pytest.MonkeyPatch, quiet_env: None, source: str
) -> None:  # type: ignore[no-untyped-def]
    """A PretrainRun whose data is missing from a bucket that exists only on the loopback server: the job
    says the object does not exist — it asked that server — and stops with a configuration error. The
    lower-precedence place points at a closed port (the spec under the flag, the environment under the
    spec), so the other one must have won."""
    data = {"tokens": f"{s3.uri}/corpus/tokens", "tokenizer": f"{s3.uri}/corpus/tokenizer"}
    if source == "flag":
        doc = pretrain_doc("flagged", data, f"{s3.uri}/runs/x", storage={"endpoint": CLOSED})
        code = _run(tmp_path, doc, "--s3-endpoint", s3.endpoint)
    else:
        monkeypatch.setenv("LMFORGE_S3_ENDPOINT", CLOSED)
        doc = pretrain_doc("specified", data, f"{s3.uri}/runs/x", storage={"endpoint": s3.endpoint})
        code = _run(tmp_path, doc)
    assert code == 1
    phase, message = condition_message(tmp_path / "w", "PretrainRun", doc["metadata"]["name"])
    assert phase == "Invalid", message
    assert f"{s3.uri}/corpus/" in message and "does not exist" in message, message


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from lmforge_jobs.pretrain.testing import make_token_data

    return make_token_data(
        tmp_path_factory.mktemp("tokens"), vocab_size=320, documents=300, max_tokens_per_file=9000
    )


@pytest.mark.slow
def test_lmforge_run_with_the_output_on_s3_succeeds_and_skips_on_rerun(
    tmp_path: Path, data: dict[str, str], s3, quiet_env: None
) -> None:  # type: ignore[no-untyped-def]
    """Nothing of a remote output lies in the work directory: the job reports its progress and outputs into
    the run directory (as for a local output), and a rerun of the same spec is up to date."""
    out = f"{s3.uri}/runs/remote"
    doc = pretrain_doc("remote", data, out, budget={"steps": 4}, checkpoint={"everySteps": 4, "keep": 1})
    assert _run(tmp_path, doc, "--s3-endpoint", s3.endpoint) == 0
    status = read_status(tmp_path / "w", "PretrainRun", "remote")
    assert status["phase"] == "Succeeded"
    assert status["outputs"]["model"] == f"{out}/model" and "runs/remote/model/model.safetensors" in s3.keys(
        "runs/"
    )
    run_dir = tmp_path / "w" / "pretrainrun" / "remote"
    assert json.loads((run_dir / "outputs.json").read_text()) == status["outputs"]
    assert json.loads((run_dir / "progress.json").read_text())["state"] == "Succeeded"
    assert status["progress"]["step"] == 4  # live progress was mirrored from the run directory
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists()
    assert _run(tmp_path, doc, "--s3-endpoint", s3.endpoint) == 0
    assert read_status(tmp_path / "w", "PretrainRun", "remote")["completionTime"] == status["completionTime"]


# ------------------------------------------------------------------------ SIGKILL during a checkpoint upload
class HeldUpload:
    """Holds the loopback server's PUT of one object (the server runs in this process) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str):
        from moto.s3.models import S3Backend

        self.suffix = suffix
        self.entered = threading.Event()
        self.release = threading.Event()
        original = S3Backend.put_object

        def put_object(backend: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
            if key_name.endswith(suffix) and not self.entered.is_set():
                self.entered.set()
                self.release.wait(120)
            return original(backend, bucket_name, key_name, *args, **kwargs)

        monkeypatch.setattr(S3Backend, "put_object", put_object)


def _job(path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "LMFORGE_METRICS_PORT": "off", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge_jobs.pretrain", "--manifest", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_upload_leaves_the_previous_one_usable(
    tmp_path: Path, data: dict[str, str], s3, monkeypatch: pytest.MonkeyPatch, quiet_env: None
) -> None:  # type: ignore[no-untyped-def]
    """The step-8 save is stopped half-way (its tensors and metadata uploaded, its RNG object held by the
    server) and the job killed: step 4 stays the newest checkpoint, the rerun resumes from it, redoes
    the save and finishes."""
    from lmforge_jobs.pretrain import checkpoint as ckpt

    out = f"{s3.uri}/runs/killed"
    held = HeldUpload(monkeypatch, "runs/killed/checkpoints/step-00000008/rng-0.pt")
    path = write(tmp_path, pretrain_doc("killed", data, out))
    proc = _job(path)
    try:
        assert held.entered.wait(300), proc.stdout.read() if proc.poll() is not None else "no step-8 upload"
        partial = s3.keys("runs/killed/checkpoints/step-00000008/")
        assert partial and not [k for k in partial if k.endswith(f"/{ckpt.MARKER}")], partial
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        held.release.set()
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30  # the held PUT completes now: a step-8 object without its marker
    while (
        "runs/killed/checkpoints/step-00000008/rng-0.pt" not in s3.keys("runs/")
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert ckpt.latest(f"{out}/checkpoints")[0] == 4
    assert not any(k.startswith("runs/killed/model/") for k in s3.keys("runs/"))

    rerun = _job(path)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log
    assert f"resumed from {out}/checkpoints/step-00000004 at step 4" in log, log
    assert [s for s, _ in ckpt.list_complete(f"{out}/checkpoints")] == [4, 8]
    keys = s3.keys("runs/killed/")
    assert "runs/killed/model/model.safetensors" in keys
    assert not [k for k in keys if k.endswith(".tmp")]
