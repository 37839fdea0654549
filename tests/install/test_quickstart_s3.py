"""The quickstart chain with every input and output on object storage, through `lmforge run`.

The S3 server is real (moto's standalone server on 127.0.0.1); the manifests are the
quickstart's, with each `output`, the Corpus source and the AlignmentRun datasets rewritten to
``s3://<bucket>/...``. The chain must end Succeeded with the same numbers as the same chain on local disk,
its outputs in the bucket and none on the local disk; a missing bucket is a configuration error naming
the field.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from data_fixtures import offline_env
from repo import ROOT

QUICKSTART = ROOT / "examples" / "quickstart"
DATA = ROOT / "examples" / "data"
CHAIN = [
    ("corpus", "tiny-web"),
    ("pretrainrun", "tiny-gpt"),
    ("alignmentrun", "tiny-sft"),
    ("alignmentrun", "tiny-dpo"),
    ("evaluation", "tiny-eval"),
]


def _lmforge() -> str:
    return shutil.which("lmforge") or str(Path(sys.executable).parent / "lmforge")


def _run(manifests: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [_lmforge(), "run", str(manifests), "--workdir", str(workdir), "--plain"]
    return subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=1200)


def _status(workdir: Path, kind: str, name: str) -> dict[str, Any]:
    return json.loads((workdir / kind / name / "status.json").read_text())


def _on_s3(bucket_uri: str, out: Path) -> None:
    """The quickstart manifests with every output and data input in the bucket, written into ``out``."""
    out.mkdir()
    for path in sorted(QUICKSTART.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for doc in docs:
            spec = doc["spec"]
            spec["output"] = f"{bucket_uri}/runs/{doc['kind'].lower()}/{doc['metadata']['name']}"
            for source in spec.get("sources", []):
                for reader in source.values():
                    reader["paths"] = [f"{bucket_uri}/data/{Path(p).name}" for p in reader["paths"]]
            if "dataset" in spec and "path" in spec["dataset"]:
                spec["dataset"]["path"] = f"{bucket_uri}/data/{Path(spec['dataset']['path']).name}"
        (out / path.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))


@pytest.mark.slow
def test_quickstart_chain_on_s3_matches_the_local_run(tmp_path: Path, s3) -> None:  # type: ignore[no-untyped-def]
    for name in ("python-docs.warc.gz", "sft.jsonl", "pairs.jsonl"):
        s3.client.upload_file(str(DATA / name), s3.bucket, f"data/{name}")
    _on_s3(s3.uri, tmp_path / "manifests")

    remote = _run(tmp_path / "manifests", tmp_path / "remote")
    assert remote.returncode == 0, (remote.stdout + remote.stderr)[-5000:]
    local = _run(QUICKSTART, tmp_path / "local")
    assert local.returncode == 0, (local.stdout + local.stderr)[-5000:]

    for kind, name in CHAIN:
        status = _status(tmp_path / "remote", kind, name)
        assert status["phase"] == "Succeeded", (kind, name, status)
        for key, uri in (status.get("outputs") or {}).items():
            assert str(uri).startswith(f"{s3.uri}/runs/{kind}/{name}"), (kind, name, key, uri)
        # nothing but the runner's bookkeeping (status, manifest, logs, progress) on the local disk
        left = {p.name for p in (tmp_path / "remote" / kind / name).iterdir()}
        assert left <= {
            "status.json",
            "manifest.yaml",
            "logs",
            "progress.json",
            "metrics.jsonl",
            "outputs.json",
        }, left

    same = {
        kind: (_status(tmp_path / "remote", kind, n), _status(tmp_path / "local", kind, n))
        for kind, n in CHAIN
    }
    remote_corpus, local_corpus = same["corpus"]
    assert remote_corpus["documents"] == local_corpus["documents"]
    assert remote_corpus["tokens"] == local_corpus["tokens"]
    remote_eval, local_eval = same["evaluation"]
    assert math.isclose(
        remote_eval["results"]["perplexity"], local_eval["results"]["perplexity"], rel_tol=1e-6
    ), (
        remote_eval["results"],
        local_eval["results"],
    )
    assert remote_eval["results"]["benchmarks"] == local_eval["results"]["benchmarks"]
    remote_loss = same["pretrainrun"][0]["metrics"]["loss"]
    assert math.isclose(remote_loss, same["pretrainrun"][1]["metrics"]["loss"], rel_tol=1e-6)

    keys = s3.keys("runs/")
    checkpoints = [
        k for k in keys if k.startswith("runs/pretrainrun/tiny-gpt/checkpoints/") and k.endswith("COMPLETE")
    ]
    assert checkpoints, keys[:50]
    assert any(k.startswith("runs/corpus/tiny-web/tokens/train/") for k in keys)
    assert any(k.startswith("runs/alignmentrun/tiny-dpo/model/") for k in keys)
    assert "runs/evaluation/tiny-eval/results.json" in keys
    assert (tmp_path / "remote" / "report.html").exists()

    again = _run(tmp_path / "manifests", tmp_path / "remote")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("up to date, skipped") == len(CHAIN), again.stdout


@pytest.mark.slow
def test_a_missing_bucket_is_a_configuration_error_naming_the_field(tmp_path: Path, s3) -> None:  # type: ignore[no-untyped-def]
    s3.client.upload_file(str(DATA / "python-docs.warc.gz"), s3.bucket, "data/python-docs.warc.gz")
    _on_s3(s3.uri, tmp_path / "manifests")
    corpus = tmp_path / "manifests" / "01-corpus.yaml"
    doc = yaml.safe_load(corpus.read_text())
    doc["spec"]["output"] = "s3://no-such-bucket-here/corpus"
    only = tmp_path / "only"
    only.mkdir()
    (only / "corpus.yaml").write_text(yaml.safe_dump(doc))

    run = _run(only, tmp_path / "work")
    assert run.returncode != 0
    status = _status(tmp_path / "work", "corpus", "tiny-web")
    assert status["phase"] == "Invalid", status
    message = next(c["message"] for c in status["conditions"] if c["type"] == "Invalid")
    assert "spec.output" in message and "no-such-bucket-here" in message, message
    assert "testing" not in message  # the (test) credentials never appear
