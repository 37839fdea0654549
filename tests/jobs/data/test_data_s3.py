"""The Corpus job on object storage: sources read from ``s3://``, every output written under an ``s3://``
spec.output — against moto's S3 server on 127.0.0.1 (``s3`` fixture, tests/s3_fixtures.py).

The same corpus run with local paths is the reference: the S3 run must give the same stats and the same
token shards, byte for byte; the tokenizer it leaves on S3 must serve the PretrainRun; a rerun after
completion changes nothing; and a storage failure is one ``error: spec.<field>: …`` line, exit 64.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from data_fixtures import (
    ROOT,
    WARC,
    corpus_doc,
    english_sentences,
    job_env,
    read_jsonl_gz,
    read_shards,
    run_job_here,
)

from lmforge_jobs import shards, storage
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.data.tokenizer import check_special_tokens
from lmforge_jobs.entry import ConfigError

QUICKSTART = ROOT / "examples" / "quickstart" / "01-corpus.yaml"


def corpus_manifest(tmp_path: Path, output: str, spec: dict[str, Any]) -> Path:
    """A new manifest in ``tmp_path`` with ``spec`` and ``output`` (a path or URI)."""
    manifest = tmp_path / f"corpus-{len(list(tmp_path.glob('corpus-*.yaml')))}.yaml"
    doc = corpus_doc(Path("."), spec)
    doc["spec"]["output"] = output
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return manifest


def run_corpus(tmp_path: Path, output: str, spec: dict[str, Any], timeout: float = 300) -> Any:
    """``python -m lmforge_jobs.data`` on a manifest with ``spec`` and ``output`` (a path or URI)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge_jobs.data",
            "--manifest",
            str(corpus_manifest(tmp_path, output, spec)),
        ],
        capture_output=True,
        text=True,
        env=job_env(),  # the s3 fixture's endpoint and test credentials are in this process's environment
        timeout=timeout,
        cwd=ROOT,
    )


def run_corpus_here(tmp_path: Path, output: str, spec: dict[str, Any]) -> Any:
    """:func:`run_corpus` with the job's ``main`` in this process (``data_fixtures.run_job_here``)."""
    return run_job_here(corpus_manifest(tmp_path, output, spec))


def upload_file(local: Path, uri: str) -> str:
    fs, path = storage.filesystem(uri)
    fs.put_file(str(local), path)
    return uri


def download(uri: str, dest: Path) -> Path:
    fs, path = storage.filesystem(uri)
    fs.get(f"{path}/", f"{dest}/", recursive=True)
    return dest


def _jsonl(path: Path, texts: list[str], start: int = 0) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts, start):
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def small_sources(tmp_path: Path) -> list[Path]:
    """Two JSONL files of documentation paragraphs (three per document), one document twice."""
    paras = english_sentences(120)
    texts = ["\n\n".join(paras[i : i + 3]) for i in range(0, len(paras) - 2, 3)]
    texts.append(texts[0])  # an exact duplicate for the dedup stages
    half = len(texts) // 2
    return [
        _jsonl(tmp_path / "docs-a.jsonl.gz", texts[:half]),
        _jsonl(tmp_path / "docs-b.jsonl.gz", texts[half:], start=half),
    ]


def small_spec(paths: list[str]) -> dict[str, Any]:
    return {
        "sources": [{"jsonl": {"paths": paths}}],
        "dedup": {"exact": True, "minhash": {"enabled": False}},  # MinHash on S3: the quickstart test
        "tokenizer": {"train": {"vocabSize": 300, "sampleDocuments": 1000}},
        "heldOutFraction": 0.2,
        "parallelism": {"tasks": 2, "workers": 1},
    }


