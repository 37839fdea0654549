"""The Corpus job end to end on the repository's WARC of Python documentation pages.

One uninterrupted ``--stage all`` run (module fixture) is checked against the planted cases of
``examples/data/make_warc.py``; a second run, stage by stage with one rank SIGKILLed, must skip the
completed ranks and produce the same bytes. Both runs extract the whole WARC with trafilatura and are
``slow`` (``python -m pytest -m slow``); ``test_data_sources.py`` runs the job end to end on small inputs in
the default suite.
"""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import (
    ROOT,
    job_env,
    read_jsonl_gz,
    read_shards,
    run_job,
    run_job_here,
    train_lid_model,
    write_manifest,
)

sys.path.insert(0, str(ROOT / "examples" / "data"))
import make_warc

from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.data.stages import stage_names, stages
from lmforge_jobs.resolve import expected_outputs

DOCS = "https://docs.python.org/3.11/"


def _spec(lid: Path) -> dict[str, Any]:
    return {
        "sources": [{"warc": {"paths": [str(ROOT / "examples" / "data" / "python-docs.warc.gz")]}}],
        "extract": {"method": "trafilatura", "timeoutSeconds": 60},
        "filters": [
            {"url": {"extraBlocklist": ["example-spam.com"], "useIntegratedLists": False}},
            {"regex": {"pattern": "lorem ipsum", "action": "drop"}},
            {"language": {"languages": ["en"], "minScore": 0.5, "modelPath": str(lid)}},
            {
                "gopherRepetition": {
                    "dupLineFrac": 0.5,
                    "dupLineCharFrac": 0.4,
                    "dupParaFrac": 0.5,
                    "dupParaCharFrac": 0.4,
                }
            },
        ],
        "pii": {"emails": True, "ipAddresses": True},
        "dedup": {"exact": True, "minhash": {"ngram": 5, "buckets": 14, "hashesPerBucket": 8}},
        "tokenizer": {"train": {"vocabSize": 400, "sampleDocuments": 1000}},
        "heldOutFraction": 0.1,
        "parallelism": {"tasks": 2, "workers": 2},
    }


