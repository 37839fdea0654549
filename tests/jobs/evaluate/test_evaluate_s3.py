"""The Evaluation job with everything on object storage (a moto S3 server on loopback, ``s3`` fixture).

The same Evaluation — a tiny model, held-out token shards, a task file from examples/tasks, judge prompts —
run once from local paths and once from ``s3://`` gives the same numbers; its results land in the bucket
whole, the completion marker last; a missing object, bucket or credential fails in a second with exit 64
and one ``error: spec.<field>:`` line that names no secret.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from manifests import tiny_pretrain
from manifests import write_manifest as write_resource
from repo import ROOT
from tiny_models import tiny_llama
from transformers import AutoTokenizer

from lmforge_jobs import storage
from lmforge_jobs.evaluate.__main__ import main
from lmforge_jobs.evaluate.perplexity import is_token_shards
from lmforge_jobs.pretrain.testing import synthetic_texts
from lmforge_jobs.spec import EXIT_CONFIG_ERROR

TASKS = ROOT / "examples" / "tasks"
TEXTS = synthetic_texts(24, seed=7)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    for key in ("RANK", "LMFORGE_TERMINATION_LOG"):
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)


def write_token_shards(tokenizer_dir: str, texts: list[str], out: Path, shards: int = 2) -> Path:
    """datatrove-format shards (``.ds`` uint16 ids, ``.ds.index`` end offsets, ``.ds.metadata``) of
    ``texts`` tokenized with the model's own tokenizer, split over ``shards`` files."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        docs = [tok(t)["input_ids"] for t in texts[i::shards]]
        ids = np.array([t for d in docs for t in d], dtype="<u2")
        stem = out / f"{i:05d}_held-out.ds"
        ids.tofile(stem)
        np.cumsum([len(d) for d in docs]).astype("<u8").tofile(f"{stem}.index")
        Path(f"{stem}.metadata").write_text(f"tiny|2\n{len(ids)}\n{len(ids)}", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The inputs on a local disk: two models (evaluated, reference), held-out shards, a task directory."""
    root = tmp_path_factory.mktemp("inputs")
    evaluated = tiny_llama(root / "runs" / "small" / "model", layers=1, texts=TEXTS, seed=0)
    reference = tiny_llama(root / "runs" / "base" / "model", layers=1, texts=TEXTS, seed=1)
    held_out = write_token_shards(evaluated, TEXTS, root / "corpus" / "held-out")
    return {
        "root": str(root),
        "model": evaluated,
        "reference": reference,
        "heldOut": str(held_out),
        "tasks": str(TASKS),
    }


def upload(local: str | Path, uri: str) -> str:
    """Every file under ``local`` to ``uri``, one PUT each (as another client would write them)."""
    fs, path = storage.filesystem(uri)
    root = Path(local)
    fs.pipe(
        {f"{path}/{f.relative_to(root).as_posix()}": f.read_bytes() for f in root.rglob("*") if f.is_file()}
    )
    return uri


def write_manifest(tmp: Path, spec: dict, name: str = "ev") -> Path:
    spec = {"precision": "fp32", "batchSize": 4, **spec}
    return write_resource(tmp / f"{name}.yaml", "Evaluation", name, spec, sort_keys=False)


def evaluation(inputs: dict[str, str], output: str) -> dict:
    return {
        "model": {"path": inputs["model"]},
        "perplexity": {"data": inputs["heldOut"], "seqLen": 32, "stride": 16},
        "benchmarks": [{"taskPath": f"{inputs['tasks']}/tiny_mcq.yaml", "limit": 6}],
        "judge": {
            "model": {"path": inputs["model"]},
            "reference": {"path": inputs["reference"]},
            "prompts": f"{inputs['tasks']}/judge_prompts.jsonl",
            "maxNewTokens": 4,
            "verdictMaxTokens": 4,
            "limit": 2,
            "bootstrapSamples": 100,
        },
        "output": output,
    }


@pytest.fixture(scope="module")
def remote(s3_server: str, local: dict[str, str]) -> dict[str, str]:
    """The same inputs in a bucket of their own, uploaded once for the tests that only read them (each test
    writes its output to its own ``s3`` bucket)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = "evaluation-inputs"
    client.create_bucket(Bucket=bucket)

    def put_tree(prefix: str, root: Path) -> None:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                key = f"{prefix}/{f.relative_to(root).as_posix()}"
                client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())

    put_tree("runs/small/model", Path(local["model"]))
    put_tree("runs/base/model", Path(local["reference"]))
    put_tree("corpus/held-out", Path(local["heldOut"]))
    for name in ("tiny_mcq.yaml", "tiny_mcq.jsonl", "judge_prompts.jsonl"):
        client.put_object(Bucket=bucket, Key=f"tasks/{name}", Body=(TASKS / name).read_bytes())
    uri = f"s3://{bucket}"
    return {
        "uri": uri,
        "model": f"{uri}/runs/small/model",
        "reference": f"{uri}/runs/base/model",
        "heldOut": f"{uri}/corpus/held-out",
        "tasks": f"{uri}/tasks",
    }


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------ same numbers
def test_everything_on_s3_gives_the_local_results(
    s3, local: dict[str, str], remote: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    assert is_token_shards(remote["heldOut"]) and is_token_shards(local["heldOut"])
    assert not is_token_shards(f"{remote['tasks']}/judge_prompts.jsonl")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    local_spec = evaluation(local, str(tmp_path / "a" / "out"))
    assert main(["--manifest", str(write_manifest(tmp_path / "a", local_spec))]) == 0
    expected = json.loads((tmp_path / "a" / "out" / "results.json").read_text())

    # a results.json of an earlier run is in the bucket: it must not pass for this one's
    s3.client.put_object(Bucket=s3.bucket, Key="eval/results.json", Body=b'{"perplexity": 1.0}')
    out = f"{s3.uri}/eval"
    assert main(["--manifest", str(write_manifest(tmp_path / "b", evaluation(remote, out)))]) == 0
    got = json.loads(storage.read_text(f"{out}/results.json"))

    assert got["perplexity"] == expected["perplexity"] > 1  # the shards were read as tokens, not text
    assert got["nll"] == expected["nll"] and got["bitsPerByte"] == expected["bitsPerByte"]
    assert got["benchmarks"] == expected["benchmarks"] and set(got["benchmarks"]) == {"tiny_mcq"}
    assert got["judge"] == expected["judge"]
    # every object is whole and in place, no temporary key left, the marker names the results
    assert s3.keys("eval/") == ["eval/judgments.jsonl", "eval/outputs.json", "eval/results.json"]
    assert json.loads(storage.read_text(f"{out}/outputs.json")) == {"results": f"{out}/results.json"}
    local_rows = (tmp_path / "a" / "out" / "judgments.jsonl").read_text().splitlines()
    remote_rows = storage.read_text(f"{out}/judgments.jsonl").splitlines()
    assert len(remote_rows) == 2
    assert [json.loads(r)["answerA"] for r in remote_rows] == [json.loads(r)["answerA"] for r in local_rows]


def test_a_failed_part_keeps_the_results_so_far_without_the_marker(
    s3, local: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    upload(local["model"], f"{s3.uri}/model")
    upload(local["heldOut"], f"{s3.uri}/held-out")
    fs, path = storage.filesystem(f"{s3.uri}/tasks")
    fs.put_file(str(TASKS / "tiny_mcq.yaml"), f"{path}/tiny_mcq.yaml")  # its data file is not there
    spec = {
        "model": {"path": f"{s3.uri}/model"},
        "perplexity": {"data": f"{s3.uri}/held-out", "seqLen": 32},
        "benchmarks": [{"taskPath": f"{s3.uri}/tasks/tiny_mcq.yaml"}],
        "output": f"{s3.uri}/eval",
    }
    assert main(["--manifest", str(write_manifest(tmp_path, spec))]) == EXIT_CONFIG_ERROR
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(
        "error: spec.benchmarks[0].taskPath: data file tiny_mcq.jsonl"
    )
    assert f"{s3.uri}/tasks/tiny_mcq.jsonl does not exist" in lines[0]
    assert s3.keys("eval/") == ["eval/results.json"]  # no outputs.json: not complete
    assert json.loads(storage.read_text(f"{s3.uri}/eval/results.json"))["perplexity"] > 1


def test_text_held_out_on_s3_scores_like_the_local_files(s3, local: dict[str, str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import gzip

    from transformers import AutoModelForCausalLM

    from lmforge_jobs.evaluate.perplexity import evaluate_perplexity, text_files

    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    (texts / "sub" / "b.txt").write_text(TEXTS[3])
    (texts / "c.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": TEXTS[4]}).encode()))
    (texts / "notes.csv").write_text("not data")
    uri = upload(texts, f"{s3.uri}/texts")
    assert not is_token_shards(uri)
    assert [f.removeprefix(uri) for f in text_files(uri)] == ["/a.jsonl", "/c.jsonl.gz", "/sub/b.txt"]
    assert text_files(f"{uri}/*.jsonl") == [f"{uri}/a.jsonl"]
    model = AutoModelForCausalLM.from_pretrained(local["model"]).eval()
    tok = AutoTokenizer.from_pretrained(local["model"])
    here = evaluate_perplexity(model, tok, str(texts), seq_len=32)
    there = evaluate_perplexity(model, tok, uri, seq_len=32)
    assert (there.perplexity, there.tokens, there.documents) == (here.perplexity, here.tokens, 5)


def test_storage_copies_and_requirements(s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lmforge_jobs.entry import ConfigError

    s3.client.put_object(Bucket=s3.bucket, Key="d/x.txt", Body=b"x")
    s3.client.put_object(Bucket=s3.bucket, Key="d/sub/y.txt", Body="ÿ".encode())
    assert storage.read_text(f"{s3.uri}/d/sub/y.txt") == "ÿ"
    copy = storage.local_copy(f"{s3.uri}/d", tmp_path / "copy")
    assert copy == tmp_path / "copy" and (copy / "sub" / "y.txt").read_text() == "ÿ"
    assert storage.local_copy(f"{s3.uri}/d/x.txt", tmp_path / "one") == tmp_path / "one" / "x.txt"
    assert storage.local_copy(str(tmp_path / "one")) == tmp_path / "one"  # local: the path itself
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"{s3.uri}/nothing")
    storage.require(f"{s3.uri}/d", "model.path")  # a prefix holding objects exists
    with pytest.raises(ConfigError, match=rf"^spec\.x: {s3.uri}/nothing does not exist$"):
        storage.require(f"{s3.uri}/nothing", "x")
    with pytest.raises(ConfigError, match=r"^spec\.x: bucket s3://no-such-bucket does not exist"):
        storage.require("s3://no-such-bucket/k", "x")
    with pytest.raises(ConfigError, match=rf"^spec\.x: {tmp_path}/none does not exist$"):
        storage.require(tmp_path / "none", "x")


# ---------------------------------------------------------------------------------------------- errors
def test_missing_objects_buckets_and_credentials_name_the_field(
    s3,
    remote: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # type: ignore[no-untyped-def]
    out = f"{s3.uri}/eval"

    def case(spec: dict, field: str, message: str) -> None:
        sub = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        assert main(["--manifest", str(write_manifest(sub, spec))]) == EXIT_CONFIG_ERROR, field
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert lines == [f"error: spec.{field}: {message}"], (field, err)
        assert "Traceback" not in err and "AKIAWRONG" not in err and "zq9-secret-value" not in err

    good = evaluation(remote, out)
    case(
        {**good, "model": {"path": f"{s3.uri}/runs/nothing/model"}},
        "model.path",
        f"{s3.uri}/runs/nothing/model does not exist",
    )
    case(
        {**good, "model": {"path": "s3://no-such-bucket/model"}},
        "model.path",
        "bucket s3://no-such-bucket does not exist (in s3://no-such-bucket/model)",
    )
    case(
        {**good, "model": {"path": f"{remote['uri']}/corpus"}},
        "model.path",
        f"{remote['uri']}/corpus is not a Hugging Face model directory (no config.json)",
    )
    case(
        {**good, "perplexity": {"data": f"{s3.uri}/corpus/nothing"}},
        "perplexity.data",
        f"{s3.uri}/corpus/nothing does not exist",
    )
    case(
        {**good, "benchmarks": [{"taskPath": f"{s3.uri}/tasks/missing.yaml"}]},
        "benchmarks[0].taskPath",
        f"{s3.uri}/tasks/missing.yaml does not exist",
    )
    case(
        {**good, "judge": {**good["judge"], "prompts": f"{s3.uri}/tasks/none.jsonl"}},
        "judge.prompts",
        f"{s3.uri}/tasks/none.jsonl does not exist",
    )
    case(
        {**good, "output": "s3://no-such-bucket/eval"},
        "output",
        "bucket s3://no-such-bucket does not exist (in s3://no-such-bucket/eval)",
    )
    assert s3.keys("eval/") == ["eval/results.json"]  # emptied at the start, never marked complete
    assert "perplexity" not in json.loads(storage.read_text(f"{out}/results.json"))
    assert not storage.exists("s3://no-such-bucket")

    # wrong credentials: access denied, for the output first, and for an input read from a local output
    s3.enforce_auth()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zq9-secret-value")
    denied = "(check the Secret/AWS_* credentials)"
    case(good, "output", f"access denied to {out} {denied}")
    case(
        {**good, "output": str(tmp_path / "out")},
        "model.path",
        f"access denied to {remote['model']} {denied}",
    )


# ------------------------------------------------------------------------------------- checkpoints: every
@pytest.mark.slow
def test_follows_a_run_in_s3_until_it_finishes(s3, tmp_path: Path, poll_clock) -> None:  # type: ignore[no-untyped-def]
    """A PretrainRun whose output is in the bucket: each complete checkpoint is evaluated as it lands (the
    same numbers as from a local copy), until the run's outputs.json appears; the history is in
    results.json there, and a rerun resumes. The run's objects are written by another client (another
    process, in a cluster): the job must not rely on listings it cached."""
    from lmforge_jobs.pretrain.__main__ import main as pretrain_main
    from lmforge_jobs.pretrain.testing import make_token_data

    data = make_token_data(tmp_path / "data", vocab_size=320, documents=60, held_out=8)
    spec = tiny_pretrain(
        data,
        tmp_path / "run",
        model={"layers": 1, "hidden": 32, "heads": 2, "kvHeads": 2, "ffnHidden": 64},
        budget={"steps": 4},
        optimizer={"warmupSteps": 1},
        batch={"globalTokens": 256},
        checkpoint={"everySteps": 2, "keep": 5},
        eval={"everySteps": 100, "batches": 1},
    )
    manifest = write_resource(tmp_path / "run.yaml", "PretrainRun", "run", spec)
    assert pretrain_main(["--manifest", str(manifest)]) == 0
    held_out = upload(data["heldOut"], f"{s3.uri}/corpus/held-out")
    run = f"{s3.uri}/runs/run"

    def put(*names: str) -> None:  # as the PretrainRun's pod would: another S3 client
        for name in names:
            source = tmp_path / "run" / name
            for f in sorted([source] if source.is_file() else source.rglob("*")):
                if f.is_file():
                    key = f"runs/run/{f.relative_to(tmp_path / 'run').as_posix()}"
                    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=f.read_bytes())

    def every(checkpoint_dir: str, held: str, output: str) -> dict:
        return {
            "model": {"path": f"{checkpoint_dir.rsplit('/', 1)[0]}/model"},
            "checkpoints": "every",
            "checkpointDir": checkpoint_dir,
            "perplexity": {"data": held, "seqLen": 32},
            "checkpointPollSeconds": 1,
            "output": output,
        }

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    local = every(str(tmp_path / "run" / "checkpoints"), data["heldOut"], str(tmp_path / "a" / "out"))
    assert main(["--manifest", str(write_manifest(tmp_path / "a", local))]) == 0
    expected = json.loads((tmp_path / "a" / "out" / "results.json").read_text())

    put("checkpoints/tokenizer", "checkpoints/step-00000002")
    path = write_manifest(tmp_path / "b", every(f"{run}/checkpoints", held_out, f"{s3.uri}/eval"))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(["--manifest", str(path)])))
    thread.start()

    def history() -> list[dict]:
        try:
            return json.loads(storage.read_text(f"{s3.uri}/eval/results.json")).get("history", [])
        except FileNotFoundError:
            return []

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not history():
        time.sleep(0.2)
    assert [h["step"] for h in history()] == [2]
    while time.monotonic() < deadline and poll_clock.polls < 2:
        time.sleep(0.01)
    # two polls found nothing new: the run has not finished, the job waits
    assert poll_clock.polls >= 2
    assert thread.is_alive() and s3.keys("eval/") == ["eval/results.json"]
    put("checkpoints/step-00000004", "outputs.json")
    thread.join(timeout=120)
    assert codes == [0]
    got = json.loads(storage.read_text(f"{s3.uri}/eval/results.json"))
    assert [h["checkpoint"] for h in got["history"]] == ["step-00000002", "step-00000004"]
    assert [h["perplexity"] for h in got["history"]] == [h["perplexity"] for h in expected["history"]]
    assert s3.keys("eval/") == ["eval/outputs.json", "eval/results.json"]
    assert main(["--manifest", str(path)]) == 0  # resumed from the bucket's history: nothing again
    assert json.loads(storage.read_text(f"{s3.uri}/eval/results.json"))["history"] == got["history"]