def assert_same_corpus(local: Path, remote: Path) -> None:
    """Same stats and documents, token shards equal byte for byte (the .ds and .ds.index files)."""
    assert json.loads((remote / "stats.json").read_text()) == json.loads((local / "stats.json").read_text())
    for split in ("train", "held-out"):
        names = sorted(p.name for p in (local / "tokens" / split).iterdir())
        assert names and names == sorted(p.name for p in (remote / "tokens" / split).iterdir())
        for name in names:
            if not name.endswith(".metadata"):  # its first line names the tokenizer's path or URI
                assert (remote / "tokens" / split / name).read_bytes() == (
                    local / "tokens" / split / name
                ).read_bytes(), name
        assert documents(remote / "documents" / split) == documents(local / "documents" / split)
    assert (remote / "tokenizer" / "tokenizer.json").read_bytes() == (
        local / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def documents(folder: Path) -> list[dict[str, Any]]:
    """The kept documents of ``folder`` without the source file's path (local in one run, s3:// in the
    other)."""
    docs = read_jsonl_gz(folder)
    for doc in docs:
        doc["metadata"].pop("file_path", None)
    return docs


def objects(s3: Any, prefix: str) -> dict[str, tuple[str, Any]]:
    """key → (ETag, LastModified) of every object under ``prefix``."""
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_corpus_on_s3_equals_the_local_one_and_feeds_pretraining(tmp_path: Path, s3: Any) -> None:
    files = small_sources(tmp_path)
    for f in files:
        upload_file(f, f"{s3.uri}/src/{f.name}")
    local_out = tmp_path / "local"
    proc = run_corpus(tmp_path, str(local_out), small_spec([str(tmp_path / "docs-*.jsonl.gz")]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = f"{s3.uri}/corpus"
    proc = run_corpus(tmp_path, out, small_spec([f"{s3.uri}/src/docs-*.jsonl.gz"]))
    assert proc.returncode == 0, proc.stderr[-3000:]

    keys = s3.keys("corpus/")
    assert not any(k.rsplit("/", 1)[-1].startswith(".") for k in keys), "a temporary key was left behind"
    for marker in ("outputs.json", "stats.json", "logs/tokenizer/completions/00000"):
        assert f"corpus/{marker}" in keys
    outputs = json.loads(storage.read_text(f"{out}/outputs.json"))
    assert outputs["tokenizer"] == f"{out}/tokenizer" and outputs["tokens"] == f"{out}/tokens/train"
    remote = download(out, tmp_path / "remote")
    assert_same_corpus(local_out, remote)
    stats = json.loads((remote / "stats.json").read_text())
    assert stats["consistent"] and stats["removedBy"]["duplicates"] == 1 and stats["kept"] > 10

    # the PretrainRun reads the shards and the tokenizer straight from S3
    from lmforge_jobs.pretrain.inputs import load_tokenizer

    tokenizer, _ = load_tokenizer(outputs["tokenizer"])
    stream = shards.TokenStream(outputs["tokens"])
    assert len(stream) == stats["tokens"]["train"]
    assert stream.max_token() < tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id("<|endoftext|>")
    docs = read_shards(remote / "tokens" / "train")
    assert docs and all(doc[-1] == eos for doc in docs)
    assert tokenizer.decode(docs[0][:-1]).strip()

    # a rerun after completion rewrites nothing it produced
    before = objects(s3, "corpus/")
    proc = run_corpus(tmp_path, out, small_spec([f"{s3.uri}/src/docs-*.jsonl.gz"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = objects(s3, "corpus/")
    for prefix in ("corpus/tokens/", "corpus/documents/", "corpus/tokenizer/", "corpus/work/"):
        assert {k: v for k, v in after.items() if k.startswith(prefix)} == {
            k: v for k, v in before.items() if k.startswith(prefix)
        }, prefix
    assert json.loads(storage.read_text(f"{out}/stats.json")) == stats


def test_a_pretrained_tokenizer_on_s3_and_its_own_end_of_text(tmp_path: Path, s3: Any) -> None:
    """A tokenizer.json on S3 is fetched for datatrove (not taken for a hub repo id), and the shards end
    every document with that tokenizer's end-of-text token, not a hard-coded one."""
    from lmforge_jobs.data.tokenizer import train_bpe

    paras = english_sentences(60)
    tok = train_bpe(paras, 300, ["</s>"], 2)
    tok.save(str(tmp_path / "tokenizer.json"))
    upload_file(tmp_path / "tokenizer.json", f"{s3.uri}/tok/tokenizer.json")
    docs = _jsonl(tmp_path / "docs.jsonl.gz", ["\n\n".join(paras[i : i + 3]) for i in range(0, 57, 3)])
    upload_file(docs, f"{s3.uri}/src/docs.jsonl.gz")
    spec = {
        "sources": [{"jsonl": {"paths": [f"{s3.uri}/src/docs.jsonl.gz"]}}],
        "dedup": {"exact": False, "minhash": {"enabled": False}},
        "tokenizer": {"pretrained": {"path": f"{s3.uri}/tok/tokenizer.json"}},
        "heldOutFraction": 0.0,
    }
    proc = run_corpus_here(tmp_path, f"{s3.uri}/out", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = download(f"{s3.uri}/out", tmp_path / "remote")
    config = json.loads((remote / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"
    eos = tok.token_to_id("</s>")
    shard_docs = read_shards(remote / "tokens" / "train")
    assert len(shard_docs) == 19 and all(doc[-1] == eos for doc in shard_docs)
    meta = (remote / "tokens" / "train" / "00000_unshuffled.ds.metadata").read_text().splitlines()
    assert meta[0].startswith(f"{s3.uri}/out/tokenizer/tokenizer.json|")


def test_no_end_of_text_token_is_a_config_error() -> None:
    spec = CorpusSpec.model_validate(
        {
            "sources": [{"jsonl": {"paths": ["x.jsonl"]}}],
            "tokenizer": {"train": {"specialTokens": []}},
            "output": "/tmp/x",
        }
    )
    with pytest.raises(ConfigError, match=r"^spec\.tokenizer\.train\.specialTokens: is empty"):
        check_special_tokens(spec)


def test_every_file_source_kind_reads_from_s3(tmp_path: Path, s3: Any) -> None:
    """WARC, JSONL and parquet sources on S3 (a folder, a glob, a file) through the job's own readers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge_jobs.data.layout import Layout
    from lmforge_jobs.data.pipelines import Context, source_reader

    upload_file(WARC, f"{s3.uri}/web/crawl/{WARC.name}")
    files = small_sources(tmp_path)
    for f in files:
        upload_file(f, f"{s3.uri}/jsonl/{f.name}")
    pq.write_table(
        pa.table({"id": ["p0", "p1"], "text": ["A parquet row.", "Another row."]}), tmp_path / "p.parquet"
    )
    upload_file(tmp_path / "p.parquet", f"{s3.uri}/pq/p.parquet")
    spec = CorpusSpec.model_validate(
        {
            "sources": [
                {"warc": {"paths": [f"{s3.uri}/web"]}},
                {"jsonl": {"paths": [f"{s3.uri}/jsonl/*.jsonl.gz"]}},
                {"parquet": {"paths": [f"{s3.uri}/pq/p.parquet"]}},
            ],
            "output": f"{s3.uri}/out",
        }
    )
    context = Context(spec, "extract", 0, 1, Layout(f"{s3.uri}/out"))
    read = [list(source_reader(context, i).run()) for i in range(3)]  # type: ignore[union-attr]
    assert len(read[0]) > 50 and all(doc.metadata["url"] for doc in read[0])
    assert len(read[1]) == sum(len(gzip.decompress(f.read_bytes()).splitlines()) for f in files)
    assert [doc.text for doc in read[2]] == ["A parquet row.", "Another row."]


@pytest.mark.slow
def test_quickstart_corpus_on_s3_matches_the_local_run(tmp_path: Path, s3: Any) -> None:
    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    local_spec = {**spec, "sources": [{"warc": {"paths": [str(WARC)]}}]}
    upload_file(WARC, f"{s3.uri}/web/{WARC.name}")
    remote_spec = {**spec, "sources": [{"warc": {"paths": [f"{s3.uri}/web/{WARC.name}"]}}]}
    proc = run_corpus(tmp_path, str(tmp_path / "local"), local_spec, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_corpus(tmp_path, f"{s3.uri}/tiny-web", remote_spec, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = download(f"{s3.uri}/tiny-web", tmp_path / "remote")
    assert_same_corpus(tmp_path / "local", remote)
    assert json.loads((remote / "stats.json").read_text())["kept"] > 0
    assert (remote / "outputs.json").is_file()


# ----------------------------------------------------------------------------------------------- errors
STORAGE_FAILURES = [
    "missing-source-object",
    "missing-source-bucket",
    "missing-output-bucket",
    "wrong-credentials",
    "wrong-credentials-for-the-source",
]


def _storage_failure_params() -> list[Any]:
    """Every case with the job's ``main`` in this process (its stderr and datatrove's log captured), and,
    in the slow suite, as a process of its own (the exit path of test_data.py's bad input run as one)."""
    return [
        pytest.param(case, how, id=f"{case}-{how}", marks=[pytest.mark.slow] if how == "process" else [])
        for case in STORAGE_FAILURES
        for how in ("in-process", "process")
    ]


@pytest.mark.parametrize(("case", "how"), _storage_failure_params())
def test_storage_failures_name_the_field_and_never_the_secret(
    case: str, how: str, tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = _jsonl(tmp_path / "docs.jsonl.gz", ["Some ordinary text about gardening and tomatoes."] * 3)
    upload_file(docs, f"{s3.uri}/src/docs.jsonl.gz")
    source, output = f"{s3.uri}/src/docs.jsonl.gz", f"{s3.uri}/out"
    if case == "missing-source-object":
        source = f"{s3.uri}/src/nothing.jsonl.gz"
        field, message = (
            "spec.sources[0].jsonl.paths[0]",
            f"no such file or directory (or nothing matches): {source}",
        )
    elif case == "missing-source-bucket":
        source = "s3://no-such-bucket/src/docs.jsonl.gz"
        field, message = "spec.sources[0].jsonl.paths[0]", "bucket s3://no-such-bucket does not exist"
    elif case == "missing-output-bucket":
        output = "s3://no-such-bucket/out"
        field, message = "spec.output", "bucket s3://no-such-bucket does not exist"
    else:
        s3.enforce_auth()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zq9-secret-value")
        field, message = "spec.output", f"access denied to {output}"
        if case == "wrong-credentials-for-the-source":
            output = str(tmp_path / "out")
            field, message = "spec.sources[0].jsonl.paths[0]", f"access denied to {source}"
    spec = {"sources": [{"jsonl": {"paths": [source]}}], "tokenizer": {"train": {"vocabSize": 300}}}
    proc = (run_corpus if how == "process" else run_corpus_here)(tmp_path, output, spec)
    assert proc.returncode == 64, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {field}: {message}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "zq9-secret-value" not in proc.stderr + proc.stdout and "AKIAWRONG" not in proc.stderr
    if not case.startswith("wrong-credentials"):
        assert not s3.keys("out/"), "nothing is written before the inputs are checked"
        assert not storage.exists("s3://no-such-bucket")  # never created by the job