@pytest.fixture(scope="module")
def lid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_lid_model(tmp_path_factory.mktemp("lid") / "lid.bin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, lid: Path) -> Path:
    """One uninterrupted run of every stage."""
    tmp = tmp_path_factory.mktemp("corpus")
    out = tmp / "out"
    manifest = write_manifest(tmp / "corpus.yaml", out, _spec(lid))
    proc = run_job(manifest)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _html_responses() -> int:
    """HTML response records in the WARC: what the reader must turn into documents."""
    from warcio.archiveiterator import ArchiveIterator

    with open(ROOT / "examples" / "data" / "python-docs.warc.gz", "rb") as fh:
        return sum(
            r.rec_type == "response" and r.http_headers.get_header("Content-Type", "").startswith("text/html")
            for r in ArchiveIterator(fh)
        )


def _urls(folder: Path) -> list[str]:
    return [d["metadata"].get("url") for d in read_jsonl_gz(folder)]


def _kept(out: Path) -> list[dict[str, Any]]:
    return read_jsonl_gz(out / "documents" / "train") + read_jsonl_gz(out / "documents" / "held-out")


# ------------------------------------------------------------------------------------------------ stages
def test_stages_follow_the_spec() -> None:
    spec = CorpusSpec.model_validate(
        {"sources": [{"jsonl": {"paths": ["x.jsonl"]}}], "parallelism": {"tasks": 4, "workers": 2}}
    )
    found = stages(spec)
    assert [s.name for s in found] == [
        "extract",
        "exact-sigs",
        "exact-dups",
        "exact-filter",
        "minhash-sigs",
        "minhash-buckets",
        "minhash-clusters",
        "minhash-filter",
        "tokenizer",
        "tokenize",
        "stats",
    ]
    tasks = {s.name: s.tasks for s in found}
    assert tasks["extract"] == tasks["minhash-filter"] == tasks["tokenize"] == 4
    assert tasks["minhash-buckets"] == 14 and tasks["exact-dups"] == tasks["tokenizer"] == tasks["stats"] == 1
    assert {s.phase for s in found} == {"Extracting", "Deduplicating", "TrainingTokenizer", "Tokenizing"}
    for s in found:
        assert len(s.name) <= 20 and s.name.replace("-", "").isalnum() and s.name.islower()
    bare = CorpusSpec.model_validate(
        {
            "sources": [{"jsonl": {"paths": ["x.jsonl"]}}],
            "dedup": {"exact": False, "minhash": {"enabled": False}},
            "tokenizer": {"pretrained": {"path": "/t/tokenizer.json"}},
        }
    )
    assert stage_names(bare) == ["extract", "tokenizer", "tokenize", "stats"]


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_counts_add_up_and_outputs_are_complete(corpus: Path) -> None:
    stats = json.loads((corpus / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + sum(stats["removedBy"].values())
    # every response with HTML, including those without a payload-type header; no css/request/metadata
    assert stats["read"] == _html_responses()
    assert stats["extraction"] == {"timeouts": 0, "failures": 0}
    assert [f["name"] for f in stats["filters"]] == ["url", "regex", "language", "gopherRepetition"]
    assert [f["position"] for f in stats["filters"]] == [0, 1, 2, 3]
    for f in stats["filters"]:
        assert f["removed"] == stats["removedBy"][f["name"]]
    assert (
        stats["filters"][-1]["kept"]
        == stats["kept"] + stats["removedBy"]["duplicates"] + stats["removedBy"]["nearDuplicates"]
    )
    assert stats["documents"]["train"] + stats["documents"]["heldOut"] == stats["kept"]
    assert stats["documents"]["heldOut"] >= 1
    assert stats["tokens"]["train"] > 10 * stats["tokens"]["heldOut"] > 0
    outputs = json.loads((corpus / "outputs.json").read_text())
    assert outputs == expected_outputs("Corpus", str(corpus))
    progress = json.loads((corpus / "progress.json").read_text())
    assert progress["state"] == "Succeeded" and progress["stage"] == "Done"
    assert progress["metrics"]["documentsPerSecond"] > 0
    assert progress["results"]["documents"] == {k: stats[k] for k in ("read", "kept", "removedBy")}
    assert progress["results"]["tokens"] == stats["tokens"]
    assert list(stats["removedBy"]) == [
        "extract",
        "url",
        "regex",
        "language",
        "gopherRepetition",
        "duplicates",
        "nearDuplicates",
    ]  # pipeline order
    rows = [json.loads(line) for line in (corpus / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("stage") for r in rows} >= {
        "Extracting",
        "Deduplicating",
        "TrainingTokenizer",
        "Tokenizing",
    }


@pytest.mark.slow
def test_planted_pages_are_removed_by_the_right_step(corpus: Path) -> None:
    stats = json.loads((corpus / "stats.json").read_text())
    extracted = _urls(corpus / "work" / "extract")
    after_exact = _urls(corpus / "work" / "exact-filter")
    kept = [d["metadata"]["url"] for d in _kept(corpus)]
    # blocklisted domain and non-English pages never get past the filters
    assert not [u for u in extracted if "example-spam.com" in u]
    assert stats["removedBy"]["url"] == len(make_warc.BLOCKLISTED)
    assert not [u for u in extracted if u.startswith("https://news-")]
    assert stats["removedBy"]["language"] >= 6
    assert sum(u.startswith(DOCS) for u in extracted) >= 90  # English pages pass the language filter
    # spam (repetition) and lorem ipsum (regex)
    assert not [u for u in extracted if ".shop.test" in u or "placeholder.test" in u]
    assert stats["removedBy"]["gopherRepetition"] >= 2 and stats["removedBy"]["regex"] >= 1
    # exact copies: both reach dedup, exact dedup keeps one
    for rel in make_warc.EXACT_DUPLICATES:
        pair = [DOCS + rel, f"https://mirror.python-docs.test/3.11/{rel}"]
        assert all(u in extracted for u in pair), rel
        assert sum(u in after_exact for u in pair) == 1, rel
    assert stats["removedBy"]["duplicates"] == len(make_warc.EXACT_DUPLICATES)
    # near copies: exact dedup lets both through, MinHash keeps one
    for rel in make_warc.NEAR_DUPLICATES:
        pair = [DOCS + rel, f"https://archive.python-docs.test/3.11/{rel}"]
        assert all(u in after_exact for u in pair), rel
        assert sum(u in kept for u in pair) == 1, rel
    assert stats["removedBy"]["nearDuplicates"] == len(make_warc.NEAR_DUPLICATES)


@pytest.mark.slow
def test_pii_is_replaced(corpus: Path) -> None:
    docs = _kept(corpus)
    text = "\n".join(d["text"] for d in docs)
    for marker in make_warc.PII_MARKERS:
        assert marker not in text
    pii_urls = {DOCS + rel for rel in make_warc.PII_PAGES}
    redacted = [d["text"] for d in docs if d["metadata"]["url"] in pii_urls]
    assert redacted, "no PII page survived the filters"
    assert all("email@example.com" in t and "0.0.0.0" in t for t in redacted)


@pytest.mark.slow
def test_tokenizer_loads_offline_and_shards_round_trip(corpus: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert 256 < len(tok) <= 400
    assert tok.model_max_length >= 1024
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    for split in ("train", "held-out"):
        docs = read_jsonl_gz(corpus / "documents" / split)
        shards = read_shards(corpus / "tokens" / split)
        assert len(shards) == len(docs) > 0
        for doc, ids in zip(docs, shards, strict=True):
            assert ids[-1] == eos and eos not in ids[:-1]
            assert tok.decode(ids[:-1]) == doc["text"]
            assert ids[:-1] == tok(doc["text"])["input_ids"]


@pytest.mark.slow
def test_held_out_split_is_deterministic_and_disjoint(corpus: Path) -> None:
    from lmforge_jobs.data.blocks import stable_fraction

    train = read_jsonl_gz(corpus / "documents" / "train")
    held = read_jsonl_gz(corpus / "documents" / "held-out")
    train_ids, held_ids = [d["id"] for d in train], [d["id"] for d in held]
    assert len(set(train_ids)) == len(train_ids) and len(set(held_ids)) == len(held_ids)
    assert not set(train_ids) & set(held_ids)
    # dedup runs before the split, so no text is in both (no held-out leakage into training)
    assert not {d["text"] for d in train} & {d["text"] for d in held}
    # the split is the documented rule (a hash of the id against heldOutFraction), nothing else
    assert all(stable_fraction(i, "held-out") < 0.1 for i in held_ids)
    assert all(stable_fraction(i, "held-out") >= 0.1 for i in train_ids)
    assert all(d["metadata"]["split"] == "held-out" for d in held)
    assert all(d["metadata"]["split"] == "train" for d in train)


def test_held_out_split_ignores_order_and_rank() -> None:
    from datatrove.data import Document

    from lmforge_jobs.data.blocks import HeldOutSplit

    def split(order: list[int], rank: int, world: int, fraction: float = 0.1) -> dict[str, str]:
        docs = (Document(text=f"text {i}", id=f"doc-{i}") for i in order)
        return {d.id: d.metadata["split"] for d in HeldOutSplit(fraction).run(docs, rank, world)}

    ids = list(range(2000))
    first = split(ids, 0, 1)
    assert split(ids[::-1], 3, 4) == first == split(ids, 0, 1)
    assert 140 < sum(v == "held-out" for v in first.values()) < 260
    assert set(split(ids, 0, 1, 0.0).values()) == {"train"}


# ------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_killed_rank_resumes_to_the_same_output(corpus: Path, lid: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "corpus.yaml", out, _spec(lid))
    first = run_job(manifest, "--stage", "extract", "--rank", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    logs = out / "logs" / "extract"
    done0 = logs / "completions" / "00000"
    assert done0.exists() and not (logs / "completions" / "00001").exists()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge_jobs.data", "--manifest", str(manifest), "--stage", "extract"],
        env={**job_env(), "JOB_COMPLETION_INDEX": "1"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    task_log = logs / "logs" / "task_00001.log"
    deadline = time.monotonic() + 120
    while not task_log.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "rank 1 finished before it could be killed"
    assert not (logs / "completions" / "00001").exists()
    assert not (out / "outputs.json").exists()
    stamp = (done0.stat().st_mtime_ns, (logs / "logs" / "task_00000.log").stat().st_mtime_ns)

    rest = run_job(manifest)  # --stage all: rank 0 of extract is skipped, rank 1 redone, the rest run
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert (done0.stat().st_mtime_ns, (logs / "logs" / "task_00000.log").stat().st_mtime_ns) == stamp
    assert (logs / "completions" / "00001").exists()
    for split in ("train", "held-out"):
        assert read_jsonl_gz(out / "documents" / split) == read_jsonl_gz(corpus / "documents" / split)
        mine = sorted((out / "tokens" / split).glob("*.ds"))
        theirs = sorted((corpus / "tokens" / split).glob("*.ds"))
        assert [p.name for p in mine] == [p.name for p in theirs]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(mine, theirs, strict=True))
    assert json.loads((out / "stats.json").read_text()) == json.loads((corpus / "stats.json").read_text())
    # a rerun of a completed rank does nothing
    before = (logs / "logs" / "task_00001.log").stat().st_mtime_ns
    again = run_job(manifest, "--stage", "extract", "--rank", "1")
    assert again.returncode == 0
    assert (logs / "logs" / "task_00001.log").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------- bad input
def _jsonl(path: Path, texts: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


BAD_INPUTS = [
    "missing-source",
    "unreadable-warc",
    "truncated-warc",  # runs the extract stage on part of the WARC: slow
    "missing-language-model",
    "vocab-too-small",
    "missing-pretrained-tokenizer",
    "empty-after-filters",
]


def _bad_input_params() -> list[Any]:
    """Every case run by the job's ``main`` in this process, and as a process of its own (exit status,
    the whole stderr): one such case in the default suite, the others walk the same exit path (slow)."""
    params = []
    for case in BAD_INPUTS:
        for how in ("in-process", "process"):
            slow = case == "truncated-warc" or (how == "process" and case != "missing-source")
            params.append(
                pytest.param(case, how, id=f"{case}-{how}", marks=[pytest.mark.slow] if slow else [])
            )
    return params


@pytest.mark.parametrize(("case", "how"), _bad_input_params())
def test_bad_input_is_one_clear_error(case: str, how: str, tmp_path: Path) -> None:
    docs = _jsonl(tmp_path / "docs.jsonl.gz", ["Some ordinary text about gardening and tomatoes."] * 3)
    spec: dict[str, Any] = {
        "sources": [{"jsonl": {"paths": [str(docs)]}}],
        "tokenizer": {"train": {"vocabSize": 300}},
    }
    if case == "missing-source":
        spec["sources"] = [{"jsonl": {"paths": [str(tmp_path / "nowhere" / "*.jsonl.gz")]}}]
        field = "spec.sources[0].jsonl.paths[0]"
    elif case == "unreadable-warc":
        bad = tmp_path / "broken.warc.gz"
        bad.write_bytes(gzip.compress(b"this is not a web archive\n" * 20))
        spec["sources"] = [{"warc": {"paths": [str(bad)]}}]
        field = "spec.sources[0].warc.paths"
    elif case == "truncated-warc":  # the first records parse (preflight passes); the file ends mid-record
        whole = (ROOT / "examples" / "data" / "python-docs.warc.gz").read_bytes()
        bad = tmp_path / "truncated.warc.gz"
        bad.write_bytes(whole[: len(whole) // 8])  # a few dozen pages, then the cut
        spec["sources"] = [{"warc": {"paths": [str(bad)]}}]
        field = "spec.sources[0].warc.paths"
    elif case == "missing-language-model":
        spec["filters"] = [
            {"regex": {"pattern": "x"}},
            {"language": {"modelPath": str(tmp_path / "lid.bin")}},
        ]
        field = "spec.filters[1].language.modelPath"
    elif case == "vocab-too-small":
        spec["tokenizer"] = {"train": {"vocabSize": 257, "specialTokens": ["<|endoftext|>", "<|pad|>"]}}
        field = "spec.tokenizer.train.vocabSize"
    elif case == "missing-pretrained-tokenizer":  # found before extract runs, not after it
        spec["tokenizer"] = {"pretrained": {"path": str(tmp_path / "no-tokenizer")}}
        field = "spec.tokenizer.pretrained.path"
    else:
        spec["filters"] = [{"regex": {"pattern": "tomatoes", "action": "drop"}}]
        field = "spec.filters"
    out = tmp_path / "out"
    proc = (run_job if how == "process" else run_job_here)(write_manifest(tmp_path / "c.yaml", out, spec))
    assert proc.returncode == 64, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {field}:"), proc.stderr[-2000:]
    if case != "truncated-warc":  # found mid-run: datatrove logs the failed rank's traceback first
        assert "Traceback" not in proc.stderr
    if case == "truncated-warc":  # the rank that failed mid-file is not marked complete
        assert not (out / "logs" / "extract" / "completions" / "00000").exists()
    assert not (out / "outputs.json").exists() and not (out / "stats.json").exists()
    assert not (out / "logs" / "tokenize").exists()
    if case != "empty-after-filters":  # input checks fail before any stage ran
        assert not (out / "logs" / "extract" / "completions").exists()
    if (out / "progress.json").exists():
        assert json.loads((out / "progress.json").read_text())["state"] == "Invalid"


@pytest.mark.slow
def test_a_stage_waits_for_every_rank_of_the_previous_one(tmp_path: Path) -> None:
    docs = _jsonl(tmp_path / "docs.jsonl.gz", ["A plain sentence about the weather in spring."] * 4)
    spec = {"sources": [{"jsonl": {"paths": [str(docs)]}}], "parallelism": {"tasks": 2, "workers": 1}}
    manifest = write_manifest(tmp_path / "c.yaml", tmp_path / "out", spec)
    assert run_job(manifest, "--stage", "extract", "--rank", "0").returncode == 0
    early = run_job(manifest, "--stage", "exact-sigs", "--rank", "0")
    assert early.returncode == 75
    assert "exact-sigs needs every rank of extract: 1/2 completed" in early.stderr
    assert not (tmp_path / "out" / "logs" / "exact-sigs" / "completions").exists()
    stats = run_job(manifest, "--stage", "stats")
    assert stats.returncode == 75 and not (tmp_path / "out" / "outputs.json").exists()
    for bad in ("--rank", "one"), ("--rank", "-1"):  # a usage error, not a crash
        proc = run_job(manifest, "--stage", "extract", *bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    outside = run_job(manifest, "--stage", "extract", "--rank", "2")
    assert outside.returncode == 64 and "error: spec.parallelism.tasks: rank 2 is outside" in outside.stderr
    # the dedup filters apply per-rank document indexes: their world must be that of the signatures
    for stage in ("extract", "exact-sigs", "exact-dups"):
        assert run_job(manifest, "--stage", stage, "--rank", "all").returncode == 0
    mismatch = run_job(manifest, "--stage", "exact-filter", "--world", "1", "--rank", "0")
    assert mismatch.returncode == 64, mismatch.stderr[-2000:]
    assert "error: spec.parallelism.tasks: --world 1 of stage exact-filter" in mismatch.stderr
    assert run_job(manifest, "--stage", "exact-filter", "--rank", "all").returncode == 0
